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


def list_ids(state_dir: str) -> list[str]:
    d = os.path.join(state_dir, "containers")
    try:
        return sorted(n[:-5] for n in os.listdir(d) if n.endswith(".json"))
    except FileNotFoundError:
        return []
