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
    from .runc import Runc, cgroup_dir
    done = []
    runc = Runc.with_root(cfg.resolve_next_runtime(), cfg.resolve_criu(), record.root)
    bundle = None
    if record.bundle:
        try:
            bundle = Bundle.load(record.bundle)
        except SpecError:
            bundle = None
    if runc.state(container_id) is not None:
        runc.delete_force(container_id)
        done.append("runc container")
    if bundle is not None:
        path = cgroup_dir(bundle.spec, container_id, systemd=bool(record.systemd_cgroup))
        if path and os.path.isdir(path) and _kill_cgroup(path):
            done.append(f"processes of cgroup {path}")
        rootfs = os.path.realpath(bundle.rootfs)
        leaked = _mounts_under(rootfs, strictly=True)
        if record.root:
            leaked += _mounts_under(os.path.join(record.root, container_id))
        for m in sorted(set(leaked), key=len, reverse=True):
            _umount(m)
        if leaked:
            done.append(f"{len(set(leaked))} mounts")
        if record.undo and os.path.isdir(record.undo):
            undo(rootfs, record.undo)
            done.append("rootfs diff")
    if record.root:
        # runc's own half-written state (no state.json: runc died before it had a container)
        leftover = os.path.join(record.root, container_id)
        if os.path.isdir(leftover) and not os.path.exists(os.path.join(leftover, "state.json")):
            shutil.rmtree(leftover, ignore_errors=True)
            done.append("runc state directory")
    ContainerState(cfg.state_dir, container_id).remove()
    events.emit(cfg, "recovered", f"cleaned up after a restore that died ({why}): "
                f"{', '.join(done) or 'state only'}", container_id, "warning", cleaned=done)
    return done


def _kill_cgroup(path: str) -> bool:
    """Kill every process of a (v2) cgroup and remove it; True if any process was there."""
    procs = os.path.join(path, "cgroup.procs")
    try:
        with open(procs) as f:
            had = bool(f.read().split())
    except OSError:
        return False
    try:
        with open(os.path.join(path, "cgroup.kill"), "w") as f:
            f.write("1")
    except OSError:
        for pid in open(procs).read().split():
            try:
                os.kill(int(pid), 9)
            except OSError:
                pass
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            if not open(procs).read().split():
                break
        except OSError:
            break
        time.sleep(0.02)
    for d, _dirs, _files in sorted(os.walk(path, topdown=False), key=lambda w: -len(w[0])):
        try:
            os.rmdir(d)
        except OSError:
            pass
    return had


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
