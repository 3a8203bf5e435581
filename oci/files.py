"""File primitives every format is written with: one atomic write, root-only directories.

Imported on the runtime's hot path (config cache, state records): `os` only.
"""

from __future__ import annotations

import os


def atomic_write(path: str, data: bytes, mode: int = 0o600, durable: bool = True) -> None:
    """Replace `path` with `data` so that a reader sees the old or the new content, never a part.

    durable: fsync the file and its directory (the store's files); state on tmpfs skips it.
    """
    d = os.path.dirname(path) or "."
    tmp = os.path.join(d, f".tmp-{os.path.basename(path)}-{os.getpid()}-{os.urandom(4).hex()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fchmod(fd, mode)          # the umask must not widen or narrow it
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    if durable:
        dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def make_private_dir(path: str) -> str:
    """Create `path` and any missing parents root-only (0700): makedirs' mode applies to the
    leaf only, and thaw's state and store must never be readable by others."""
    missing = []
    cur = path
    while cur and cur != "/" and not os.path.isdir(cur):
        missing.append(cur)
        cur = os.path.dirname(cur)
    for d in reversed(missing):
        try:
            os.mkdir(d, 0o700)
        except FileExistsError:
            pass
    return path
