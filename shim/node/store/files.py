"""What every part of the store does to its files: flocks (waited for, polled, or only if free),
removal and sizes."""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Callable, Iterator

from .errors import StoreError


@contextlib.contextmanager
def flock(path: str, mode: int = fcntl.LOCK_EX) -> Iterator[int]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, mode)
        yield fd
    finally:
        os.close(fd)


def lock_free(path: str) -> bool:
    with flock_if_free(path) as free:
        return free


@contextlib.contextmanager
def flock_polled(path: str, cancelled: Callable[[], bool] | None) -> Iterator[int]:
    """An exclusive flock on `path`, waited for in short polls so that `cancelled()` can end the
    wait (a pull's deadline or its sandbox's delete); StoreError then. The lock file gc may
    unlink between our open and our lock is detected and opened again."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if cancelled is not None and cancelled():
                        raise StoreError(f"stopped waiting for {path} (held by another pull)") from None
                    time.sleep(0.1)
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                yield fd
                return
        finally:
            os.close(fd)


@contextlib.contextmanager
def flock_if_free(path: str) -> Iterator[bool]:
    """Hold `path` exclusively for the block if nobody holds it (True), else do not wait (False)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def hex_of(digest: str) -> str:
    return digest.split(":", 1)[1]


def unlink(path: str) -> int:
    """Remove a file; the bytes that freed (0 if it was already gone)."""
    try:
        size = os.lstat(path).st_size
        os.unlink(path)
    except FileNotFoundError:
        return 0
    return size


def file_bytes(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


def tree_bytes(path: str, allocated: bool = False) -> int:
    """The bytes of the files under `path` (apparent sizes, as everything the node cache counts;
    `allocated`: the disk blocks they take, for sparse files being filled)."""
    total = 0
    for d, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                st = os.lstat(os.path.join(d, name))
                total += st.st_blocks * 512 if allocated else st.st_size
    return total


def workers() -> int:
    return max(1, min(16, os.cpu_count() or 1))
