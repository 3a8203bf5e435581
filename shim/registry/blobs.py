"""A blob as bytes of a local file, and reading them for an upload.

A blob is always `BlobRange(digest, path, offset, size)`: bytes [offset, offset+size) of a local
file, never assumed to be a whole file (a large pages file is pushed as several blobs that are
ranges of it). Uploads read the range (`read_range`); downloads write it with pwrite
(download.py), so several threads can fill different ranges of one file.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

from thaw.oci.reference import InvalidReference, check_digest

from .errors import Cancelled, LocalFileError

IO_CHUNK = 1 << 20

OnBytes = Callable[[int], None]  # bytes done for this blob so far (may restart from 0)
Checkpoint = Callable[[int, str], None]  # (bytes verified-written, sha256 of that prefix)


class CancelFlag(Protocol):
    """What a transfer polls between chunks: a threading.Event, transfer's _Stop, a prepare's Cancel."""

    def is_set(self) -> bool: ...


@dataclass(frozen=True)
class BlobRange:
    """A blob and where its bytes live locally: [offset, offset+size) of `path`."""
    digest: str
    path: str
    offset: int
    size: int

    def __post_init__(self) -> None:
        try:
            check_digest(self.digest)
        except InvalidReference as exc:
            raise ValueError(str(exc)) from None
        if self.offset < 0 or self.size < 0:
            raise ValueError(f"negative offset or size for blob {self.digest}")


def read_range(blob: BlobRange, start: int, length: int, on_bytes: OnBytes | None,
                cancel: CancelFlag | None, registry: str, repo: str) -> Iterator[bytes]:
    """The bytes [start, start+length) of the blob's range, in IO_CHUNK pieces. Local errors
    become LocalFileError (an OSError would look like a network failure to urllib3)."""
    where = (registry, repo, blob.digest)
    try:
        f = open(blob.path, "rb")  # noqa: SIM115 - the with below; only the open maps to LocalFileError
    except OSError as exc:
        raise LocalFileError(f"cannot read {blob.path}: {exc}", *where) from exc
    with f:
        done = 0
        while done < length:
            check_cancel(cancel, *where)
            try:
                data = os.pread(f.fileno(), min(IO_CHUNK, length - done), blob.offset + start + done)
            except OSError as exc:
                raise LocalFileError(f"cannot read {blob.path}: {exc}", *where) from exc
            if not data:
                raise LocalFileError(f"{blob.path} ends before byte {blob.offset + blob.size} of the blob's range",
                                     *where)
            yield data
            done += len(data)
            if on_bytes:
                on_bytes(start + done)


def check_cancel(cancel: CancelFlag | None, registry: str, repo: str, digest: str) -> None:
    if cancel is not None and cancel.is_set():
        raise Cancelled("transfer cancelled", registry, repo, digest)
