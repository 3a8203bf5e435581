"""thaw's per-container runtime state under state_dir (root-only, on tmpfs):

  state_dir/containers/<id>.json   the container was restored by thaw (start becomes a no-op)
  state_dir/containers/<id>.d/     its restore work dir (runc/CRIU logs), rootfs undo data
"""

from __future__ import annotations

import os

from .config import make_private_dir

# json and shutil are imported where used: `start`/`delete` of every container imports this
# module only to look for a record.

_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.+-")


def valid_id(container_id: str) -> bool:
    """Container ids become file names here: the alphabet runc accepts, no leading dot."""
    return (0 < len(container_id) <= 1024 and container_id[0] != "." and
            _ID_CHARS.issuperset(container_id))


def record_path(state_dir: str, container_id: str) -> str:
    """Cheap existence check for the runtime's hot path (start/delete of any container)."""
    if not valid_id(container_id):
        raise ValueError(f"invalid container id {container_id!r}")
    return os.path.join(state_dir, "containers", container_id + ".json")


class ContainerState:
    def __init__(self, state_dir: str, container_id: str):
        if not valid_id(container_id):
            raise ValueError(f"invalid container id {container_id!r}")
        self.dir = os.path.join(state_dir, "containers")
        self.id = container_id
        self.record_path = os.path.join(self.dir, container_id + ".json")
        self.work_dir = os.path.join(self.dir, container_id + ".d")

    def exists(self) -> bool:
        return os.path.exists(self.record_path)

    def make_work_dir(self) -> str:
        import shutil
        make_private_dir(self.dir)
        if os.path.exists(self.work_dir):
            shutil.rmtree(self.work_dir)
        os.mkdir(self.work_dir, 0o700)
        return self.work_dir

    def write(self, record: dict) -> None:
        import json
        import time
        make_private_dir(self.dir)
        tmp = f"{self.record_path}.{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump({**record, "id": self.id, "updated": time.time()}, f)
        os.replace(tmp, self.record_path)

    def read(self) -> dict | None:
        import json
        try:
            with open(self.record_path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def update(self, **fields: Any) -> None:
        self.write({**(self.read() or {}), **fields})

    def remove(self) -> None:
        import shutil
        for path in (self.record_path,):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        shutil.rmtree(self.work_dir, ignore_errors=True)


def finish(state_dir: str, container_id: str, how: str) -> dict | None:
    """The end of a thaw container (from `thaw-runtime delete` or the poststop hook, whichever
    comes first): stop its capture watcher, append its timing record to state_dir/timings.log,
    remove its state. Returns the record it found, or None if another caller got there first."""
    import json
    import signal
    import time
    try:
        st = ContainerState(state_dir, container_id)
    except ValueError:
        return None
    record = st.read()
    if record is None:
        st.remove()
        return None
    if record.get("restoring") and how == "poststop":
        # runc runs poststop when a restore fails: thaw-runtime is mid-restore and cleans up itself.
        return None
    watcher = record.get("watcher_pid")
    if watcher:
        try:
            os.kill(int(watcher), signal.SIGTERM)
        except (OSError, ValueError):
            pass
    now = time.time()
    timing = {"id": container_id, "snapshot": record.get("snapshot"), "restored": bool(record.get("restored")),
              "cold_reason": record.get("cold_reason"), "phases": record.get("phases"),
              "captured": record.get("captured"), "created": record.get("created"), "finished": now,
              "lifetime_s": round(now - record["created"], 3) if record.get("created") else None, "by": how}
    try:
        fd = os.open(os.path.join(state_dir, "timings.log"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        with os.fdopen(fd, "a") as f:
            f.write(json.dumps(timing) + "\n")
    except OSError:
        pass
    st.remove()
    return record
