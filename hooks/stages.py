"""What thaw-hook does at each stage; each returns the hook's exit code (hooks/main.py exits).

  prestart  cold path with `thaw.dev/capture: on-ready`: start the capture watcher (the restore
            path has no prestart hook: thaw-runtime checks the network itself, shim/lifecycle/restore.py).
  poststop  stop the watcher, record the container's end, remove its thaw state.
  watch     the auto-capture watcher itself (started by prestart as its own process).
  prepare   started by thaw-runtime beside a pod sandbox's create: get its snapshot ready.
"""

from __future__ import annotations

import os
import signal

from thaw.oci.runtime_state import OciState
from thaw.shim.node.config import Config

# Each stage imports what it uses, where it uses it: runc runs prestart and poststop inline in
# a container's create and delete, and the auto-capture and prefetch machinery (the engine's HTTP
# client, the store, the registry) costs ~100 ms to import that a poststop never needs.


def prestart(oci_state: OciState, cfg: Config) -> int:
    from thaw.shim.node.state import ContainerState, Phase
    try:
        st = ContainerState(cfg.state_dir, oci_state.id)
    except ValueError:
        return 0
    record = st.read()
    if record is None:
        return 0                               # not a container thaw handles
    if record.phase == Phase.COLD and record.capture and not record.watcher and oci_state.pid:
        from thaw.shim.lifecycle import autocapture
        from thaw.shim.node import events
        try:
            st.update(watcher=autocapture.start_watcher(cfg, oci_state.id, oci_state.pid).to_json())
        except Exception as exc:  # noqa: BLE001 - auto-capture must never fail a cold start
            events.emit(cfg, "hook_error", f"auto-capture watcher not started: {exc}", oci_state.id, "error")
    return 0


def poststop(oci_state: OciState, cfg: Config) -> int:
    from thaw.shim.lifecycle.recovery import finish
    finish(cfg, oci_state.id, "poststop")
    return 0


def prepare(cfg: Config, namespace: str, snapshot: str, container_id: str | None = None) -> int:
    """Read the snapshot a pod will ask for into the page cache (pulling it first if it is a
    registry reference the node lacks), in the background of its sandbox's create; at idle I/O
    priority, with no file but its own open. Stopped by SIGTERM, which thaw-runtime sends when
    `container_id` (the sandbox) is deleted: the pod that asked is gone, so is the reason."""
    from thaw.oci.annotations import AnnotationError, SnapshotRef, valid_namespace
    from thaw.shim.lifecycle import prefetch
    os.closerange(3, 65536)
    try:
        ref = SnapshotRef.parse(snapshot)
    except AnnotationError:
        return 0                                   # the container's create reports the bad name
    if not valid_namespace(namespace):
        return 0
    cancel = prefetch.Cancel()
    why = f"container {container_id} it was started for was deleted" if container_id else "prepare was stopped"
    signal.signal(signal.SIGTERM, lambda *_: cancel.set(why))
    try:
        prefetch.warm(cfg, ref, namespace, pull=True, idle=True, cancel=cancel)
    finally:
        if container_id and "/" not in container_id and not container_id.startswith("."):
            prefetch.unregister_prepare(cfg, container_id)
    return 0
