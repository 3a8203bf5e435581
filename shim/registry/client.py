"""The distribution API of one registry: the registry, its tags and manifests, and blobs moved
between it and byte ranges of local files (blobs.py: what a blob is; download.py: how one is
fetched, verified and resumed).
"""

from __future__ import annotations

import json
import urllib.parse
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import urllib3

from thaw.oci.digest import of_bytes

from . import download
from .auth import repository_scope
from .blobs import BlobRange, CancelFlag, Checkpoint, OnBytes, check_cancel, read_range
from .errors import DigestMismatchError, NetworkError, NotFoundError, ProtocolError, RegistryError
from .transport import Settings, Transport

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
# The OCI "empty" descriptor: the config of an artifact that needs none (image-spec 1.1).
EMPTY_MEDIA_TYPE = "application/vnd.oci.empty.v1+json"
EMPTY_DATA = b"{}"
EMPTY_DIGEST = "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
MAX_MANIFEST = 4 << 20  # distribution's limit for a manifest body
DEFAULT_CHUNK = 256 << 20  # chunked upload: blobs above this go in PATCHes of this size


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
                 checkpoint_every: int = download.CHECKPOINT_EVERY):
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
        digest = of_bytes(data)
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
        digest = of_bytes(data)
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
                                 body=lambda s=sent, n=n: read_range(blob, s, n, progress, cancel, self.registry, repo),
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
            body = lambda: read_range(blob, 0, blob.size, progress, cancel, self.registry, repo)  # noqa: E731
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
        check_cancel(cancel, self.registry, repo, blob.digest)
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
        digest = digest or of_bytes(data)
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
        got = of_bytes(data)
        if got != digest:
            raise DigestMismatchError(f"blob bytes hash to {got}", self.registry, repo, digest)
        return data

    def download_blob(self, repo: str, blob: BlobRange, *, have: int = 0, have_digest: str | None = None,
                      on_bytes: OnBytes | None = None, checkpoint: Checkpoint | None = None,
                      cancel: CancelFlag | None = None) -> int:
        """Writes the blob into its range of `blob.path`, verified and resumable from `have`
        bytes already there (download.download_blob says how); returns the bytes reused."""
        return download.download_blob(self._req, self.registry, repo, blob, have=have, have_digest=have_digest,
                                      on_bytes=on_bytes, checkpoint=checkpoint,
                                      checkpoint_every=self.checkpoint_every, cancel=cancel)


__all__ = [
    "EMPTY_DATA",
    "EMPTY_DIGEST",
    "EMPTY_MEDIA_TYPE",
    "OCI_INDEX",
    "OCI_MANIFEST",
    "Manifest",
    "RegistryClient",
    "RegistryError",
    "Settings",
]
