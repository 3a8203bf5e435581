"""Cgroups thaw makes and empties: the one module that writes to cgroupfs.

A restore runs runc (and so CRIU and everything CRIU forks) in a cgroup of its own, made before
runc starts and named in the container's record: whatever dies mid-restore, every process of that
restore is in that cgroup or, once runc moved CRIU there, in the container's own. setsid and
double forks change sessions and parents, never cgroups, so emptying both finds them all.

cgroup v2 (also the unified hierarchy of a hybrid v1 host): the scratch cgroup is a child of this
process's own, so the caller's limits still apply; emptied with cgroup.kill (Linux >= 5.14), else
freeze, SIGKILL each, thaw. cgroup v1 only: the same in the freezer hierarchy (no cgroup.kill).
"""

from __future__ import annotations

import os
import time

from thaw.oci import ThawError

from ..drivers.mounts import MountTable


class CgroupError(ThawError):
    pass


def _own(controller: str) -> str | None:
    """This process's cgroup path in one hierarchy ("" is v2's)."""
    with open("/proc/self/cgroup") as f:
        for line in f:
            _n, names, path = line.rstrip("\n").split(":", 2)
            if (controller == "cgroup2" and names == "") or controller in names.split(","):
                return path
    return None


def scratch_path(name: str, mounts: MountTable | None = None) -> str:
    """Where an empty cgroup `name` goes: below this process's own cgroup (v2, else the v1
    freezer hierarchy), so that the caller's limits still apply to what runs in it."""
    hierarchies = (mounts or MountTable.read()).cgroup_hierarchies()
    for kind in ("cgroup2", "freezer"):
        if kind in hierarchies:
            mountpoint, mount_root = hierarchies[kind]
            own = _own(kind) or "/"
            rel = os.path.relpath(own, mount_root) if own.startswith(mount_root) else "."
            return os.path.normpath(os.path.join(mountpoint, rel, name))
    raise CgroupError("no cgroup v2 or v1 freezer hierarchy is mounted")


def make(path: str) -> None:
    """Create the cgroup `path`; an empty leftover of the same name (a dead process's) is reused."""
    try:
        os.mkdir(path, 0o755)
    except FileExistsError:
        if procs([path]):
            raise CgroupError(f"cgroup {path} exists and is in use") from None
    except OSError as exc:
        raise CgroupError(f"cannot create cgroup {path}: {exc}") from exc


def procs(dirs: list[str]) -> set[int]:
    """Every process in these cgroups and their descendants."""
    found: set[int] = set()
    for d in dirs:
        for sub, _dirs, _files in os.walk(d):
            try:
                with open(os.path.join(sub, "cgroup.procs")) as f:
                    found.update(int(p) for p in f.read().split())
            except (OSError, ValueError):
                pass
    return found


def kill_all(dirs: list[str], timeout: float = 10) -> tuple[int, set[int]]:
    """SIGKILL every process in `dirs` (and below) until they are empty, then remove them.
    Processes may move between these cgroups meanwhile (runc moves CRIU into the container's):
    each round empties all of them. Returns (how many were killed, what is still there)."""
    dirs = [d for d in dirs if os.path.isdir(d)]
    killed: set[int] = set()
    me = os.getpid()
    deadline = time.monotonic() + timeout
    while (left := procs(dirs) - {me}) and time.monotonic() < deadline:
        killed |= left
        for d in dirs:
            for sub, _dirs, files in os.walk(d):
                if "cgroup.kill" in files:
                    _write(os.path.join(sub, "cgroup.kill"), "1")
        freezers = [(d, f, frozen, thawed) for d in dirs
                    for f, frozen, thawed in (("freezer.state", "FROZEN", "THAWED"), ("cgroup.freeze", "1", "0"))
                    if os.path.exists(os.path.join(d, f))]
        for d, f, frozen, _ in freezers:        # nothing forks while each is killed
            _write(os.path.join(d, f), frozen)
        for pid in procs(dirs) - {me}:
            try:
                os.kill(pid, 9)
            except OSError:
                pass
        for d, f, _, thawed in freezers:
            _write(os.path.join(d, f), thawed)
        time.sleep(0.01)
    remove(dirs)
    return len(killed), procs(dirs) - {me}


def remove(dirs: list[str]) -> list[str]:
    """rmdir these cgroups, children first; returns those still there."""
    for d in dirs:
        for sub, _dirs, _files in sorted(os.walk(d), key=lambda w: -len(w[0])):
            try:
                os.rmdir(sub)
            except OSError:
                pass
    return [d for d in dirs if os.path.isdir(d)]


def _write(path: str, value: str) -> None:
    try:
        with open(path, "w") as f:
            f.write(value)
    except OSError:
        pass
