"""The distribution API of one registry, moving blobs between it and byte ranges of local files.

A blob is always `BlobRange(digest, path, offset, size)`: bytes [offset, offset+size) of a local
file, never assumed to be a whole file (a large pages file is pushed as several blobs that are
ranges of it). Uploads read the range; downloads write it with pwrite, so several threads can
fill different ranges of one file.

Downloads are verified while streaming (SHA-256 of exactly `size` bytes; a byte more or less is
an error, and nothing is written outside the range) and resumable: `have` bytes of the range
already present are re-hashed first (and compared with the prefix digest a checkpoint recorded,
when given), then only the rest is requested with `Range:`. A connection lost mid-blob is resumed
the same way, a bounded number of times, before giving up.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import urllib3

from thaw.oci.reference import InvalidReference, check_digest

from .auth import repository_scope
from .errors import (
    Cancelled,
    DigestMismatchError,
    LocalFileError,
    NetworkError,
    NotFoundError,
    ProtocolError,
    RegistryError,
)
from .transport import Settings, Transport

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
# The OCI "empty" descriptor: the config of an artifact that needs none (image-spec 1.1).
EMPTY_MEDIA_TYPE = "application/vnd.oci.empty.v1+json"
EMPTY_DATA = b"{}"
EMPTY_DIGEST = "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
MAX_MANIFEST = 4 << 20  # distribution's limit for a manifest body
IO_CHUNK = 1 << 20
CHECKPOINT_EVERY = 16 << 20  # bytes between download checkpoints (resume points)
DEFAULT_CHUNK = 256 << 20  # chunked upload: blobs above this go in PATCHes of this size
DOWNLOAD_RETRIES = 2  # resumes within one download after a lost connection
RETRY_DELAYS_S = (0.5, 1.5)

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


@dataclass(frozen=True)
class Manifest:
    data: bytes
    media_type: str
    digest: str

    def json(self) -> dict[str, Any]:
        obj: dict[str, Any] = json.loads(self.data)
        return obj


class RegistryClient:
    """Thread-safe: one client serves every thread of a transfer."""

    def __init__(self, registry: str, settings: Settings | None = None, *, chunk_size: int = DEFAULT_CHUNK,
                 checkpoint_every: int = CHECKPOINT_EVERY):
        self.registry = registry
        self.transport = Transport(registry, settings)
        self.chunk_size = chunk_size
        self.checkpoint_every = checkpoint_every

    def close(self) -> None:
        self.transport.close()

    def abort(self) -> None:
        """Stop every request now, from any thread (Transport.abort)."""
        self.transport.abort()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def _req(self, method: str, url: str, repo: str, actions: str, digest: str = "", extra_scopes: tuple[str, ...] = (),
             **kw: Any) -> urllib3.BaseHTTPResponse:
        scopes = (repository_scope(repo, actions), *extra_scopes) if repo else ()
        return self.transport.request(method, url, repository=repo, digest=digest, scopes=scopes, **kw)

    # --- registry, tags, manifests --------------------------------------------------------------

    def ping(self) -> None:
        """`GET /v2/`: the registry speaks the distribution API and accepts our credentials."""
        resp = self.transport.request("GET", "/v2/")
        version = resp.headers.get("Docker-Distribution-API-Version")
        if version and version != "registry/2.0":
            raise ProtocolError(f"unsupported API version {version!r}", self.registry)

    def list_tags(self, repo: str) -> list[str]:
        tags: list[str] = []
        url = f"/v2/{repo}/tags/list?n=1000"
        for _ in range(10_000):  # bounded: pages of 1000
            resp = self._req("GET", url, repo, "pull")
            try:
                tags += json.loads(resp.data).get("tags") or []
            except (ValueError, AttributeError) as exc:
                raise ProtocolError(f"tags list is not JSON: {exc}", self.registry, repo) from exc
            link = resp.headers.get("Link", "")
            if not link.startswith("<"):
                return tags
            url = urllib.parse.urljoin(self.transport.base + url, link[1:link.index(">")])
        raise ProtocolError("tag list does not end", self.registry, repo)

    def put_manifest(self, repo: str, reference: str, data: bytes, media_type: str = OCI_MANIFEST) -> str:
        """PUT a manifest under a tag or its digest; returns its digest (checked against the
        registry's `Docker-Content-Digest` when it sends one)."""
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        if reference.startswith("sha256:") and reference != digest:
            raise DigestMismatchError(f"manifest bytes have digest {digest}, not {reference}", self.registry, repo)
        resp = self._req("PUT", f"/v2/{repo}/manifests/{reference}", repo, "pull,push", digest,
                         headers={"Content-Type": media_type}, body=data, expect=(201,))
        got = resp.headers.get("Docker-Content-Digest")
        if got and got != digest:
            raise DigestMismatchError(f"registry stored the manifest as {got}, we sent {digest}", self.registry, repo)
        return digest

    def get_manifest(self, repo: str, reference: str, accept: tuple[str, ...] = (OCI_MANIFEST, OCI_INDEX),
                     max_size: int = MAX_MANIFEST) -> Manifest:
        """GET a manifest by tag or digest, at most `max_size` bytes (ProtocolError past it,
        having read no more). Verified: by digest, the bytes must hash to it; by tag, to the
        `Docker-Content-Digest` the registry announces, if any."""
        resp = self._req("GET", f"/v2/{repo}/manifests/{reference}", repo, "pull",
                         headers={"Accept": ", ".join(accept)}, stream=True)
        max_size = min(max_size, MAX_MANIFEST)
        try:
            data = resp.read(max_size + 1, decode_content=True)
        except Exception as exc:
            raise NetworkError(f"reading manifest {reference}: {exc}", self.registry, repo) from exc
        finally:
            resp.release_conn()
        if len(data) > max_size:
            raise ProtocolError(f"manifest {reference} is larger than {max_size} bytes", self.registry, repo)
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        want = reference if reference.startswith("sha256:") else resp.headers.get("Docker-Content-Digest")
        if want and want != digest:
            raise DigestMismatchError(f"manifest {reference}: bytes hash to {digest}, expected {want}",
                                      self.registry, repo, want)
        media_type = resp.headers.get("Content-Type", "").split(";")[0].strip()
        try:
            declared = json.loads(data).get("mediaType")
        except (ValueError, AttributeError) as exc:
            raise ProtocolError(f"manifest {reference} is not a JSON object", self.registry, repo, digest) from exc
        if declared and media_type and declared != media_type:
            raise ProtocolError(f"manifest {reference} declares {declared} but was served as {media_type}",
                                self.registry, repo, digest)
        return Manifest(data, declared or media_type, digest)

    # --- blobs: existence, mount, upload --------------------------------------------------------

    def blob_size(self, repo: str, digest: str) -> int | None:
        """HEAD a blob: its size if the registry has it in `repo`, else None."""
        try:
            resp = self._req("HEAD", f"/v2/{repo}/blobs/{digest}", repo, "pull", digest, allow_redirects=True)
        except NotFoundError:
            return None
        length = resp.headers.get("Content-Length")
        return int(length) if length and length.isdigit() else None

    def mount_blob(self, repo: str, digest: str, from_repo: str) -> str | None:
        """Cross-repository mount. Returns None when mounted; otherwise the registry did not
        mount (it may not offer mounts, or lack the blob there) and the upload location it
        opened instead is returned, for `upload_blob` to use."""
        url = f"/v2/{repo}/blobs/uploads/?" + urllib.parse.urlencode({"mount": digest, "from": from_repo})
        resp = self._req("POST", url, repo, "pull,push", digest, extra_scopes=(repository_scope(from_repo, "pull"),),
                         expect=(201, 202))
        if resp.status == 201:
            return None
        return self._location(resp, repo, digest)

    def start_upload(self, repo: str, digest: str = "") -> str:
        resp = self._req("POST", f"/v2/{repo}/blobs/uploads/", repo, "pull,push", digest, expect=(202,))
        return self._location(resp, repo, digest)

    def _abandon_upload(self, location: str, repo: str, digest: str) -> None:
        """Cancels an upload session we will not use (best effort: the registry purges stale
        sessions anyway)."""
        try:
            self._req("DELETE", location, repo, "pull,push", digest, expect=(204, 404))
        except RegistryError:
            pass

    def _location(self, resp: urllib3.BaseHTTPResponse, repo: str, digest: str) -> str:
        loc: str | None = resp.headers.get("Location")
        if not loc:
            raise ProtocolError(f"HTTP {resp.status} without a Location for the upload", self.registry, repo, digest)
        return urllib.parse.urljoin(self.transport.base + "/", loc)

    def upload_blob(self, repo: str, blob: BlobRange, *, location: str | None = None, chunk_size: int | None = None,
                    on_bytes: OnBytes | None = None, cancel: CancelFlag | None = None) -> None:
        """Uploads the range as the blob. Monolithic (POST, then one PUT with the bytes) unless
        the blob is larger than `chunk_size` (default: the client's), then chunked: PATCHes with
        `Content-Range` of at most `chunk_size` bytes each, then a bodiless PUT. The registry
        checks the digest on the final PUT (DigestMismatchError if the range does not hash to it)."""
        chunk = chunk_size or self.chunk_size
        loc = location or self.start_upload(repo, blob.digest)
        sent = 0
        base_done = 0

        def progress(n: int) -> None:
            if on_bytes:
                on_bytes(base_done + n)
        if blob.size > chunk:
            while sent < blob.size:
                n = min(chunk, blob.size - sent)
                resp = self._req("PATCH", loc, repo, "pull,push", blob.digest,
                                 headers={"Content-Type": "application/octet-stream", "Content-Length": str(n),
                                          "Content-Range": f"{sent}-{sent + n - 1}"},
                                 body=lambda s=sent, n=n: _read_range(blob, s, n, progress, cancel, self.registry, repo),
                                 expect=(202,))
                got = resp.headers.get("Range")
                if got and got != f"0-{sent + n - 1}":
                    raise ProtocolError(f"after a chunk up to byte {sent + n - 1} the registry holds {got}",
                                        self.registry, repo, blob.digest)
                sent += n
                base_done = sent
                loc = self._location(resp, repo, blob.digest)
            body, length = None, 0
        else:
            body = lambda: _read_range(blob, 0, blob.size, progress, cancel, self.registry, repo)  # noqa: E731
            length = blob.size
        sep = "&" if "?" in loc else "?"
        self._req("PUT", f"{loc}{sep}digest={urllib.parse.quote(blob.digest)}", repo, "pull,push", blob.digest,
                  headers={"Content-Type": "application/octet-stream", "Content-Length": str(length)},
                  body=body if length else b"", expect=(201,))
        if on_bytes:
            on_bytes(blob.size)

    def push_blob(self, repo: str, blob: BlobRange, *, mount_from: tuple[str, ...] = (), skip_existing: bool = True,
                  chunk_size: int | None = None, on_bytes: OnBytes | None = None,
                  cancel: CancelFlag | None = None) -> str:
        """Makes the registry hold the blob in `repo`. Returns how: "present" (HEAD found it),
        "mounted" (cross-repository mount from one of `mount_from`, tried in order) or "uploaded"
        (into the upload session the last refused mount opened, else a new one)."""
        _check_cancel(cancel, self.registry, repo, blob.digest)
        if skip_existing and self.blob_size(repo, blob.digest) is not None:
            return "present"
        location = None
        for source in (s for s in mount_from if s != repo):
            if location:
                self._abandon_upload(location, repo, blob.digest)
            location = self.mount_blob(repo, blob.digest, source)
            if location is None:
                return "mounted"
        self.upload_blob(repo, blob, location=location, chunk_size=chunk_size, on_bytes=on_bytes, cancel=cancel)
        return "uploaded"

    def push_bytes(self, repo: str, data: bytes, digest: str | None = None) -> str:
        """A small blob from memory (a config, the empty `{}`): HEAD, else monolithic upload."""
        digest = digest or "sha256:" + hashlib.sha256(data).hexdigest()
        if self.blob_size(repo, digest) is None:
            loc = self.start_upload(repo, digest)
            sep = "&" if "?" in loc else "?"
            self._req("PUT", f"{loc}{sep}digest={urllib.parse.quote(digest)}", repo, "pull,push", digest,
                      headers={"Content-Type": "application/octet-stream"}, body=data, expect=(201,))
        return digest

    # --- blobs: download ------------------------------------------------------------------------

    def fetch_bytes(self, repo: str, digest: str, max_size: int = MAX_MANIFEST) -> bytes:
        """A small blob into memory (a config), verified."""
        resp = self._req("GET", f"/v2/{repo}/blobs/{digest}", repo, "pull", digest, stream=True, allow_redirects=True)
        try:
            data: bytes = resp.read(max_size + 1)
        except Exception as exc:
            raise NetworkError(f"reading blob: {exc}", self.registry, repo, digest) from exc
        finally:
            resp.release_conn()
        if len(data) > max_size:
            raise ProtocolError(f"blob larger than {max_size} bytes", self.registry, repo, digest)
        got = "sha256:" + hashlib.sha256(data).hexdigest()
        if got != digest:
            raise DigestMismatchError(f"blob bytes hash to {got}", self.registry, repo, digest)
        return data

    def download_blob(self, repo: str, blob: BlobRange, *, have: int = 0, have_digest: str | None = None,
                      on_bytes: OnBytes | None = None, checkpoint: Checkpoint | None = None,
                      cancel: CancelFlag | None = None) -> int:
        """Writes the blob into its range of `blob.path` (created if missing, never truncated),
        verifying it. `have`: bytes at the start of the range already there from an earlier try;
        they are re-hashed (and, with `have_digest`, compared with the digest recorded for that
        prefix; a mismatch restarts from 0), and only the rest is fetched. `checkpoint(n, d)` is
        called every `checkpoint_every` bytes, and when the download stops, once n bytes are
        written (d: their sha256), so a caller can record a resume point. Returns the bytes
        reused from `have`. On error the range may hold partial data; nothing claims it is
        complete: only a normal return means the range holds the blob."""
        where = (self.registry, repo, blob.digest)
        _check_cancel(cancel, *where)
        try:
            fd = os.open(blob.path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise LocalFileError(f"cannot open {blob.path} for writing: {exc}", *where) from exc
        state = _Download(fd, blob, where)
        try:
            # No space is reserved ahead of the bytes: a registry that declares a large blob and
            # sends a few bytes must not take the disk (the pull's quota check bounds the rest).
            reused = self._rehash_prefix(state, max(0, min(have, blob.size)), have_digest, cancel)
            state.last_checkpoint = state.pos
            if on_bytes:
                on_bytes(state.pos)
            attempt = 0
            while state.pos < blob.size:
                try:
                    self._stream_into(state, repo, on_bytes, checkpoint, cancel)
                except NetworkError:
                    if attempt >= DOWNLOAD_RETRIES or (cancel and cancel.is_set()):
                        raise
                    time.sleep(RETRY_DELAYS_S[min(attempt, len(RETRY_DELAYS_S) - 1)])
                    attempt += 1
                finally:
                    if checkpoint and state.pos != state.last_checkpoint:
                        state.checkpoint(checkpoint)
            got = "sha256:" + state.hash.hexdigest()
            if got != blob.digest:
                raise DigestMismatchError(f"downloaded bytes hash to {got}; the range of {blob.path} is not trusted",
                                          *where)
            return reused
        finally:
            state.close()
            os.close(fd)

    def _rehash_prefix(self, state: _Download, have: int, have_digest: str | None,
                       cancel: CancelFlag | None) -> int:
        """Hashes the `have` bytes already in the range; returns how many are reused (0 when they
        are not all there or do not match `have_digest`)."""
        blob = state.blob
        pos = 0
        while pos < have:
            _check_cancel(cancel, *state.where)
            try:
                data = os.pread(state.rfd(), min(4 * IO_CHUNK, have - pos), blob.offset + pos)
            except OSError as exc:
                raise LocalFileError(f"cannot re-read the partial download in {blob.path}: {exc}",
                                     *state.where) from exc
            if not data:
                break
            state.hash.update(data)
            pos += len(data)
        if pos < have or (have_digest and "sha256:" + state.hash.hexdigest() != have_digest):
            state.restart()  # what is there is not what was recorded: start over
            return 0
        state.pos = have
        return have

    def _stream_into(self, state: _Download, repo: str, on_bytes: OnBytes | None, checkpoint: Checkpoint | None,
                     cancel: CancelFlag | None) -> None:
        """One GET from state.pos on (a Range request when pos > 0), advancing state as bytes are
        written. A registry that ignores Range restarts the blob from 0."""
        blob, where = state.blob, state.where
        headers = {"Range": f"bytes={state.pos}-"} if state.pos else {}
        resp = self._req("GET", f"/v2/{repo}/blobs/{blob.digest}", repo, "pull", blob.digest, headers=headers,
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
                _check_cancel(cancel, *where)
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
                if checkpoint and state.pos - state.last_checkpoint >= self.checkpoint_every:
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
        self.hash = hashlib.sha256()
        self.last_checkpoint = 0
        self._rfd: int | None = None

    def rfd(self) -> int:
        if self._rfd is None:  # the write fd cannot read; open a reader only when re-hashing
            self._rfd = os.open(self.blob.path, os.O_RDONLY | os.O_CLOEXEC)
        return self._rfd

    def restart(self) -> None:
        self.pos, self.hash = 0, hashlib.sha256()

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
        record(self.pos, "sha256:" + self.hash.copy().hexdigest())
        self.last_checkpoint = self.pos

    def close(self) -> None:
        if self._rfd is not None:
            os.close(self._rfd)
            self._rfd = None


def _read_range(blob: BlobRange, start: int, length: int, on_bytes: OnBytes | None,
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
            _check_cancel(cancel, *where)
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


def _content_range_start(value: str) -> int | None:
    # "bytes START-END/TOTAL"
    try:
        return int(value.split()[1].split("-")[0])
    except (IndexError, ValueError):
        return None


def _check_cancel(cancel: CancelFlag | None, registry: str, repo: str, digest: str) -> None:
    if cancel is not None and cancel.is_set():
        raise Cancelled("transfer cancelled", registry, repo, digest)


__all__ = [
    "EMPTY_DATA",
    "EMPTY_DIGEST",
    "EMPTY_MEDIA_TYPE",
    "OCI_INDEX",
    "OCI_MANIFEST",
    "BlobRange",
    "Manifest",
    "RegistryClient",
    "RegistryError",
    "Settings",
]
