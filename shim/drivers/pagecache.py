"""The page cache, seen through a file descriptor: whether a range of a file is in it, probed
without blocking, and filling it with only what it lacks.

Warming a file that is already cached by reading it is a copy of the whole file to user memory:
on a warm node, memory bandwidth taken from the restore that runs meanwhile (CRIU's fill, the CUDA
restore, an engine's reload), for nothing.
"""

from __future__ import annotations

import os
from collections.abc import Callable

PROBE = 2 << 20          # a range counts as cached when a byte every PROBE is (RWF_NOWAIT reads)


def cached(fd: int, off: int, length: int) -> bool:
    """Whether [off, off + length) is in the page cache, probed a byte every PROBE without
    blocking (RWF_NOWAIT: EAGAIN where a read would wait for the disk). A hole between probes
    only costs its reader a disk read later; any error counts as not cached."""
    probe = bytearray(1)
    for at in [*range(off, off + length, PROBE), off + length - 1]:
        try:
            if os.preadv(fd, [probe], at, os.RWF_NOWAIT) != 1:
                return False
        except OSError:
            return False
    return True


def fill(fd: int, off: int, length: int, buf: bytearray,
         go: Callable[[], bool] = lambda: True) -> tuple[int, int]:
    """Bring [off, off + length) into the page cache a piece of len(buf) bytes at a time, reading
    only the pieces not already there; stops between pieces when go() turns false, or where the
    file ends. Returns (bytes read, bytes found cached)."""
    end, read, found = off + length, 0, 0
    view = memoryview(buf)
    while off < end and go():
        n = min(len(buf), end - off)
        if cached(fd, off, n):
            off += n
            found += n
            continue
        got = os.preadv(fd, [view[:n]], off)
        if not got:
            break
        off += got
        read += got
    return read, found
