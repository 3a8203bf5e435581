"""Auto-capture: `thaw.dev/capture: on-ready`. The prestart hook of a cold-started container
starts a watcher (`thaw-hook watch ID PID`, its own process and session, stdio on /dev/null: a
hook must never hold the runtime's stdout/stderr); once the container is ready (`thaw.dev/ready`
probed inside it), the watcher captures it (leaving it running) and publishes the snapshot its
`thaw.dev/snapshot` names.

The watcher ends after capturing, when the container goes away, at `capture_ready_timeout`, or
when the poststop hook / `thaw-runtime delete` sends SIGTERM. Pods cold-starting at once capture
once: the capture runs under a per-snapshot lock and is skipped if the snapshot exists by then.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from thaw.oci.annotations import LOCAL_NAMESPACE, SnapshotRef

from .. import faults
from ..drivers.engine import ContainerView, EngineError
from ..drivers.procs import ProcessHandle
from ..node import events
from ..node.config import Config
from ..node.state import ContainerState
from ..node.store import Store, StoreError
from ..timing import Stopwatch
from . import distribution
from .capture import capture, report


def start_watcher(cfg: Config, container_id: str, pid: int) -> ProcessHandle:
    """Start `thaw-hook watch` for container_id (whose init is pid), detached; its handle."""
    env = {"PATH": os.environ.get("PATH") or "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
    if cfg.source:
        env["THAW_CONFIG"] = cfg.source
    env.update(faults.env())
    proc = subprocess.Popen([cfg.hook, "watch", container_id, str(pid)], env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, close_fds=True, start_new_session=True)
    return ProcessHandle.of(proc.pid)


def watch(cfg: Config, container_id: str, pid: int, poll: float = 0.5) -> str:
    """Wait for readiness, then capture once. Returns what happened (also in the events log).
    SIGTERM (the container is being deleted) unwinds a capture in progress, so that its staging
    area and the source's GPU state are cleaned up on the way out."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    outcome, level, msg = _watch(cfg, container_id, pid, poll)
    events.emit(cfg, "auto_capture", f"auto-capture: {msg}", container_id, level, outcome=outcome)
    return outcome


def _watch(cfg: Config, container_id: str, pid: int, poll: float) -> tuple[str, str, str]:


    st = ContainerState(cfg.state_dir, container_id)
    record = st.read()
    want = (record.capture if record else None) or {}
    if not want:
        return "nothing", "warning", "no capture request in the container's record"
    ref = SnapshotRef.parse(want["snapshot"])
    namespace = want.get("namespace") or LOCAL_NAMESPACE
    deadline = time.monotonic() + cfg.capture_ready_timeout
    try:
        # Held for the whole wait: probes go into this container's netns and root, never into
        # whatever process may get its pid once it has ended.
        view = ContainerView(pid)
    except EngineError:
        return "gone", "info", "container ended before it was ready"
    with view:
        while True:
            if not view.alive():
                return "gone", "info", "container ended before it was ready"
            if view.ready(want["ready"]):
                break
            if time.monotonic() > deadline:
                return "timeout", "warning", f"not ready after {cfg.capture_ready_timeout}s; giving up"
            time.sleep(poll)

    store = Store.for_config(cfg).init()
    with store.name_lock(ref, namespace):
        try:
            store.resolve(ref, namespace)
            return "exists", "info", f"{ref} already exists in {namespace} (captured by another container)"
        except StoreError:
            pass                                 # not found or unreadable: capture it
        clock = Stopwatch()
        try:
            snap = capture(cfg, container_id, ref, root=want.get("root"), leave_running=True,
                           quiesce=want.get("quiesce"), resume=want.get("resume"))
        except Exception as exc:  # noqa: BLE001 - a watcher reports, it never raises
            report(cfg, "auto", container_id, ref, None, exc)
            return "failed", "error", f"capture of {ref} failed: {exc}"
    report(cfg, "auto", container_id, ref, snap)
    st.update(captured=snap.ref, capture_s=round(clock.seconds(), 3))
    pushed = _push(cfg, store, ref, namespace) if want.get("push") else ""
    return "captured", "info", (f"published {snap.ref} ({snap.manifest.digest}) "
                                f"in {clock.seconds():.2f}s{pushed}")


def _push(cfg: Config, store: Store, ref: SnapshotRef, namespace: str) -> str:
    """thaw.dev/push: "true" — what was captured goes to the registry reference it is named by,
    if the node policy lets this namespace push there. Returns a note for the event."""
    remote = ref.remote
    if remote is None or not cfg.registry.allows("push", namespace, remote.registry, remote.repository):
        return f"; not pushed: namespace {namespace} may not push to {ref} (node config registry.push)"
    try:
        result = distribution.push(cfg, store, ref, namespace, remote)
    except Exception as exc:  # noqa: BLE001 - a watcher reports, it never raises
        return f"; push to {ref} failed: {exc}"
    return f"; pushed to {result['reference']}@{result['digest']}"
