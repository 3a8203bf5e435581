"""Downloading one blob into its range of a local file: verified while streaming, resumable.

Verified: SHA-256 of exactly `size` bytes; a byte more or less is an error, and nothing is
written outside the range. Resumable: `have` bytes of the range already present are re-hashed
first (and compared with the prefix digest a checkpoint recorded, when given), then only the rest
is requested with `Range:`. A connection lost mid-blob is resumed the same way, a bounded number
of times, before giving up. The requests go through the registry client's (client.py).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import urllib3

from thaw.oci.digest import Hasher

from .blobs import IO_CHUNK, BlobRange, CancelFlag, Checkpoint, OnBytes, check_cancel
from .errors import DigestMismatchError, LocalFileError, NetworkError, ProtocolError

CHECKPOINT_EVERY = 16 << 20  # bytes between download checkpoints (resume points)
DOWNLOAD_RETRIES = 2  # resumes within one download after a lost connection
RETRY_DELAYS_S = (0.5, 1.5)

# The client's request: (method, url, repository, actions, digest, headers=..., stream=..., ...).
Request = Callable[..., "urllib3.BaseHTTPResponse"]


def download_blob(request: Request, registry: str, repo: str, blob: BlobRange, *, have: int = 0,
                  have_digest: str | None = None, on_bytes: OnBytes | None = None,
                  checkpoint: Checkpoint | None = None, checkpoint_every: int = CHECKPOINT_EVERY,
                  cancel: CancelFlag | None = None) -> int:
    """Writes the blob into its range of `blob.path` (created if missing, never truncated),
    verifying it. `have`: bytes at the start of the range already there from an earlier try;
    they are re-hashed (and, with `have_digest`, compared with the digest recorded for that
    prefix; a mismatch restarts from 0), and only the rest is fetched. `checkpoint(n, d)` is
    called every `checkpoint_every` bytes, and when the download stops, once n bytes are
    written (d: their sha256), so a caller can record a resume point. Returns the bytes
    reused from `have`. On error the range may hold partial data; nothing claims it is
    complete: only a normal return means the range holds the blob."""
    where = (registry, repo, blob.digest)
    check_cancel(cancel, *where)
    try:
        fd = os.open(blob.path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise LocalFileError(f"cannot open {blob.path} for writing: {exc}", *where) from exc
    state = _Download(fd, blob, where)
    try:
        # No space is reserved ahead of the bytes: a registry that declares a large blob and
        # sends a few bytes must not take the disk (the pull's quota check bounds the rest).
        reused = _rehash_prefix(state, max(0, min(have, blob.size)), have_digest, cancel)
        state.last_checkpoint = state.pos
        if on_bytes:
            on_bytes(state.pos)
        attempt = 0
        while state.pos < blob.size:
            try:
                _stream_into(request, state, repo, on_bytes, checkpoint, checkpoint_every, cancel)
            except NetworkError:
                if attempt >= DOWNLOAD_RETRIES or (cancel and cancel.is_set()):
                    raise
                time.sleep(RETRY_DELAYS_S[min(attempt, len(RETRY_DELAYS_S) - 1)])
                attempt += 1
            finally:
                if checkpoint and state.pos != state.last_checkpoint:
                    state.checkpoint(checkpoint)
        got = state.hash.digest
        if got != blob.digest:
            raise DigestMismatchError(f"downloaded bytes hash to {got}; the range of {blob.path} is not trusted",
                                      *where)
        return reused
    finally:
        state.close()
        os.close(fd)


def _rehash_prefix(state: _Download, have: int, have_digest: str | None, cancel: CancelFlag | None) -> int:
    """Hashes the `have` bytes already in the range; returns how many are reused (0 when they
    are not all there or do not match `have_digest`)."""
    blob = state.blob
    pos = 0
    while pos < have:
        check_cancel(cancel, *state.where)
        try:
            data = os.pread(state.rfd(), min(4 * IO_CHUNK, have - pos), blob.offset + pos)
        except OSError as exc:
            raise LocalFileError(f"cannot re-read the partial download in {blob.path}: {exc}",
                                 *state.where) from exc
        if not data:
            break
        state.hash.update(data)
        pos += len(data)
    if pos < have or (have_digest and state.hash.digest != have_digest):
        state.restart()  # what is there is not what was recorded: start over
        return 0
    state.pos = have
    return have


def _stream_into(request: Request, state: _Download, repo: str, on_bytes: OnBytes | None,
                 checkpoint: Checkpoint | None, checkpoint_every: int, cancel: CancelFlag | None) -> None:
    """One GET from state.pos on (a Range request when pos > 0), advancing state as bytes are
    written. A registry that ignores Range restarts the blob from 0."""
    blob, where = state.blob, state.where
    headers = {"Range": f"bytes={state.pos}-"} if state.pos else {}
    resp = request("GET", f"/v2/{repo}/blobs/{blob.digest}", repo, "pull", blob.digest, headers=headers,
                   stream=True, allow_redirects=True, expect=(200, 206))
    try:
        if state.pos and resp.status == 200:
            state.restart()
        elif resp.status == 206:
            start = _content_range_start(resp.headers.get("Content-Range", ""))
            if start != state.pos:
                raise ProtocolError(f"asked for bytes from {state.pos}, got Content-Range "
                                    f"{resp.headers.get('Content-Range')!r}", *where)
        length = resp.headers.get("Content-Length")
        if length and length.isdigit() and state.pos + int(length) != blob.size:
            raise DigestMismatchError(f"registry sends {int(length)} bytes from offset {state.pos}, "
                                      f"but the blob has {blob.size}", *where)
        while state.pos < blob.size:
            check_cancel(cancel, *where)
            try:
                data = resp.read(min(IO_CHUNK, blob.size - state.pos))
            except Exception as exc:  # urllib3 and socket errors alike: the connection is gone
                raise NetworkError(f"connection lost after {state.pos} of {blob.size} bytes: {exc}",
                                   *where) from exc
            if not data:
                raise NetworkError(f"connection closed after {state.pos} of {blob.size} bytes", *where)
            state.write(data)
            if on_bytes:
                on_bytes(state.pos)
            if checkpoint and state.pos - state.last_checkpoint >= checkpoint_every:
                state.checkpoint(checkpoint)
        try:
            extra = resp.read(1)
        except Exception:  # noqa: BLE001 - the blob is complete; what follows does not matter
            extra = b""
        if extra:
            raise DigestMismatchError(f"registry sends more than the blob's {blob.size} bytes", *where)
    finally:
        resp.release_conn()


class _Download:
    """Where one download stands: bytes of the range written and hashed so far."""

    def __init__(self, fd: int, blob: BlobRange, where: tuple[str, str, str]):
        self.fd, self.blob, self.where = fd, blob, where
        self.pos = 0
        self.hash = Hasher()
        self.last_checkpoint = 0
        self._rfd: int | None = None

    def rfd(self) -> int:
        if self._rfd is None:  # the write fd cannot read; open a reader only when re-hashing
            self._rfd = os.open(self.blob.path, os.O_RDONLY | os.O_CLOEXEC)
        return self._rfd

    def restart(self) -> None:
        self.pos, self.hash = 0, Hasher()

    def write(self, data: bytes) -> None:
        view, offset = memoryview(data), self.blob.offset + self.pos
        try:
            while view:
                n = os.pwrite(self.fd, view, offset)
                view, offset = view[n:], offset + n
        except OSError as exc:
            raise LocalFileError(f"cannot write {self.blob.path}: {exc}", *self.where) from exc
        self.hash.update(data)
        self.pos += len(data)

    def checkpoint(self, record: Checkpoint) -> None:
        record(self.pos, self.hash.digest)
        self.last_checkpoint = self.pos

    def close(self) -> None:
        if self._rfd is not None:
            os.close(self._rfd)
            self._rfd = None


def _content_range_start(value: str) -> int | None:
    # "bytes START-END/TOTAL"
    try:
        return int(value.split()[1].split("-")[0])
    except (IndexError, ValueError):
        return None
