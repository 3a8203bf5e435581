"""Before CRIU runs: the mount tree of the snapshot's images against the spec's. CRIU makes every
mount its mountpoints-*.img lists, with the flags the images say; runc maps only the spec's bind
mounts and masks in, as external mounts keyed by destination."""

from __future__ import annotations

import os
from typing import Any

from ...drivers import criu_images
from ...drivers.criu_images import Images
from ...drivers.rootfs import lexists_beneath
from .grant import Excess


def _clean(path: str) -> str:
    return os.path.normpath("/" + path.lstrip("/"))


def _is_bind(m: dict[str, Any]) -> bool:
    return m.get("type") == "bind" or bool({"bind", "rbind"} & set(m.get("options") or []))


def _same_type(e: criu_images.ImageMount, m: dict[str, Any]) -> bool:
    """Whether CRIU would make the spec mount `m`'s kind of filesystem (auto: by name, from the
    spec's own source only)."""
    if e.fstype in criu_images.MOUNT_FSTYPES.get(m.get("type", ""), ()):
        return True
    return e.fstype == criu_images.FSTYPE_AUTO and e.fsname == m.get("type") and e.source == m.get("source")


def mount_excess(images: Images, spec: dict[str, Any]) -> list[Excess]:
    """The images' mount tree against the spec's: CRIU makes every mount its images list (runc
    maps the spec's bind mounts and masks in as external ones, keyed by destination), so a forged
    entry could unmask a masked path, make a read-only one writable, or mount what the spec never
    asked for (a host disk: fstype auto). Every entry must be one the spec makes — the root, a
    spec mount of its type (a bind: external under its destination's key), a mask (/dev/null or a
    read-only tmpfs), a read-only path — with MS_RDONLY where the spec makes it read-only; every
    masked or read-only path that exists on this node (the same kernel: fingerprint.py) must be
    there. A mount the container made itself, or a submount under an rbind, is refused too
    (cold start: not provable from the spec)."""
    linux = spec.get("linux") or {}
    masked = {_clean(p) for p in linux.get("maskedPaths") or []}
    readonly = {_clean(p) for p in linux.get("readonlyPaths") or []}
    mounts = {_clean(m["destination"]): m for m in spec.get("mounts") or [] if m.get("destination")}
    root_ro = bool((spec.get("root") or {}).get("readonly"))
    terminal = bool((spec.get("process") or {}).get("terminal"))
    pid = images.tasks[0].pid if images.tasks else 0
    out: list[Excess] = []

    def add(mp: str, what: str, snap: str, want: str) -> None:
        out.append(Excess(pid, pid, f"mount {mp}{what}", snap, want))
    seen: set[str] = set()
    for e in images.mounts:
        mp = _clean(e.mountpoint)
        seen.add(mp)
        ro = bool((e.flags | e.sb_flags) & criu_images.MS_RDONLY)
        if mp == "/":
            if root_ro and not ro:
                add(mp, "", "writable", "read-only (root.readonly)")
        elif mp in masked:
            if not (e.ext_key == "/dev/null" or (e.fstype == criu_images.FSTYPE_TMPFS and ro)):
                add(mp, " (maskedPaths)", f"a mount of {e.fsname or e.fstype} {e.ext_key or e.source}",
                    "masked: /dev/null or a read-only tmpfs")
        elif mp in readonly:
            if not ro:
                add(mp, " (readonlyPaths)", "writable", "read-only")
        elif mp in mounts:
            m = mounts[mp]
            if _is_bind(m):
                if e.ext_key != mp:
                    add(mp, "", f"{'external ' + repr(e.ext_key) if e.ext_key else 'not external'}",
                        f"the spec's bind mount of {m.get('source')!r} (external {mp!r})")
            elif m.get("type") == "cgroup" and e.fstype == criu_images.FSTYPE_TMPFS and e.ext_key is None:
                # cgroup v1: runc's tmpfs holding a bind per hierarchy (each checked below); the
                # images of a real capture record it writable even under "ro": nothing but
                # runc's empty directories in it
                continue
            elif e.ext_key is not None or not _same_type(e, m):
                add(mp, "", f"fstype {e.fsname or e.fstype} source {e.ext_key or e.source!r}",
                    f"{m.get('type')} from {m.get('source')!r}")
            if "ro" in (m.get("options") or []) and not ro:
                add(mp, "", "writable", "read-only (options: ro)")
        elif (e.fstype == criu_images.FSTYPE_CGROUP and e.ext_key in (None, mp) and os.path.dirname(mp) in mounts
              and mounts[os.path.dirname(mp)].get("type") == "cgroup"):
            # cgroup v1: runc binds each hierarchy below the spec's cgroup mount (external under its
            # destination), read-only where that mount is
            if "ro" in (mounts[os.path.dirname(mp)].get("options") or []) and not ro:
                add(mp, "", "writable", "read-only (the cgroup mount's options: ro)")
        elif mp == "/dev/console" and terminal and e.fstype == criu_images.FSTYPE_DEVPTS and e.ext_key is None:
            pass                                         # runc binds the container's pty there
        else:
            add(mp, "", f"a mount of {e.fsname or e.fstype} {e.ext_key or e.source!r}",
                "no such mount in the spec")
    for mp in sorted((masked | readonly) - seen):      # the rest: unproven_masks (the rootfs decides)
        if mp.startswith(("/proc/", "/sys/")) and os.path.lexists(mp):
            add(mp, " (maskedPaths)" if mp in masked else " (readonlyPaths)", "absent from the images",
                "masked" if mp in masked else "read-only")
    return out


def unproven_masks(images: Images, spec: dict[str, Any]) -> dict[str, str]:
    """The spec's masked and read-only paths outside /proc and /sys that the images have no mount
    for (path -> "maskedPaths" or "readonlyPaths"). runc masks only what exists in the rootfs, so
    the images prove nothing about these: each must be absent from the restored rootfs
    (rootfs_mask_excess, once the snapshot's rootfs diff is in), or the restore would leave it
    unmasked or writable."""
    linux = spec.get("linux") or {}
    seen = {_clean(e.mountpoint) for e in images.mounts}
    out: dict[str, str] = {}
    for key in ("readonlyPaths", "maskedPaths"):
        for p in linux.get(key) or []:
            mp = _clean(p)
            if mp not in seen and mp not in ("/proc", "/sys") and not mp.startswith(("/proc/", "/sys/")):
                out[mp] = key
    return out


def rootfs_mask_excess(unproven: dict[str, str], spec: dict[str, Any], rootfs: str) -> str | None:
    """After the snapshot's rootfs diff, before runc: why one of `unproven` (unproven_masks) would
    be left unmasked, or None. Safe only where the path is absent from the restored rootfs (runc
    would have skipped it too), looked up without following the container's links; a path below
    one of the spec's mounts (a bind of host files, a tmpfs whose contents CRIU restores) cannot be
    looked up there: not provable."""
    dests = sorted({_clean(m["destination"]) for m in spec.get("mounts") or [] if m.get("destination")} - {"/"})
    for path, key in sorted(unproven.items()):
        under = [d for d in dests if path == d or path.startswith(d + "/")]
        if under:
            return (f"mount {path} ({key}): absent from the images and below the spec's mount "
                    f"{under[-1]}, where the rootfs cannot show it absent")
        found = lexists_beneath(rootfs, path)
        if found is not False:
            return (f"mount {path} ({key}): absent from the images, but "
                    + ("the restored rootfs has it" if found else "the restored rootfs reaches it through a link"))
    return None
