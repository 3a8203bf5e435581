"""sha256 and its OCI digest form ("sha256:<hex>"): of bytes, of a file (whole, a range, an
open descriptor), of a stream as it passes. The one place thaw hashes (tests/test_shape.py
fails on another module importing hashlib, but for the exceptions it lists)."""

from __future__ import annotations

import hashlib
import os
from typing import Protocol

PREFIX = "sha256:"
CHUNK = 4 << 20


class Hasher:
    """sha256 fed in pieces; `digest` is what came so far, in OCI form; `size` its bytes."""

    __slots__ = ("_h", "size")

    def __init__(self) -> None:
        self._h = hashlib.sha256()
        self.size = 0

    def update(self, data: bytes | memoryview) -> None:
        self._h.update(data)
        self.size += len(data)

    @property
    def digest(self) -> str:
        return PREFIX + self._h.hexdigest()


def sha256_hex(data: bytes) -> str:
    """Plain hex, for what is no OCI digest (a fingerprint's part, a cache key, a log's tag)."""
    return hashlib.sha256(data).hexdigest()


def of_bytes(data: bytes) -> str:
    return PREFIX + hashlib.sha256(data).hexdigest()


def of_file(path: str) -> tuple[str, int]:
    """(digest, size) of a file's content: the one way blobs and cached files are hashed."""
    h = Hasher()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.digest, h.size


def of_range(path: str, offset: int, length: int) -> tuple[str, int]:
    """(digest, size) of `length` bytes of a file at `offset`; fewer bytes where the file ends first."""
    h = Hasher()
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        while h.size < length:
            chunk = os.pread(fd, min(CHUNK, length - h.size), offset + h.size)
            if not chunk:
                break
            h.update(chunk)
    finally:
        os.close(fd)
    return h.digest, h.size


def of_fd(fd: int, buf: bytearray | None = None) -> str:
    """Digest of an open file's content, read from offset 0 (pread: the descriptor may be shared)."""
    h = Hasher()
    buf = buf or bytearray(CHUNK)
    view, off = memoryview(buf), 0
    while n := os.preadv(fd, [buf], off):
        h.update(view[:n])
        off += n
    return h.digest


class ByteSink(Protocol):
    """What HashingWriter writes to: a binary file, or a positional writer of one fd."""

    def write(self, data: bytes, /) -> int: ...

    def flush(self) -> None: ...


class HashingWriter:
    """A file-like sink that hashes what passes through it (for tar streams into a blob)."""

    def __init__(self, f: ByteSink):
        self._f = f
        self._h = Hasher()

    def write(self, data: bytes) -> int:
        self._h.update(data)
        return self._f.write(data)

    def flush(self) -> None:
        self._f.flush()

    @property
    def size(self) -> int:
        return self._h.size

    @property
    def digest(self) -> str:
        return self._h.digest
