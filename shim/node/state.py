"""Per-container state: the one module that reads and writes it.

  state_dir/containers/<id>.json   the record of a container thaw handles (root-only, on tmpfs)
  state_dir/containers/<id>.d/     its work dir: thaw's runc/CRIU logs, the CRIU config file

A record has an explicit phase; each transition is one method here:

  RESTORING --restored()--> RESTORED --started()--> RUNNING      (thaw restored it at create)
      \\--(failure: remove())                                       (then a cold start)
  COLD                                                             (cold start; may auto-capture)

`start` of a RESTORED container is a no-op (runc refuses `start` on the running container that
restore made); poststop or `thaw-runtime delete`, whichever comes first, calls `recovery.finish()`.

The rootfs diff a restore applied stays undoable until that `start`: a create whose success the
shim never saw (thaw-runtime killed after the restore, before it exited 0) is followed by a
delete, which undoes it all; a container that started keeps its files, as with runc.
"""

from __future__ import annotations

import json
import os
import shutil
from enum import StrEnum

from thaw.oci import ThawError
from thaw.oci.files import atomic_write, make_private_dir

from ..drivers.procs import ProcessHandle
from .state_path import record_path

TYPE_CHECKING = False  # no typing import on every start and delete
if TYPE_CHECKING:
    from typing import Any, ClassVar

# json, shutil, time and signal are imported where used. (The runtime's start and delete of every
# container import only state_path, to look for a record; this module once there is one.)


class Phase(StrEnum):
    RESTORING = "restoring"     # thaw-runtime create is restoring it
    RESTORED = "restored"       # restored; the shim's `start` is still to come
    RUNNING = "running"         # restored and started
    COLD = "cold"               # thaw handed it to the next runtime's create


# The one place that says which transition is legal: a record is born RESTORING or COLD and only
# moves forward along a restore. A failed restore's record is removed, never moved back.
_NEXT: dict[Phase | None, frozenset[Phase]] = {
    None: frozenset({Phase.RESTORING, Phase.COLD}),
    Phase.RESTORING: frozenset({Phase.RESTORED}),
    Phase.RESTORED: frozenset({Phase.RUNNING}),
    Phase.RUNNING: frozenset(),
    Phase.COLD: frozenset(),
}


class PhaseError(ThawError):
    """An illegal phase transition: a bug in thaw (never a snapshot's or a caller's doing)."""


def advance(current: Phase | None, to: Phase) -> Phase:
    """`to`, if a record in phase `current` (None: no record yet) may move there."""
    if to not in _NEXT[current]:
        raise PhaseError(f"illegal container phase transition {current} -> {to}")
    return to


class Record:
    """What thaw remembers about one container. (A plain class: see the module's imports.)"""
    id: str
    phase: Phase
    snapshot: str | None
    created: float
    root: str | None
    bundle: str | None
    pid: int | None
    manifest: str | None
    phases: dict[str, float] | None
    cold_reason: str | None
    capture: dict[str, Any] | None
    watcher: dict[str, Any] | None
    captured: str | None
    capture_s: float | None
    owner: dict[str, Any] | None
    undo: str | None
    systemd_cgroup: bool | None
    fill: str | None
    cgroups: list[str] | None
    rootfs: str | None
    pid_file: str | None

    _FIELDS: ClassVar[dict[str, object]] = {
        "phase": None,
        "snapshot": None,      # NAME:TAG asked for
        "created": 0.0,        # epoch seconds of thaw's create
        "root": None,          # runc --root of the caller
        "bundle": None,
        "pid": None,           # restored init pid
        "manifest": None,      # digest of the restored snapshot's manifest
        "phases": None,        # restore timings {name: seconds}
        "cold_reason": None,
        "capture": None,       # auto-capture request {snapshot, ready, quiesce, resume, root}
        "watcher": None,       # auto-capture watcher's process handle {pid, start}
        "captured": None,      # NAME:TAG the watcher published
        "capture_s": None,
        "owner": None,         # the thaw-runtime restoring it {pid, start}: dead owner = stale record
        "undo": None,          # the rootfs diff's undo directory (its journal)
        "systemd_cgroup": None,  # runc's cgroup driver for this container (--systemd-cgroup)
        "fill": None,          # how CRIU filled memory: thaw's CRIU options, or "stock"
        # Written before runc starts, for whoever cleans up after a restore that died: the restore's
        # own cgroup and the container's (every process of the restore is in one of them), the
        # rootfs (its real path: the bundle may be gone), the caller's --pid-file (runc's temp file
        # beside it blocks later creates if runc dies writing it).
        "cgroups": None,
        "rootfs": None,
        "pid_file": None,
    }
    __slots__ = (*tuple(_FIELDS), "id")

    def __init__(self, container_id: str, **values: object) -> None:
        unknown = set(values) - set(self._FIELDS)
        if unknown:
            raise TypeError(f"unknown record fields {sorted(unknown)}")
        self.id = container_id
        for k, default in self._FIELDS.items():
            setattr(self, k, values.get(k, default))
        self.phase = Phase(self.phase)          # ValueError for a phase thaw never writes

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, **{k: getattr(self, k) for k in self._FIELDS}}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Record:
        return cls(str(obj["id"]), **{k: v for k, v in obj.items() if k in cls._FIELDS})


class ContainerState:
    """The state files of one container."""

    def __init__(self, state_dir: str, container_id: str):
        self.path = record_path(state_dir, container_id)
        self.state_dir = state_dir
        self.id = container_id
        self.dir = os.path.dirname(self.path)
        self.work_dir = os.path.join(self.dir, container_id + ".d")

    def exists(self) -> bool:
        return os.path.exists(self.path)

    def read(self) -> Record | None:
        try:
            with open(self.path) as f:
                return Record.from_json(json.load(f))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def write(self, record: Record) -> None:

        make_private_dir(self.dir)
        atomic_write(self.path, json.dumps(record.to_json()).encode(), durable=False)

    def update(self, **fields: object) -> Record | None:
        """Change some fields of an existing record; None if there is none (the container ended)."""
        record = self.read()
        if record is None:
            return None
        for k, v in fields.items():
            if k not in Record._FIELDS or k == "phase":
                raise TypeError(f"record field {k} is not updated this way (phases move by transition)")
            setattr(record, k, v)
        self.write(record)
        return record

    def make_work_dir(self) -> str:

        make_private_dir(self.dir)
        if os.path.exists(self.work_dir):
            shutil.rmtree(self.work_dir)
        os.mkdir(self.work_dir, 0o700)
        return self.work_dir

    # --- transitions ------------------------------------------------------------------------------
    def begin_restore(self, snapshot: str, created: float, bundle: str, root: str | None,
                      systemd_cgroup: bool, undo: str, rootfs: str | None = None,
                      pid_file: str | None = None) -> Record:
        """Written before anything is changed: what a later caller needs to clean up if the
        restoring thaw-runtime dies (its owner handle says whether it did)."""
        record = Record(self.id, phase=advance(None, Phase.RESTORING), snapshot=snapshot, created=created, bundle=bundle,
                        root=root, systemd_cgroup=systemd_cgroup, undo=undo, rootfs=rootfs,
                        pid_file=pid_file, owner=ProcessHandle.me().to_json())
        self.write(record)
        return record

    def restored(self, record: Record, **fields: object) -> Record:
        """The restore is done; its rootfs diff stays undoable (record.undo) until `started()`."""
        if {"phase", "owner"} & set(fields):
            raise TypeError("restored() sets the phase and the owner itself")
        for k, v in fields.items():
            setattr(record, k, v)
        record.phase, record.owner = advance(record.phase, Phase.RESTORED), None
        self.write(record)
        return record

    def started(self) -> bool:
        """The shim's `start` after a restore: True if it is to be a no-op (and now RUNNING).
        The shim saw the create succeed: the rootfs diff is the container's for good."""
        record = self.read()
        if record is None or record.phase != Phase.RESTORED:
            return False
        record.phase = advance(record.phase, Phase.RUNNING)
        self.write(record)
        if record.undo:
            shutil.rmtree(record.undo, ignore_errors=True)
        return True

    def cold(self, created: float, root: str | None, reason: str, snapshot: str | None,
             capture: dict[str, Any] | None, pid_file: str | None = None) -> Record:
        """A cold start: the record names the create (this process, runc after the exec) and its
        --pid-file, so the next call can tell that this create's runc died and what it left."""
        record = Record(self.id, phase=advance(None, Phase.COLD), created=created, root=root, cold_reason=reason,
                        snapshot=snapshot, capture=capture, pid_file=pid_file,
                        owner=ProcessHandle.me().to_json())
        self.write(record)
        return record

    def remove(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        shutil.rmtree(self.work_dir, ignore_errors=True)
