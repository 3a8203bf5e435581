"""The page cache, seen through a file descriptor: which pages of a range are in it (mincore(2)
on a mapping of the file: a query that starts no I/O), and filling it with only what it lacks.

Warming a file that is already cached by reading it is a copy of the whole file to user memory:
on a warm node, memory bandwidth taken from the restore that runs meanwhile (CRIU's fill, the CUDA
restore, an engine's reload), for nothing.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import os
from collections.abc import Callable

PAGE = mmap.PAGESIZE
_MAP_FAILED = ctypes.c_void_p(-1).value


@functools.cache
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    return libc


def resident(fd: int, off: int, length: int) -> bytes | None:
    """One byte per page of [off, off + length) (from the page holding `off`): 1 where the page
    is in the page cache. None where it cannot be told (the file cannot be mapped)."""
    start = off - off % PAGE
    size = off + length - start
    if size <= 0:
        return b""
    libc = _libc()
    addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, start)
    if addr in (None, _MAP_FAILED):
        return None
    try:
        vec = ctypes.create_string_buffer(-(-size // PAGE))
        if libc.mincore(addr, size, vec) != 0:
            return None
        return vec.raw
    finally:
        libc.munmap(addr, size)


def fill(fd: int, off: int, length: int, buf: bytearray, go: Callable[[], bool] = lambda: True) -> tuple[int, int]:
    """Bring [off, off + length) into the page cache a piece of len(buf) bytes at a time, reading
    only the pieces with a page not already there; stops between pieces when go() turns false, or
    where the file ends. Returns (bytes read, bytes found cached)."""
    end, read, found = off + length, 0, 0
    pages = resident(fd, off, length)
    first = off - off % PAGE
    view = memoryview(buf)
    while off < end and go():
        n = min(len(buf), end - off)
        if pages is not None and b"\x00" not in pages[(off - first) // PAGE:-(-(off + n - first) // PAGE)]:
            off += n
            found += n
            continue
        got = os.preadv(fd, [view[:n]], off)
        if not got:
            break
        off += got
        read += got
    return read, found
