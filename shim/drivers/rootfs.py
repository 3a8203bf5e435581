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

import json
import os
import shutil
import stat
import tarfile
from dataclasses import dataclass, field
from typing import IO, Any

from thaw.oci import ThawError

from .mounts import MountTable


class RootfsError(ThawError):
    pass


# --- capture ------------------------------------------------------------------------------------
# The container runs again while its diff is read (and may be hostile): every entry is reached
# through a descriptor of its parent directory, one name at a time, never following a symlink
# (O_NOFOLLOW), and what is written is what fstat says of the opened descriptor. A directory
# swapped for a symlink to a host path between listing and reading cannot redirect the read: the
# open fails (and the capture with it) instead of reaching the host.

def overlay_dirs(mountpoint: str, mounts: MountTable | None = None) -> tuple[str | None, list[str]]:
    """(upperdir, lowerdirs) of the overlay mounted at `mountpoint`; (None, []) if it is not one.
    `mounts`: the create's mount table (default: read now)."""
    return (mounts or MountTable.read()).overlay_dirs(os.path.realpath(mountpoint))


@dataclass
class Diff:
    entries: int = 0                                   # tar entries written
    deleted: list[str] = field(default_factory=list)   # paths the container deleted (overlay only)
    skipped: list[str] = field(default_factory=list)   # sockets, devices, fifos: not carried


def _is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def _opaque(fd: int) -> bool:
    for attr in ("trusted.overlay.opaque", "user.overlay.opaque"):
        try:
            if os.getxattr(fd, attr) == b"y":
                return True
        except OSError:
            pass
    return False


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class _DiffWriter:
    """Walks a rootfs (or its overlay upper dir) by descriptors and streams the diff as a tar."""

    def __init__(self, tar: tarfile.TarFile, overlay: bool, excluded: set[str], created_after: float | None):
        self.tar, self.overlay, self.excluded, self.created_after = tar, overlay, excluded, created_after
        self.diff = Diff()
        self._pending: list[tuple[str, os.stat_result]] = []    # ancestors not yet written (plain mode)

    def walk(self, dir_fd: int, rel_dir: str) -> None:
        for name in sorted(os.listdir(dir_fd)):
            rel = f"{rel_dir}/{name}" if rel_dir else name
            if rel in self.excluded:
                continue
            try:
                self._entry(dir_fd, name, rel)
            except RootfsError:
                raise
            except OSError as exc:      # gone, or not what it was a moment ago
                raise RootfsError(f"rootfs changed during capture at {rel}: {exc.strerror}") from exc

    def _entry(self, dir_fd: int, name: str, rel: str) -> None:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if self.overlay and _is_whiteout(st):
            self.diff.deleted.append(rel)
        elif stat.S_ISDIR(st.st_mode):
            self._directory(dir_fd, name, rel)
        elif stat.S_ISLNK(st.st_mode):
            if self._changed(st):
                info = self._info(rel, st, tarfile.SYMTYPE)
                info.linkname = os.readlink(name, dir_fd=dir_fd)
                self._emit(info)
        elif stat.S_ISREG(st.st_mode):
            if self._changed(st):
                self._file(dir_fd, name, rel)
        else:
            self.diff.skipped.append(rel)

    def _directory(self, parent_fd: int, name: str, rel: str) -> None:
        try:
            fd = os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
        except OSError as exc:
            raise RootfsError(f"rootfs changed during capture: {rel} is no longer a directory ({exc.strerror})") from exc
        try:
            st = os.fstat(fd)
            if self.overlay and _opaque(fd):
                self.diff.deleted.append(rel)      # an opaque dir hides everything below it
            if self.overlay:
                self._emit(self._info(rel, st, tarfile.DIRTYPE))
                self.walk(fd, rel)
            else:
                self._pending.append((rel, st))
                self.walk(fd, rel)
                if self._pending and self._pending[-1][0] == rel:
                    self._pending.pop()            # nothing below it changed
        finally:
            os.close(fd)

    def _file(self, parent_fd: int, name: str, rel: str) -> None:
        try:
            fd = os.open(name, _FILE_FLAGS, dir_fd=parent_fd)
        except OSError as exc:
            raise RootfsError(f"rootfs changed during capture: {rel} cannot be opened as a file ({exc.strerror})") from exc
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                self.diff.skipped.append(rel)
                return
            self._emit(self._info(rel, st, tarfile.REGTYPE), _ExactReader(fd, st.st_size, rel))
        finally:
            os.close(fd)

    def _changed(self, st: os.stat_result) -> bool:
        """Plain-directory rootfs: only what changed since the container was created."""
        return self.overlay or self.created_after is None or max(st.st_ctime, st.st_mtime) >= self.created_after

    def _info(self, rel: str, st: os.stat_result, kind: bytes) -> tarfile.TarInfo:
        info = tarfile.TarInfo(rel)
        info.type = kind
        info.mode, info.uid, info.gid = stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid
        info.mtime = int(st.st_mtime)
        info.size = st.st_size if kind == tarfile.REGTYPE else 0
        return info

    def _emit(self, info: tarfile.TarInfo, data: Any = None) -> None:
        for rel, st in self._pending:               # parents first
            self.tar.addfile(self._info(rel, st, tarfile.DIRTYPE))
            self.diff.entries += 1
        self._pending.clear()
        self.tar.addfile(info, data)
        self.diff.entries += 1


class _ExactReader:
    """Reads exactly `size` bytes of an open file; a file that shrank while it was read fails the
    capture instead of producing a tar that does not match what the container had."""

    def __init__(self, fd: int, size: int, rel: str):
        self.fd, self.left, self.offset, self.rel = fd, size, 0, rel

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        data = os.pread(self.fd, n, self.offset) if n else b""
        if len(data) < n:
            raise RootfsError(f"rootfs changed during capture: {self.rel} shrank while it was read")
        self.offset += len(data)
        self.left -= len(data)
        return data


def write_diff(rootfs: str, exclude: list[str], out: IO[bytes], created_after: float | None = None) -> Diff:
    """Stream the container's rootfs diff as a tar into `out`. With an overlay rootfs
    (containerd's snapshotters) the diff is the upper directory, whiteouts and opaque directories
    are deletions; with a plain directory it is what changed since `created_after`, and deletions
    cannot be seen. `exclude`: mount destinations (never part of the diff)."""
    upper, _ = overlay_dirs(rootfs)
    excluded = {e.strip("/") for e in exclude if e.strip("/")}
    root_fd = os.open(upper or rootfs, _DIR_FLAGS)
    try:
        with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            writer = _DiffWriter(tar, upper is not None, excluded, created_after)
            writer.walk(root_fd, "")
    finally:
        os.close(root_fd)
    return writer.diff


# --- apply --------------------------------------------------------------------------------------

def lexists_beneath(rootfs: str, path: str) -> bool | None:
    """Whether `path` names an entry in `rootfs`, looked up one component at a time from the
    rootfs's descriptor without following a link (the rootfs is the container's: a link in it is
    the container's word). None where that cannot be told without following one: a link (or a
    `..`) on the way."""
    parts = [p for p in path.split("/") if p and p != "."]
    if ".." in parts:
        return None
    try:
        fd = os.open(rootfs, _DIR_FLAGS)
    except OSError:
        return None
    try:
        for i, name in enumerate(parts):
            try:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                return False
            if i == len(parts) - 1:
                return True
            if stat.S_ISLNK(st.st_mode):
                return None
            if not stat.S_ISDIR(st.st_mode):
                return False
            try:
                child = os.open(name, _DIR_FLAGS, dir_fd=fd)   # O_NOFOLLOW: a link swapped in fails
            except OSError:
                return None
            os.close(fd)
            fd = child
        return True
    finally:
        os.close(fd)


def _safe_relpath(name: str) -> str:
    rel = os.path.normpath(name.lstrip("/"))
    if rel in ("", ".") or rel.startswith("..") or "/../" in f"/{rel}/":
        raise RootfsError(f"unsafe path in rootfs diff: {name!r}")
    return rel


def undo_dir_for(rootfs: str, container_id: str, mounts: MountTable | None = None) -> str:
    """Where a restore keeps what it displaces: on the file system backing the rootfs (moves
    stay renames, nothing lands in state_dir's RAM) and outside the container's view — beside
    the overlay's upper directory, or beside a plain rootfs directory in the bundle."""
    upper, _ = overlay_dirs(rootfs, mounts)
    base = os.path.dirname(upper) if upper else os.path.dirname(os.path.realpath(rootfs))
    return os.path.join(base, f".thaw-undo-{container_id}")


class RootfsApplier:
    """Applies a diff to `rootfs` so that it can be undone, even by another process after this
    one died: every change is written to `undo_dir/journal` before it is made.

    What a change displaces is kept in `undo_dir` — except, on an overlay, an entry that comes from
    the image's (read-only) lower layers: removing it only hides it, and undo copies it back from
    the lower layer, so nothing is copied unless a restore fails."""

    def __init__(self, rootfs: str, undo_dir: str, mounts: MountTable | None = None):
        self.rootfs = os.path.realpath(rootfs)
        self.undo_dir = undo_dir
        self.upper, self.lowers = overlay_dirs(self.rootfs, mounts)
        self._journal: IO[str] | None = None
        self._backups = 0

    # --- the journal ------------------------------------------------------------------------------
    def _log(self, op: str, rel: str, backup: str = "") -> None:
        if self._journal is None:
            os.makedirs(self.undo_dir, mode=0o700, exist_ok=True)
            self._journal = open(os.path.join(self.undo_dir, "journal"), "a")  # noqa: SIM115 - open across calls; _close() ends it
        # Before the change: a process killed right after it still finds it listed (the page
        # cache outlives the process; a lost machine loses the container anyway).
        self._journal.write(json.dumps({"op": op, "path": rel, "backup": backup}) + "\n")
        self._journal.flush()

    def _close(self) -> None:
        if self._journal is not None:
            self._journal.close()
            self._journal = None

    # --- applying ---------------------------------------------------------------------------------
    def _parent(self, rel: str) -> str:
        """Host path of rel's parent inside the rootfs; creates missing directories; refuses
        symlinks and non-directories on the way."""
        cur = self.rootfs
        parts = rel.split("/")[:-1]
        for i, part in enumerate(parts):
            cur = os.path.join(cur, part)
            try:
                st = os.lstat(cur)
            except FileNotFoundError:
                self._log("created", "/".join(parts[:i + 1]))
                os.mkdir(cur, 0o755)
                continue
            if not stat.S_ISDIR(st.st_mode):
                raise RootfsError(f"rootfs diff path {rel!r} crosses a non-directory or symlink at "
                                  f"{os.path.relpath(cur, self.rootfs)!r}")
        return cur

    def _from_lower(self, rel: str) -> bool:
        """On an overlay whose upper layer has nothing at rel: the entry is the image's own."""
        return self.upper is not None and not os.path.lexists(os.path.join(self.upper, rel))

    def _displace(self, rel: str, path: str) -> None:
        if self._from_lower(rel):
            self._log("lower", rel)
            _remove(path)
            return
        self._backups += 1
        backup = str(self._backups)
        self._log("moved", rel, backup)
        shutil.move(path, os.path.join(self.undo_dir, backup))

    def delete(self, paths: list[str]) -> None:
        for name in paths:
            rel = _safe_relpath(name)
            target = os.path.join(self._parent_existing(rel), os.path.basename(rel))
            if os.path.lexists(target):
                self._displace(rel, target)

    def _parent_existing(self, rel: str) -> str:
        cur = self.rootfs
        for part in rel.split("/")[:-1]:
            cur = os.path.join(cur, part)
            if os.path.islink(cur) or not os.path.isdir(cur):
                return os.path.join(self.rootfs, "\0missing")  # nothing to delete under it
        return cur

    def apply_tar(self, src: IO[bytes]) -> int:
        """Extract a diff tar stream; returns the number of entries. A sparse member is refused:
        it would let a few stored bytes expand into a large file in the container's rootfs, while
        every other member writes no more than the (digest-verified) layer holds."""
        count = 0
        with tarfile.open(fileobj=src, mode="r|") as tar:
            for member in tar:
                if member.issparse():
                    raise RootfsError(f"rootfs diff entry {member.name!r} is sparse")
                rel = _safe_relpath(member.name)
                target = os.path.join(self._parent(rel), os.path.basename(rel))
                exists = os.path.lexists(target)
                if member.isdir() and exists and os.path.isdir(target) and not os.path.islink(target):
                    continue
                if not (member.isdir() or member.isreg() or member.issym()):
                    raise RootfsError(f"rootfs diff entry {member.name!r} has an unsupported type")
                if exists:
                    self._displace(rel, target)
                self._log("created", rel)
                if member.isdir():
                    os.mkdir(target, member.mode & 0o7777)
                elif member.isreg():
                    f = tar.extractfile(member)
                    assert f is not None
                    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
                    with os.fdopen(fd, "wb") as out:
                        shutil.copyfileobj(f, out, 1 << 20)
                else:
                    os.symlink(member.linkname, target)
                os.lchown(target, member.uid, member.gid)
                if not member.issym():
                    os.chmod(target, member.mode & 0o7777)  # after chown, which clears setuid
                    os.utime(target, (member.mtime, member.mtime))
                count += 1
        return count

    # --- ending -----------------------------------------------------------------------------------
    def undo(self) -> None:
        """Put the rootfs back as it was before apply (from the journal, so also after a crash)."""
        self._close()
        undo(self.rootfs, self.undo_dir)

    def close(self) -> None:
        """Done applying: the journal stays, for whoever undoes it later (shim/node/state.py)."""
        self._close()

    def commit(self) -> None:
        self._close()
        shutil.rmtree(self.undo_dir, ignore_errors=True)


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)


def undo(rootfs: str, undo_dir: str) -> None:
    """Reverse the changes `undo_dir/journal` lists, newest first, then drop undo_dir. Tolerates
    a journal whose last change was never made (the process died in between)."""
    try:
        with open(os.path.join(undo_dir, "journal")) as f:
            entries = [json.loads(line) for line in f if line.strip().endswith("}")]
    except FileNotFoundError:
        entries = []
    rootfs = os.path.realpath(rootfs)
    upper, lowers = overlay_dirs(rootfs)
    for e in reversed(entries):
        rel = _safe_relpath(e["path"])
        path = os.path.join(rootfs, rel)
        if e["op"] == "created":
            _remove(path)
        elif e["op"] == "moved":
            backup = os.path.join(undo_dir, e["backup"])
            if os.path.lexists(backup):
                _remove(path)
                shutil.move(backup, path)
        elif e["op"] == "lower" and upper and os.path.lexists(os.path.join(upper, rel)):
            _remove(path)
            _copy_from_lower(rel, path, lowers)
    shutil.rmtree(undo_dir, ignore_errors=True)


def _copy_from_lower(rel: str, dest: str, lowers: list[str]) -> None:
    """Bring an image entry back into view: copy it from the topmost lower layer that has it
    (contents, modes, owners, times, symlinks as symlinks)."""
    for lower in lowers:
        src = os.path.join(lower, rel)
        if os.path.lexists(src):
            break
    else:
        return
    if os.path.isdir(src) and not os.path.islink(src):
        shutil.copytree(src, dest, symlinks=True, copy_function=_copy_owned)
        for d, _dirs, _files in os.walk(src):      # copytree leaves directories root's, 0755
            target = os.path.normpath(os.path.join(dest, os.path.relpath(d, src)))
            st = os.lstat(d)
            os.lchown(target, st.st_uid, st.st_gid)
            os.chmod(target, stat.S_IMODE(st.st_mode))
            os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    else:
        _copy_owned(src, dest)


def _copy_owned(src: str, dest: str) -> None:
    shutil.copy2(src, dest, follow_symlinks=False)
    st = os.lstat(src)
    os.lchown(dest, st.st_uid, st.st_gid)
    if not stat.S_ISLNK(st.st_mode):
        os.chmod(dest, stat.S_IMODE(st.st_mode))   # after chown, which clears setuid
