"""File primitives every format is written with: one atomic write (whole bytes, or streamed
through AtomicFile), root-only directories.

Imported on the runtime's hot path (config cache, state records): `os` only.
"""

from __future__ import annotations

import os


class AtomicFile:
    """A file that replaces `path` only once all of it is written: `with AtomicFile(path) as f:
    f.write(...)`. A clean exit sets its mode, fsyncs it (durable) and renames it over `path`
    (then fsyncs the directory); an exception removes it and leaves `path` as it was. A reader
    sees the old or the new content, never a part. `f` has write(); no io buffering: callers
    write whole pieces.

    durable: fsync the file and its directory (the store's files); state on tmpfs skips it.
    """

    def __init__(self, path: str, mode: int = 0o600, durable: bool = True):
        self.path, self.mode, self.durable = path, mode, durable
        self.dir = os.path.dirname(path) or "."
        self.tmp = os.path.join(self.dir, f".tmp-{os.path.basename(path)}-{os.getpid()}-{os.urandom(4).hex()}")
        self.fd = -1

    def __enter__(self) -> AtomicFile:
        self.fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, self.mode)
        return self

    def write(self, data: bytes) -> int:
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view):]
        return len(data)

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        try:
            try:
                if exc_type is None:
                    os.fchmod(self.fd, self.mode)          # the umask must not widen or narrow it
                    if self.durable:
                        os.fsync(self.fd)
            finally:
                os.close(self.fd)
            if exc_type is None:
                os.replace(self.tmp, self.path)
        except BaseException:
            self._discard()
            raise
        if exc_type is not None:
            self._discard()
            return
        if self.durable:
            dfd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)

    def _discard(self) -> None:
        try:
            os.unlink(self.tmp)
        except FileNotFoundError:
            pass


def atomic_write(path: str, data: bytes, mode: int = 0o600, durable: bool = True) -> None:
    """Replace `path` with `data` (AtomicFile: the old or the new content, never a part)."""
    with AtomicFile(path, mode, durable) as f:
        f.write(data)


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
