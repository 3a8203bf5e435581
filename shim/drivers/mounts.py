"""The host's mount table (/proc/self/mountinfo), parsed in one place. A create reads it once
(lifecycle/container.py) and every step asks the same table: the rootfs overlay's directories,
the cgroup hierarchies, what is mounted under a directory."""

from __future__ import annotations

from typing import NamedTuple

MOUNTINFO = "/proc/self/mountinfo"


class Mount(NamedTuple):
    root: str            # the mount's root within its filesystem (a bind's source directory)
    point: str           # where it is mounted
    fstype: str
    super_options: tuple[str, ...]


def unescape(path: str) -> str:
    """mountinfo's octal escapes of space, tab, newline and backslash."""
    return path.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


class MountTable:
    def __init__(self, mounts: list[Mount]):
        self.mounts = mounts

    @classmethod
    def read(cls, path: str = MOUNTINFO) -> MountTable:
        mounts = []
        with open(path) as f:
            for line in f:
                fields = line.split()
                sep = fields.index("-")
                mounts.append(Mount(unescape(fields[3]), unescape(fields[4]), fields[sep + 1],
                                    tuple(fields[sep + 3].split(",")) if len(fields) > sep + 3 else ()))
        return cls(mounts)

    def overlay_dirs(self, mountpoint: str) -> tuple[str | None, list[str]]:
        """(upperdir, lowerdirs) of the overlay mounted at `mountpoint` (a real path); (None, [])
        if it is not one. The last mount on that point is the visible one."""
        found: tuple[str | None, list[str]] = (None, [])
        for m in self.mounts:
            if m.point != mountpoint:
                continue
            found = (None, [])
            if m.fstype == "overlay":
                upper, lower = None, []
                for opt in m.super_options:
                    if opt.startswith("upperdir="):
                        upper = unescape(opt[len("upperdir="):])
                    elif opt.startswith("lowerdir="):
                        lower = [unescape(p) for p in opt[len("lowerdir="):].split(":") if p]
                found = (upper, lower)
        return found

    def cgroup_hierarchies(self) -> dict[str, tuple[str, str]]:
        """{"cgroup2" | v1 controller name: (mount point, root of the mount within the hierarchy)},
        the first mount of each."""
        found: dict[str, tuple[str, str]] = {}
        for m in self.mounts:
            if m.fstype == "cgroup2":
                found.setdefault("cgroup2", (m.point, m.root))
            elif m.fstype == "cgroup":
                for opt in m.super_options:
                    found.setdefault(opt, (m.point, m.root))
        return found

    def cgroup_mount_points(self) -> list[str]:
        """Every cgroup hierarchy's mount point, in the table's order (one per mount)."""
        return [m.point for m in self.mounts if m.fstype in ("cgroup", "cgroup2")]

    def under(self, path: str, strictly: bool = False) -> list[str]:
        """Mount points below `path` (and `path` itself unless `strictly`)."""
        prefix = path.rstrip("/") + "/"
        return [m.point for m in self.mounts
                if m.point.startswith(prefix) or (not strictly and m.point == path.rstrip("/"))]
