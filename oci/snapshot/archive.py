"""Export and import: snapshots as an OCI archive (a tar of an image layout), written in the
order a streaming reader needs, and scanned from its headers before any blob is trusted."""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import IO, Any, cast

from ..digest import of_bytes
from ..files import AtomicFile
from ..layout import INDEX_MEDIA_TYPE, LAYOUT_VERSION, REF_NAME, Descriptor, LayoutError
from ..reference import check_digest
from .manifest import Snapshot, index_entry
from .media import MANIFEST_MEDIA_TYPE, MAX_META, SnapshotFormatError

BlobOpener = Callable[[Descriptor], Any]     # -> a context manager yielding a readable stream


def write_archive(snaps: list[Snapshot], open_blob: BlobOpener, out_path: str,
                  attached: Sequence[tuple[str, bytes, dict[str, bytes]]] = ()) -> None:
    """Write `snaps` as an OCI archive to out_path (atomically): oci-layout and index.json first,
    then each snapshot's manifest, config and layers, so that a reader meets a manifest before
    its layers. attached: other manifests to carry (ref name, manifest bytes, its blobs by
    digest), e.g. cosign signatures under their `sha256-<hex>.sig` names. Every entry is 0600:
    the archive holds process memory."""
    # Not fsynced (as before AtomicFile): an export is a user's file, written again if lost.
    with AtomicFile(os.path.abspath(out_path), 0o600, durable=False) as f, \
            tarfile.open(fileobj=cast("IO[bytes]", f), mode="w|", format=tarfile.PAX_FORMAT) as tar:  # "w|" only writes
        def add(name: str, size: int, stream: Any) -> None:
            info = tarfile.TarInfo(name)
            info.size, info.mode = size, 0o600
            tar.addfile(info, stream)
        def add_bytes(name: str, data: bytes) -> None:
            add(name, len(data), io.BytesIO(data))
        add_bytes("oci-layout", json.dumps(LAYOUT_VERSION).encode())
        extra = [Descriptor(MANIFEST_MEDIA_TYPE, of_bytes(data), len(data),
                            {REF_NAME: name}) for name, data, _blobs in attached]
        index = {"schemaVersion": 2, "mediaType": INDEX_MEDIA_TYPE,
                 "manifests": [index_entry(s).to_json() for s in snaps] + [d.to_json() for d in extra]}
        add_bytes("index.json", json.dumps(index).encode())
        seen: set[str] = set()
        for entry, (_name, data, blobs) in zip(extra, attached):
            for blob_digest, blob in {entry.digest: data, **blobs}.items():
                if blob_digest not in seen:
                    seen.add(blob_digest)
                    add_bytes("blobs/sha256/" + blob_digest.split(":", 1)[1], blob)
        for snap in snaps:
            for desc in snap.blobs:
                if desc.digest in seen:
                    continue
                seen.add(desc.digest)
                with open_blob(desc) as stream:
                    add("blobs/sha256/" + desc.digest.split(":", 1)[1], desc.size, stream)


@dataclass
class ArchiveIndex:
    """What an archive holds, read from its headers before any blob is trusted."""
    manifests: list[Descriptor]                    # from index.json, each with a ref name
    members: dict[str, tarfile.TarInfo]            # digest -> the member holding that blob


def scan_archive(path: str, max_bytes: int) -> ArchiveIndex:
    """First pass over an OCI archive: its index and the blob members' headers. Refuses anything
    but `oci-layout`, `index.json` and regular `blobs/sha256/<hex>` entries, sparse members,
    duplicate blobs, and archives declaring more than `max_bytes` of blobs."""
    index_obj = None
    members: dict[str, tarfile.TarInfo] = {}
    total = 0
    try:
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                name = member.name[2:] if member.name.startswith("./") else member.name
                if member.isdir() and name.rstrip("/") in ("", "blobs", "blobs/sha256"):
                    continue
                if not member.isreg() or member.issparse():
                    raise SnapshotFormatError(f"archive entry {member.name!r} is not a plain regular file")
                if name == "oci-layout":
                    continue
                if name == "index.json":
                    if member.size > MAX_META:
                        raise SnapshotFormatError("index.json too large")
                    f = tar.extractfile(member)
                    assert f is not None
                    index_obj = json.loads(f.read())
                    continue
                if not name.startswith("blobs/sha256/"):
                    raise SnapshotFormatError(f"unexpected archive entry {member.name!r}")
                digest = check_digest("sha256:" + name[len("blobs/sha256/"):], error=LayoutError)
                if digest in members:
                    raise SnapshotFormatError(f"archive holds blob {digest} twice")
                total += member.size
                if total > max_bytes:
                    raise SnapshotFormatError(f"archive declares more than {max_bytes} bytes of blobs")
                members[digest] = member
    except tarfile.TarError as exc:
        raise SnapshotFormatError(f"{path}: not a readable archive: {exc}") from exc
    except (EOFError, OSError) as exc:
        raise SnapshotFormatError(f"{path}: archive is truncated or unreadable: {exc}") from exc
    except ValueError as exc:
        if isinstance(exc, LayoutError):
            raise
        raise SnapshotFormatError(f"{path}: index.json is malformed: {exc}") from exc
    if not isinstance(index_obj, dict):
        raise SnapshotFormatError(f"{path}: archive has no index.json")
    manifests = [Descriptor.from_json(obj) for obj in index_obj.get("manifests") or []]
    if not manifests:
        raise SnapshotFormatError(f"{path}: archive names no snapshot")
    for m in manifests:
        if not (m.annotations or {}).get(REF_NAME):
            raise SnapshotFormatError(f"manifest {m.digest} in archive has no ref name")
        if m.digest not in members:
            raise SnapshotFormatError(f"archive lacks manifest {m.digest}")
    return ArchiveIndex(manifests, members)
