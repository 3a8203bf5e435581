"""Cleaning up after a restore that did not finish: a thaw-runtime killed mid-restore (SIGKILL from
a shim's timeout, OOM, its whole process group), or its runc or CRIU killed under it, or a create
that restored but was never seen to succeed (killed before it exited 0; never started).

What may be left: runc and CRIU still running (CRIU's restore runs in a session of its own, so a
process-group kill misses it), processes CRIU restored, runc's restore mounts (criu-root under its
state dir), CRIU's cgroup yard under the work dir, a runc container or half of one, runc's
temporary pid file, the rootfs diff applied to the bundle's rootfs, and thaw's own state. All of
it is found from what the record named before runc started (shim/node/state.py), never from the
process tree: every process of the restore is in the restore's own cgroup or the container's
(shim/node/cgroups.py). The next `create` or `delete` of that id and `thaw doctor --fix` call
`recover()`: afterwards none of it is left and the id works again, or RecoveryError says what is
left (the record stays, so the next call tries again).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import shutil
import signal
import time
from collections.abc import Iterator

from thaw.oci import ThawError
from thaw.oci.spec import Bundle, SpecError

from ..drivers.mounts import MountTable
from ..drivers.procs import ProcessHandle
from ..drivers.rootfs import undo
from ..drivers.runc import Runc, cgroup_dirs, pid_file_temp
from ..node import cgroups, events
from ..node.config import Config
from ..node.state import ContainerState, Phase, Record

_MNT_DETACH = 2


class RecoveryError(ThawError):
    """What a dead restore left could not all be removed."""


def stale(record: Record) -> bool:
    """A RESTORING record whose thaw-runtime is gone (exited, or a zombie not yet reaped)."""
    if record.phase != Phase.RESTORING:
        return False
    owner = ProcessHandle.from_json(record.owner) if record.owner else None
    return owner is None or not owner.alive()


def unstarted(record: Record) -> bool:
    """Restored, but its `start` never came: the shim may never have seen the create succeed
    (its thaw-runtime killed before exiting 0). Deleting it undoes the restore whole."""
    return record.phase == Phase.RESTORED


def dead_create(record: Record) -> bool:
    """A cold start's create (thaw-runtime, then runc by exec) that is no longer running."""
    owner = ProcessHandle.from_json(record.owner) if record.owner else None
    return record.phase == Phase.COLD and owner is not None and not owner.alive()


def before_delete(cfg: Config, container_id: str, force: bool) -> None:
    """What `thaw-runtime delete` of a thaw container does before runc's delete runs: recover a
    dead restore; undo whole a restore that never started (unless runc will refuse the delete: a
    running container without --force); else end the container's state (and remove what a dead
    cold create's runc left). Raises RecoveryError when a cleanup could not finish."""
    record = ContainerState(cfg.state_dir, container_id).read()
    if record is not None and stale(record):
        recover(cfg, container_id, record, "found by delete")
    elif record is not None and unstarted(record):
        if force or not _running(cfg, container_id, record):
            recover(cfg, container_id, record, "deleted before its start")
    else:
        if record is not None:
            dead_create_leftovers(record)
        finish(cfg, container_id, "delete")         # then runc deletes the container


def _running(cfg: Config, container_id: str, record: Record) -> bool:
    st = Runc.with_root(cfg.resolve_next_runtime(), cfg.resolve_criu(), record.root).state(container_id)
    return st is not None and st.get("status") == "running"


def recover(cfg: Config, container_id: str, record: Record, why: str) -> list[str]:
    """Remove everything an unfinished restore of `container_id` left; returns what was cleaned.
    Raises RecoveryError naming what could not be removed."""
    state = ContainerState(cfg.state_dir, container_id)
    with _locked(state) as current:
        if current is None:
            return []                        # another caller (poststop, doctor) got there first
        record = current
        done, left = take_down(cfg, container_id, record)
        undo_dir = record.undo
        if undo_dir and os.path.isdir(undo_dir):
            try:
                _undo_rootfs(record)
                done.append("rootfs diff")
            except (OSError, ValueError, ThawError) as exc:
                left.append(f"rootfs diff not undone ({exc})")
        if left:
            msg = (f"could not clean up after a restore that did not finish ({why}): "
                   f"{'; '.join(left)} (cleaned: {', '.join(done) or 'nothing'})")
            events.emit(cfg, "recovery_failed", msg, container_id, "error", cleaned=done, left=left)
            raise RecoveryError(msg)
        state.remove()
    events.emit(cfg, "recovered", f"cleaned up after a restore that did not finish ({why}): "
                f"{', '.join(done) or 'state only'}", container_id, "warning", cleaned=done)
    return done


def take_down(cfg: Config, container_id: str, record: Record) -> tuple[list[str], list[str]]:
    """Everything of a restore but the rootfs diff and thaw's record: its processes, mounts, runc
    container and runc's leftovers. Returns (what was removed, what is still there)."""
    done: list[str] = []
    left: list[str] = []
    dirs = _cgroup_dirs(record)
    # Processes first: a live CRIU holds the mounts, and runc could still be making the container.
    killed, alive = cgroups.kill_all(dirs)
    if killed:
        done.append(f"{killed} processes")
    if alive:
        left.append(f"processes {sorted(alive)} survived SIGKILL")
    # Mounts before runc deletes anything: runc's restore bind-mounts the rootfs at
    # <root>/<id>/criu-root, and `runc delete` removes <root>/<id> recursively — through that
    # mount, emptying the container's rootfs.
    mounts = _mount_roots(cfg, container_id, record)
    leaked = sorted({m for root, strictly in mounts for m in _mounts_under(root, strictly)}, key=len, reverse=True)
    for m in leaked:
        _umount(m)
    if leaked:
        done.append(f"{len(leaked)} mounts")
    runc = Runc.with_root(cfg.resolve_next_runtime(), cfg.resolve_criu(), record.root)
    if runc.state(container_id) is not None:
        runc.delete_force(container_id)
        if runc.state(container_id) is not None:
            left.append(f"runc container {container_id}")
        else:
            done.append("runc container")
    done += _runc_leftovers(container_id, record)
    still = cgroups.remove(dirs)
    if still:
        left.append(f"cgroups {still}")
    mounted = [m for root, strictly in mounts for m in _mounts_under(root, strictly)]
    if mounted:
        left.append(f"mounts {mounted}")
    return done, left


def dead_create_leftovers(record: Record) -> list[str]:
    """What the runc of a cold start's create that died left and that blocks the next create of
    its id or bundle. Returns what was removed."""
    return _runc_leftovers(record.id, record) if dead_create(record) else []


def _runc_leftovers(container_id: str, record: Record) -> list[str]:
    """runc's half-written state directory (no state.json: runc died before it had a container;
    runc refuses the id while it exists) and its temporary pid file (O_EXCL: it fails every
    later create with that pid file)."""
    done = []
    if record.root:
        leftover = os.path.join(record.root, container_id)
        if (os.path.isdir(leftover) and not os.path.exists(os.path.join(leftover, "state.json"))
                and not _mounts_under(leftover)):
            shutil.rmtree(leftover, ignore_errors=True)
            done.append("runc state directory")
    if record.pid_file:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(pid_file_temp(record.pid_file))
            done.append("runc's temporary pid file")
    return done


def _cgroup_dirs(record: Record) -> list[str]:
    """The restore's cgroup and the container's, as recorded; the container's from its spec for
    a record written before runc started (or by an older thaw)."""
    dirs = [d for d in record.cgroups or [] if isinstance(d, str)]
    if record.bundle:
        with contextlib.suppress(SpecError, OSError):
            dirs += cgroup_dirs(Bundle.load(record.bundle).spec, bool(record.systemd_cgroup))
    return list(dict.fromkeys(dirs))


def _rootfs(record: Record) -> str | None:
    if record.rootfs:
        return record.rootfs
    try:
        return os.path.realpath(Bundle.load(record.bundle).rootfs) if record.bundle else None
    except SpecError:
        return None


def _mount_roots(cfg: Config, container_id: str, record: Record) -> list[tuple[str, bool]]:
    """Where a restore's mounts are: CRIU's cgroup yard in the work dir, runc's criu-root under
    its state dir, runc's mounts inside the rootfs (not the rootfs itself)."""
    roots = [(ContainerState(cfg.state_dir, container_id).work_dir, False)]
    if record.root:
        roots.append((os.path.join(record.root, container_id), False))
    rootfs = _rootfs(record)
    if rootfs:
        roots.append((rootfs, True))
    return roots


def _undo_rootfs(record: Record) -> None:
    rootfs = _rootfs(record)
    if rootfs and os.path.isdir(rootfs) and record.undo:
        undo(rootfs, record.undo)
    elif record.undo:
        shutil.rmtree(record.undo, ignore_errors=True)     # the rootfs is gone: nothing to undo


def finish(cfg: Config, container_id: str, how: str) -> Record | None:
    """The end of a thaw container (from `thaw-runtime delete` or the poststop hook, whichever
    comes first): stop its capture watcher, record a `finished` event with its timings, remove
    its state. Returns the record it found, or None if another caller got there first."""
    try:
        st = ContainerState(cfg.state_dir, container_id)
    except ValueError:
        return None
    record = st.read()
    if record is None:
        st.remove()
        return None
    if record.phase == Phase.RESTORING:
        # runc runs poststop when a restore fails, and a shim may delete while a create runs:
        # the restoring thaw-runtime cleans up itself (or, if it died, recovery does).
        return None
    if record.watcher:
        watcher = ProcessHandle.from_json(record.watcher)
        if watcher is not None:
            watcher.signal(signal.SIGTERM)      # never a process that reused the watcher's pid
    if record.undo:
        settle_rootfs(record)               # a restore never started is undone whole
    now = time.time()
    restored = record.phase in (Phase.RESTORED, Phase.RUNNING)
    events.emit(cfg, "finished", f"{'restored' if restored else 'cold-started'} container ended ({how})",
                container_id, snapshot=record.snapshot, restored=restored,
                cold_reason=record.cold_reason, phases=record.phases, captured=record.captured,
                lifetime_s=round(now - record.created, 3) if record.created else None, by=how)
    st.remove()
    return record


def settle_rootfs(record: Record) -> None:
    """At a container's end (finish): a restore never started is undone, a started one's undo
    directory (if its removal at start was cut short) dropped."""
    if not record.undo or not os.path.isdir(record.undo):
        return
    if unstarted(record):
        _undo_rootfs(record)
    else:
        shutil.rmtree(record.undo, ignore_errors=True)


@contextlib.contextmanager
def _locked(state: ContainerState) -> Iterator[Record | None]:
    """One recovery of a container at a time (a delete and `doctor --fix` may meet): an exclusive
    lock beside its record (records are replaced by rename, so not on the record itself), then
    the record as it is now (None once another caller removed it)."""
    lock = state.path[:-len(".json")] + ".lock"
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError:
        yield state.read()
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield state.read()
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)
        os.close(fd)


def _mounts_under(path: str, strictly: bool = False) -> list[str]:
    return MountTable.read().under(path, strictly)        # read again: each cleanup step changes it


def _umount(path: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.umount2(path.encode(), _MNT_DETACH)
