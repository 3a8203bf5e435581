"""The container's root filesystem diff: what the captured container wrote, and putting it into a
new container's rootfs before restore (undoably, so that a failed restore leaves the rootfs as
the image made it and the cold start sees nothing of thaw).

Capture: with an overlay rootfs (containerd's snapshotters), the diff is the upper directory:
files there were added or changed, whiteouts are deletions. With a plain directory rootfs (a
bare runc bundle) there is no base to compare with: the diff is every entry changed since the
container was created, and deletions cannot be seen.

Apply: every path is resolved inside the rootfs without following symlinks (a rootfs symlink
must never redirect a write to the host); anything replaced or deleted is moved to an undo
directory first.
"""

from __future__ import annotations

import os
import shutil
import stat
import tarfile
from dataclasses import dataclass, field
from typing import IO

from thaw.oci import ThawError


class RootfsError(ThawError):
    pass


# --- capture ------------------------------------------------------------------------------------

def overlay_upperdir(mountpoint: str, mountinfo: str = "/proc/self/mountinfo") -> str | None:
    """The upperdir of the overlay mounted at `mountpoint`, or None if it is not an overlay."""
    target = os.path.realpath(mountpoint)
    found = None
    with open(mountinfo) as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            if _unescape(fields[4]) != target:
                continue
            fstype, options = fields[sep + 1], fields[sep + 3] if len(fields) > sep + 3 else ""
            found = None
            if fstype == "overlay":
                for opt in options.split(","):
                    if opt.startswith("upperdir="):
                        found = _unescape(opt[len("upperdir="):])
    return found  # the last mount on that point is the visible one


def _unescape(path: str) -> str:
    return path.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


@dataclass
class Diff:
    entries: list[str] = field(default_factory=list)   # relative paths, parents before children
    deleted: list[str] = field(default_factory=list)
    source_dir: str = ""
    skipped: list[str] = field(default_factory=list)     # sockets, devices: not carried


def _is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def _opaque(path: str) -> bool:
    for attr in ("trusted.overlay.opaque", "user.overlay.opaque"):
        try:
            if os.getxattr(path, attr, follow_symlinks=False) == b"y":
                return True
        except OSError:
            pass
    return False


def compute_diff(rootfs: str, exclude: list[str], created_after: float | None = None) -> Diff:
    """Collect the rootfs diff. `exclude`: container mount destinations (never part of the diff)."""
    upper = overlay_upperdir(rootfs)
    base = upper or rootfs
    excluded = {e.strip("/") for e in exclude if e.strip("/")}
    diff = Diff(source_dir=base)
    for dirpath, dirnames, filenames in os.walk(base):
        rel_dir = os.path.relpath(dirpath, base)
        rel_dir = "" if rel_dir == "." else rel_dir
        for name in sorted(dirnames) + sorted(filenames):
            rel = os.path.join(rel_dir, name)
            full = os.path.join(dirpath, name)
            if rel in excluded:
                if name in dirnames:
                    dirnames.remove(name)
                continue
            st = os.lstat(full)
            if upper and _is_whiteout(st):
                diff.deleted.append(rel)
                continue
            if stat.S_ISDIR(st.st_mode):
                if upper and _opaque(full):
                    diff.deleted.append(rel)
            elif not (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
                diff.skipped.append(rel)
                continue
            if upper is None and created_after is not None and not stat.S_ISDIR(st.st_mode):
                if max(st.st_ctime, st.st_mtime) < created_after:
                    continue
            diff.entries.append(rel)
        dirnames.sort()
    if upper is None:
        # Keep only directories that lead to a changed entry, or changed themselves.
        keep: set[str] = set()
        for rel in diff.entries:
            if not os.path.isdir(os.path.join(base, rel)) or os.path.islink(os.path.join(base, rel)):
                parts = rel.split("/")
                keep.update("/".join(parts[:i]) for i in range(1, len(parts) + 1))
        diff.entries = [e for e in diff.entries if e in keep]
    return diff


def write_diff_tar(diff: Diff, out: IO[bytes]) -> None:
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for rel in diff.entries:
            full = os.path.join(diff.source_dir, rel)
            info = tar.gettarinfo(full, arcname=rel)
            if info.isreg():
                with open(full, "rb") as f:
                    tar.addfile(info, f)
            else:
                tar.addfile(info)


# --- apply --------------------------------------------------------------------------------------

def _safe_relpath(name: str) -> str:
    rel = os.path.normpath(name.lstrip("/"))
    if rel in ("", ".") or rel.startswith("..") or "/../" in f"/{rel}/":
        raise RootfsError(f"unsafe path in rootfs diff: {name!r}")
    return rel


class RootfsApplier:
    """Applies a diff to `rootfs`, keeping what it displaces in `undo_dir` until commit/undo."""

    def __init__(self, rootfs: str, undo_dir: str):
        self.rootfs = os.path.realpath(rootfs)
        self.undo_dir = undo_dir
        self._created: list[str] = []                  # host paths, in creation order
        self._moved: list[tuple[str, str]] = []        # (original host path, backup path)

    def _parent(self, rel: str) -> str:
        """Host path of rel's parent inside the rootfs; creates missing directories; refuses
        symlinks and non-directories on the way."""
        cur = self.rootfs
        for part in rel.split("/")[:-1]:
            cur = os.path.join(cur, part)
            try:
                st = os.lstat(cur)
            except FileNotFoundError:
                os.mkdir(cur, 0o755)
                self._created.append(cur)
                continue
            if not stat.S_ISDIR(st.st_mode):
                raise RootfsError(f"rootfs diff path {rel!r} crosses a non-directory or symlink at "
                                  f"{os.path.relpath(cur, self.rootfs)!r}")
        return cur

    def _displace(self, path: str) -> None:
        os.makedirs(self.undo_dir, mode=0o700, exist_ok=True)
        backup = os.path.join(self.undo_dir, str(len(self._moved)))
        shutil.move(path, backup)
        self._moved.append((path, backup))

    def delete(self, paths: list[str]) -> None:
        for name in paths:
            rel = _safe_relpath(name)
            target = os.path.join(self._parent_existing(rel), os.path.basename(rel))
            if os.path.lexists(target):
                self._displace(target)

    def _parent_existing(self, rel: str) -> str:
        cur = self.rootfs
        for part in rel.split("/")[:-1]:
            cur = os.path.join(cur, part)
            if os.path.islink(cur) or not os.path.isdir(cur):
                return os.path.join(self.rootfs, "\0missing")  # nothing to delete under it
        return cur

    def apply_tar(self, src: IO[bytes]) -> int:
        """Extract a diff tar stream; returns the number of entries."""
        count = 0
        with tarfile.open(fileobj=src, mode="r|") as tar:
            for member in tar:
                rel = _safe_relpath(member.name)
                target = os.path.join(self._parent(rel), os.path.basename(rel))
                exists = os.path.lexists(target)
                if member.isdir():
                    if exists and os.path.isdir(target) and not os.path.islink(target):
                        continue
                    if exists:
                        self._displace(target)
                    os.mkdir(target, member.mode & 0o7777)
                elif member.isreg():
                    if exists:
                        self._displace(target)
                    f = tar.extractfile(member)
                    assert f is not None
                    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
                    with os.fdopen(fd, "wb") as out:
                        shutil.copyfileobj(f, out, 1 << 20)
                    os.chmod(target, member.mode & 0o7777)
                elif member.issym():
                    if exists:
                        self._displace(target)
                    os.symlink(member.linkname, target)
                else:
                    raise RootfsError(f"rootfs diff entry {member.name!r} has an unsupported type")
                self._created.append(target)
                os.lchown(target, member.uid, member.gid)
                if not member.issym():
                    os.chmod(target, member.mode & 0o7777)  # after chown, which clears setuid
                    os.utime(target, (member.mtime, member.mtime))
                count += 1
        return count

    def undo(self) -> None:
        """Put the rootfs back as it was before apply."""
        for path in reversed(self._created):
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            elif os.path.lexists(path):
                os.unlink(path)
        for path, backup in reversed(self._moved):
            if os.path.lexists(path):
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path)
                else:
                    os.unlink(path)
            shutil.move(backup, path)
        self._created.clear()
        self._moved.clear()
        shutil.rmtree(self.undo_dir, ignore_errors=True)

    def commit(self) -> None:
        shutil.rmtree(self.undo_dir, ignore_errors=True)
        self._created.clear()
        self._moved.clear()
