"""A CRIU image directory as a snapshot stores it: which files go whole into a flat tar and which
become file parts (byte ranges), the tar packed and unpacked safely, a range hashed or read as a
stream."""

from __future__ import annotations

import os
import tarfile
from typing import IO, cast

from ..digest import CHUNK, ByteSink, HashingWriter, of_range
from .manifest import IMAGE_NAME
from .media import SnapshotFormatError

# CRIU image files at least this large are stored as parts of at most PART_SIZE bytes.
PART_THRESHOLD = 64 << 20
PART_SIZE = 256 << 20


def criu_dir_entries(src_dir: str) -> list[str]:
    """The files of a CRIU image directory, sorted; anything unexpected is an error."""
    names = sorted(os.listdir(src_dir))
    for name in names:
        path = os.path.join(src_dir, name)
        if not os.path.isfile(path) or os.path.islink(path) or not IMAGE_NAME.match(name):
            raise SnapshotFormatError(f"CRIU image directory holds an unexpected entry: {name}")
    return names


def split_for_parts(sizes: dict[str, int]) -> tuple[list[str], list[tuple[str, int, int]]]:
    """Which CRIU files are stored whole (in the tar) and the (file, offset, length) ranges of
    the others, in manifest order."""
    whole, ranges = [], []
    for name in sorted(sizes):
        size = sizes[name]
        if size < PART_THRESHOLD:
            whole.append(name)
            continue
        for offset in range(0, size, PART_SIZE):
            ranges.append((name, offset, min(PART_SIZE, size - offset)))
    return whole, ranges


def pack_whole_files(src_dir: str, names: list[str], out: ByteSink) -> None:
    """Tar the named CRIU files (flat, regular, sorted, owner root, mtime kept) into `out`."""
    # Stream mode ("w|") only writes; typeshed's tarfile asks every fileobj for read/seek/tell too.
    with tarfile.open(fileobj=cast("IO[bytes]", out), mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for name in names:
            path = os.path.join(src_dir, name)
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            with os.fdopen(fd, "rb") as f:
                st = os.fstat(f.fileno())
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = st.st_size, int(st.st_mtime), 0o600
                tar.addfile(info, f)


def unpack_whole_files(src: IO[bytes], dest_dir: str, limit: int) -> dict[str, str]:
    """Extract a (digest-verified) CRIU tar into dest_dir: flat regular files only, no sparse
    members, at most `limit` bytes in all. Returns each file's digest."""
    try:
        return _unpack_whole_files(src, dest_dir, limit)
    except tarfile.TarError as exc:
        raise SnapshotFormatError(f"CRIU layer is not a valid tar: {exc}") from exc


def _unpack_whole_files(src: IO[bytes], dest_dir: str, limit: int) -> dict[str, str]:
    hashes = {}
    total = 0
    with tarfile.open(fileobj=src, mode="r|") as tar:
        for member in tar:
            if not member.isreg() or member.issparse() or not IMAGE_NAME.match(member.name):
                raise SnapshotFormatError(f"CRIU layer holds an unexpected entry: {member.name!r}")
            total += member.size
            if total > limit:
                raise SnapshotFormatError(f"CRIU layer unpacks to more than its {limit} bytes")
            f = tar.extractfile(member)
            assert f is not None
            fd = os.open(os.path.join(dest_dir, member.name),
                         os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "wb") as out:
                w = HashingWriter(out)
                while chunk := f.read(CHUNK):
                    w.write(chunk)
            if w.size != member.size:
                raise SnapshotFormatError(f"CRIU layer entry {member.name} is truncated")
            hashes[member.name] = w.digest
    return hashes


def hash_range(path: str, offset: int, length: int) -> str:
    """Digest of `length` bytes of `path` at `offset` (a file part)."""
    digest, size = of_range(path, offset, length)
    if size < length:
        raise SnapshotFormatError(f"{path} is shorter than its parts say")
    return digest


class RangeReader:
    """A readable stream of `length` bytes of a file at `offset` (a file part as a blob)."""

    def __init__(self, path: str, offset: int, length: int):
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self._pos, self._end = offset, offset + length

    def read(self, n: int = -1) -> bytes:
        n = self._end - self._pos if n < 0 else min(n, self._end - self._pos)
        data = os.pread(self._fd, n, self._pos) if n > 0 else b""
        self._pos += len(data)
        return data

    def close(self) -> None:
        os.close(self._fd)

    def __enter__(self) -> RangeReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
