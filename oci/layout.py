"""OCI image layout on disk: `oci-layout`, `index.json`, content-addressed `blobs/sha256/`.

Blobs are written through a temporary file and renamed into place once their digest is known,
so a blob path only ever holds complete, verified content. `index.json` is replaced atomically.
Locking and the policy of what to publish belong to the store, not here.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from typing import IO, Any, Protocol

from . import ThawError
from .digest import CHUNK, HashingWriter, of_bytes, of_file
from .files import atomic_write
from .reference import check_digest

LAYOUT_VERSION = {"imageLayoutVersion": "1.0.0"}
INDEX_MEDIA_TYPE = "application/vnd.oci.image.index.v1+json"
REF_NAME = "org.opencontainers.image.ref.name"


class LayoutError(ThawError):
    """The layout or one of its blobs is missing, malformed or does not match its digest."""


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    annotations: dict[str, str] | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        return out

    @classmethod
    def from_json(cls, obj: Any) -> Descriptor:
        try:
            digest = str(obj["digest"])
            size = int(obj["size"])
            media_type = str(obj["mediaType"])
        except (KeyError, TypeError, ValueError) as exc:
            raise LayoutError(f"malformed descriptor {obj!r}") from exc
        check_digest(digest, error=LayoutError)
        if size < 0:
            raise LayoutError(f"negative size in descriptor {digest}")
        ann = obj.get("annotations")
        return cls(media_type, digest, size, dict(ann) if isinstance(ann, dict) else None)


class ByteSource(Protocol):
    """What put_stream reads: a binary file, or a window of one (oci/snapshot/files.py's RangeReader)."""

    def read(self, n: int = -1, /) -> bytes: ...


class ImageLayout:
    def __init__(self, root: str):
        self.root = root

    # --- paths ----------------------------------------------------------------------------------
    def blob_path(self, digest: str) -> str:
        algo, hexd = check_digest(digest, error=LayoutError).split(":", 1)
        return os.path.join(self.root, "blobs", algo, hexd)

    @property
    def index_path(self) -> str:
        return os.path.join(self.root, "index.json")

    def init(self) -> None:
        os.makedirs(os.path.join(self.root, "blobs", "sha256"), mode=0o700, exist_ok=True)
        marker = os.path.join(self.root, "oci-layout")
        if not os.path.exists(marker):
            atomic_write(marker, json.dumps(LAYOUT_VERSION).encode())
        if not os.path.exists(self.index_path):
            self.write_index([])

    # --- blobs ----------------------------------------------------------------------------------
    def has_blob(self, desc: Descriptor) -> bool:
        try:
            return os.stat(self.blob_path(desc.digest)).st_size == desc.size
        except OSError:
            return False

    def new_blob_file(self) -> tuple[IO[bytes], str]:
        """An open temporary file inside the layout; commit it with `commit_blob`."""
        tmpdir = os.path.join(self.root, "blobs", "sha256")
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=tmpdir)
        return os.fdopen(fd, "wb"), tmp

    def commit_blob(self, tmp: str, digest: str, expected: str | None = None) -> str:
        """Move a finished temporary blob into place under its digest."""
        if expected is not None and digest != expected:
            os.unlink(tmp)
            raise LayoutError(f"digest mismatch: content is {digest}, expected {expected}")
        os.chmod(tmp, 0o400)
        # Not AtomicFile: a blob's name is its digest, known only once written, and its temp file
        # lives where gc looks (a staging area's, _NotingLayout); a blob never replaces other content.
        os.replace(tmp, self.blob_path(digest))
        return digest

    def put_bytes(self, data: bytes, media_type: str) -> Descriptor:
        f, tmp = self.new_blob_file()
        with f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        digest = of_bytes(data)
        self.commit_blob(tmp, digest)
        return Descriptor(media_type, digest, len(data))

    def put_stream(self, src: ByteSource, expected: Descriptor | None = None) -> tuple[str, int]:
        """Copy a stream into a blob, hashing as it goes; verify against `expected` if given."""
        f, tmp = self.new_blob_file()
        try:
            with f:
                w = HashingWriter(f)
                while chunk := src.read(CHUNK):
                    w.write(chunk)
                f.flush()
                os.fsync(f.fileno())
            if expected is not None and w.size != expected.size:
                raise LayoutError(f"blob {expected.digest}: {w.size} bytes, expected {expected.size}")
            self.commit_blob(tmp, w.digest, expected.digest if expected else None)
            return w.digest, w.size
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    def read_blob(self, desc: Descriptor, limit: int = 16 << 20) -> bytes:
        """Read and verify a small blob (manifest, config)."""
        if desc.size > limit:
            raise LayoutError(f"blob {desc.digest} is {desc.size} bytes, over the {limit} limit")
        try:
            with open(self.blob_path(desc.digest), "rb") as f:
                data = f.read(limit + 1)
        except OSError as exc:
            raise LayoutError(f"blob {desc.digest} missing: {exc}") from exc
        if len(data) != desc.size or of_bytes(data) != desc.digest:
            raise LayoutError(f"blob {desc.digest} is corrupt (size or digest mismatch)")
        return data

    def verify_blob(self, desc: Descriptor) -> None:
        path = self.blob_path(desc.digest)
        try:
            digest, size = of_file(path)
        except OSError as exc:
            raise LayoutError(f"blob {desc.digest} missing: {exc}") from exc
        if size != desc.size or digest != desc.digest:
            raise LayoutError(f"blob {desc.digest} is corrupt: {size} bytes with digest {digest}")

    def all_blobs(self) -> Iterable[str]:
        d = os.path.join(self.root, "blobs", "sha256")
        for name in os.listdir(d):
            if not name.startswith("."):
                yield "sha256:" + name

    # --- index ----------------------------------------------------------------------------------
    def read_index(self) -> list[Descriptor]:
        try:
            with open(self.index_path, "rb") as f:
                obj = json.load(f)
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as exc:
            raise LayoutError(f"{self.index_path}: {exc}") from exc
        return [Descriptor.from_json(m) for m in obj.get("manifests") or []]

    def write_index(self, manifests: list[Descriptor]) -> None:
        obj = {"schemaVersion": 2, "mediaType": INDEX_MEDIA_TYPE,
               "manifests": [m.to_json() for m in manifests]}
        atomic_write(self.index_path, json.dumps(obj, indent=1).encode())

