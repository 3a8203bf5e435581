"""Auto-capture: `thaw.dev/capture: on-ready`. The prestart hook of a cold-started container
starts a watcher; once the container is ready (`thaw.dev/ready` probed inside it), the watcher
captures it (leaving it running) and publishes the snapshot its `thaw.dev/snapshot` names.

Lifecycle: one watcher per container, a detached process (own session, stdio on /dev/null: a
hook must never hold the runtime's stdout/stderr) whose pid is in the container's state record;
it ends after capturing, when the container goes away, at `capture_ready_timeout`, or when the
poststop hook / `thaw-runtime delete` sends SIGTERM. Pods cold-starting at once capture once: the
capture runs under a per-snapshot lock and is skipped if the snapshot exists by then.
"""

from __future__ import annotations

import os
import sys
import time

from thaw.oci.annotations import SnapshotRef

from .config import Config
from .state import ContainerState


def spawn(cfg: Config, container_id: str, pid: int) -> int:
    """Start the watcher for container_id (whose init is pid) detached; return its pid."""
    r, w = os.pipe()
    first = os.fork()
    if first == 0:  # pragma: no cover - child processes
        os.close(r)
        os.setsid()
        second = os.fork()
        if second != 0:
            os.write(w, str(second).encode())
            os._exit(0)
        os.close(w)
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.closerange(3, 65536)
        code = 0
        try:
            watch(cfg, container_id, pid)
        except BaseException:  # noqa: BLE001 - a watcher never takes anything down with it
            code = 1
        os._exit(code)
    os.close(w)
    data = b""
    while chunk := os.read(r, 64):
        data += chunk
    os.close(r)
    os.waitpid(first, 0)
    return int(data or b"0")


def _event(cfg: Config, container_id: str, level: str, msg: str) -> None:
    from thaw.oci import runc_log
    runc_log.append(os.path.join(cfg.state_dir, "events.log"), level, f"[{container_id}] {msg}")


def watch(cfg: Config, container_id: str, pid: int, poll: float = 0.5) -> str:
    """Wait for readiness, then capture once. Returns what happened (for logs and tests)."""
    from . import engine
    from .capture import capture
    from .store import Store

    st = ContainerState(cfg.state_dir, container_id)
    record = st.read() or {}
    want = record.get("capture") or {}
    ref = SnapshotRef.parse(want["snapshot"])
    deadline = time.monotonic() + cfg.capture_ready_timeout
    while True:
        if not os.path.exists(f"/proc/{pid}"):
            _event(cfg, container_id, "info", "auto-capture: container ended before it was ready")
            return "gone"
        if engine.ready(want["ready"], pid):
            break
        if time.monotonic() > deadline:
            _event(cfg, container_id, "warning", f"auto-capture: not ready after {cfg.capture_ready_timeout}s; giving up")
            return "timeout"
        time.sleep(poll)

    store = Store(cfg.store_dir).init()
    with store.name_lock(ref):
        try:
            store.resolve(ref)
            _event(cfg, container_id, "info", f"auto-capture: {ref} already exists (captured by another container)")
            return "exists"
        except Exception:  # noqa: BLE001 - not found or unreadable: capture it
            pass
        t = time.perf_counter()
        try:
            snap = capture(cfg, container_id, ref, root=want.get("root"), leave_running=True,
                           quiesce=want.get("quiesce"), resume=want.get("resume"))
        except Exception as exc:  # noqa: BLE001
            _event(cfg, container_id, "error", f"auto-capture of {ref} failed: {exc}")
            return "failed"
    if st.exists():
        st.update(captured=snap.ref, capture_s=round(time.perf_counter() - t, 3))
    _event(cfg, container_id, "info", f"auto-capture: published {snap.ref} ({snap.manifest.digest}) "
                                      f"in {time.perf_counter() - t:.2f}s")
    return "captured"


if __name__ == "__main__":  # debugging aid: python -m thaw.shim.autocapture ID PID
    from .config import load
    print(watch(load(), sys.argv[1], int(sys.argv[2])))
