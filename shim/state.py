"""thaw's per-container runtime state under state_dir (root-only, on tmpfs):

  state_dir/containers/<id>.json   the container was restored by thaw (start becomes a no-op)
  state_dir/containers/<id>.d/     its restore work dir (runc/CRIU logs), rootfs undo data
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from typing import Any

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,1023}$")


class ContainerState:
    def __init__(self, state_dir: str, container_id: str):
        if not _ID.match(container_id):
            raise ValueError(f"invalid container id {container_id!r}")
        self.dir = os.path.join(state_dir, "containers")
        self.id = container_id
        self.record_path = os.path.join(self.dir, container_id + ".json")
        self.work_dir = os.path.join(self.dir, container_id + ".d")

    def exists(self) -> bool:
        return os.path.exists(self.record_path)

    def make_work_dir(self) -> str:
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        if os.path.exists(self.work_dir):
            shutil.rmtree(self.work_dir)
        os.mkdir(self.work_dir, 0o700)
        return self.work_dir

    def write(self, record: dict[str, Any]) -> None:
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        tmp = f"{self.record_path}.{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump({**record, "id": self.id, "updated": time.time()}, f)
        os.replace(tmp, self.record_path)

    def read(self) -> dict[str, Any] | None:
        try:
            with open(self.record_path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def update(self, **fields: Any) -> None:
        self.write({**(self.read() or {}), **fields})

    def remove(self) -> None:
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
