"""Cleaning up after a thaw-runtime that died mid-restore (SIGKILL from a shim's timeout, OOM).

Its record is RESTORING with an owner handle that is gone. What may be left: a runc container
(runc finished the restore after its parent died), processes CRIU restored into the container's
cgroup that runc never recorded (runc and CRIU died too), runc's restore mounts, the rootfs diff
applied to the bundle's rootfs, and thaw's own state. The next `create` or `delete` of that id and
`thaw doctor --fix` call `recover()`: afterwards none of it is left and the id works again.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import time

from . import events
from .config import Config
from .procs import ProcessHandle
from .state import ContainerState, Phase, Record

_MNT_DETACH = 2


def stale(record: Record) -> bool:
    """A RESTORING record whose thaw-runtime is gone."""
    if record.phase != Phase.RESTORING:
        return False
    owner = ProcessHandle.from_json(record.owner) if record.owner else None
    return owner is None or not owner.alive()


def recover(cfg: Config, container_id: str, record: Record, why: str) -> list[str]:
    """Remove everything a dead restore of `container_id` left; returns what was cleaned."""
    from thaw.oci.spec import Bundle, SpecError

    from .rootfs import undo
    from .runc import Runc, cgroup_dirs
    done = []
    runc = Runc.with_root(cfg.resolve_next_runtime(), cfg.resolve_criu(), record.root)
    bundle = None
    if record.bundle:
        try:
            bundle = Bundle.load(record.bundle)
        except SpecError:
            bundle = None
    # Mounts first: runc's restore bind-mounts the rootfs at <root>/<id>/criu-root, and a runc
    # that dies mid-restore leaves it there; `runc delete` then removes <root>/<id> recursively —
    # through that mount, emptying the container's rootfs. So runc's restore mounts (criu-root,
    # the spec's bind mounts under the rootfs) and CRIU's cgroup yard in the work dir go before
    # runc is asked to delete anything.
    rootfs = os.path.realpath(bundle.rootfs) if bundle is not None else None
    leaked = _mounts_under(ContainerState(cfg.state_dir, container_id).work_dir)
    if record.root:
        leaked += _mounts_under(os.path.join(record.root, container_id))
    if rootfs:
        leaked += _mounts_under(rootfs, strictly=True)
    for m in sorted(set(leaked), key=len, reverse=True):
        _umount(m)
    if leaked:
        done.append(f"{len(set(leaked))} mounts")
    if runc.state(container_id) is not None:
        runc.delete_force(container_id)
        done.append("runc container")
    if bundle is not None and rootfs is not None:
        dirs = [d for d in cgroup_dirs(bundle.spec, bool(record.systemd_cgroup)) if os.path.isdir(d)]
        if dirs:
            killed = _kill_cgroup(dirs)
            done.append(f"cgroup {dirs[0].split('/', 4)[-1]}" + (f" and {killed} processes" if killed else ""))
        if record.undo and os.path.isdir(record.undo):
            undo(rootfs, record.undo)
            done.append("rootfs diff")
    if record.root:
        # runc's own half-written state (no state.json: runc died before it had a container)
        leftover = os.path.join(record.root, container_id)
        if (os.path.isdir(leftover) and not os.path.exists(os.path.join(leftover, "state.json"))
                and not _mounts_under(leftover)):
            shutil.rmtree(leftover, ignore_errors=True)
            done.append("runc state directory")
    ContainerState(cfg.state_dir, container_id).remove()
    events.emit(cfg, "recovered", f"cleaned up after a restore that died ({why}): "
                f"{', '.join(done) or 'state only'}", container_id, "warning", cleaned=done)
    return done


def _kill_cgroup(dirs: list[str]) -> int:
    """Kill every process of a container's cgroup (in all its hierarchies) and remove it.
    v2: cgroup.kill. v1: freeze (so nothing forks meanwhile), SIGKILL each, thaw. Returns how
    many processes there were."""
    def pids() -> set[int]:
        found: set[int] = set()
        for d in dirs:
            for sub, _dirs, _files in os.walk(d):
                try:
                    with open(os.path.join(sub, "cgroup.procs")) as f:
                        found.update(int(p) for p in f.read().split())
                except (OSError, ValueError):
                    pass
        return found
    first = pids()
    freezer = next((d for d in dirs if os.path.exists(os.path.join(d, "freezer.state"))), None)
    deadline = time.monotonic() + 10
    while (left := pids()) and time.monotonic() < deadline:
        killer = next((d for d in dirs if os.path.exists(os.path.join(d, "cgroup.kill"))), None)
        if killer:
            _write(os.path.join(killer, "cgroup.kill"), "1")
        else:
            if freezer:
                _write(os.path.join(freezer, "freezer.state"), "FROZEN")
            for pid in left:
                try:
                    os.kill(pid, 9)
                except OSError:
                    pass
            if freezer:
                _write(os.path.join(freezer, "freezer.state"), "THAWED")
        time.sleep(0.02)
    for d in dirs:
        for sub, _dirs, _files in sorted(os.walk(d), key=lambda w: -len(w[0])):
            try:
                os.rmdir(sub)
            except OSError:
                pass
    return len(first)


def _write(path: str, value: str) -> None:
    try:
        with open(path, "w") as f:
            f.write(value)
    except OSError:
        pass


def _mounts_under(path: str, strictly: bool = False) -> list[str]:
    prefix = path.rstrip("/") + "/"
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = line.split()[4].replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")
            if mp.startswith(prefix) or (not strictly and mp == path.rstrip("/")):
                out.append(mp)
    return out


def _umount(path: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.umount2(path.encode(), _MNT_DETACH)
