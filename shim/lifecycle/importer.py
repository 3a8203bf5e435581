"""Snapshots entering the store from outside: OCI archives (`thaw import`), and format 1
snapshots (archives of thaw 0.1, and stores it left on a node), which are converted to format 2.

Nothing from an archive is trusted before it is checked: its headers first (entries, sizes, no
sparse members, no more than the store's free space), then every blob's digest while it streams —
file parts straight into the CRIU file they belong to, whole-file tars unpacked only from their
verified blob. Nothing is imported without provenance: each snapshot's cosign signatures (carried
in the archive under `sha256-<hex>.sig`, as `thaw export` writes them) are verified against the
keys the node trusts for the repository each names, before any of its blobs is read; an unsigned
one only where trust.unsigned accepts "import". The owner namespace is the one the importer names
(`thaw import -n NS`), never the snapshot's config.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace

from thaw.oci import cosign
from thaw.oci import snapshot as fmt
from thaw.oci.annotations import AnnotationError, SnapshotRef
from thaw.oci.digest import CHUNK, HashingWriter, of_bytes
from thaw.oci.layout import REF_NAME, ByteSource, Descriptor, LayoutError

from ..node import provenance
from ..node.config import Config
from ..node.config_schema import UNSIGNED_IMPORT
from ..node.store import CorruptSnapshot, Staging, Store


def open_store(store: Store) -> Store:
    """The store, created if needed, a format 1 store thaw 0.1 left converted first (once)."""
    store.init()
    if store.is_format_1():
        migrate_v1_store(store)
    return store


def import_archive(store: Store, path: str, cfg: Config, owner: str) -> list[fmt.Snapshot]:
    """Import an OCI archive into namespace `owner`: headers checked first, every snapshot's
    provenance (its signatures, or trust.unsigned) before any of its blobs, every blob verified
    against its digest while it streams, file parts written straight into their CRIU files;
    format 1 snapshots are converted to format 2; then the snapshots are published. A refusal of any
    snapshot's provenance comes before anything is written (and an event says why)."""
    store.init()
    free = shutil.disk_usage(store.root).free
    try:
        idx = fmt.scan_archive(path, max_bytes=free)
    except LayoutError as exc:
        raise CorruptSnapshot(f"import of {path} failed: {exc}") from exc
    snaps = [d for d in idx.manifests if cosign.digest_of_tag((d.annotations or {}).get(REF_NAME, "")) is None]
    if not snaps:
        raise CorruptSnapshot(f"import of {path} failed: the archive names no snapshot")
    checked = []
    for desc in snaps:
        what = f"snapshot {(desc.annotations or {}).get(REF_NAME)} ({desc.digest}) in {path}"
        try:
            sigs = _signatures(path, idx, desc.digest)
            checked.append((desc, *provenance.verify(cfg, desc.digest, sigs, None, UNSIGNED_IMPORT, what)))
        except provenance.Untrusted as exc:
            provenance.report_refusal(cfg, exc, source=path, namespace=owner)
            raise
        except (LayoutError, OSError) as exc:
            raise CorruptSnapshot(f"import of {path} failed: {exc}") from exc
    out = []
    with store.staging("import") as staging:
        for i, (desc, prov, sigs) in enumerate(checked):
            try:
                out.append(_import_one(store, staging, path, idx, desc, f"images-{i}", owner, prov, sigs))
            except (LayoutError, OSError) as exc:
                raise CorruptSnapshot(f"import of {path} failed: {exc}") from exc
    return out


def _signatures(path: str, idx: fmt.ArchiveIndex, digest: str) -> list[cosign.Signature]:
    """The cosign signatures the archive carries for manifest `digest` (each payload read from
    its blob, checked against its digest)."""
    tag = cosign.tag_for(digest)
    out = []
    for desc in idx.manifests:
        if (desc.annotations or {}).get(REF_NAME) != tag:
            continue
        data = _member_bytes(path, idx, desc.digest, fmt.MAX_META)
        for layer in cosign.signature_layers(data):
            try:
                out.append(cosign.Signature(_member_bytes(path, idx, layer.payload_digest, cosign.MAX_PAYLOAD),
                                            layer.signature))
            except fmt.SnapshotFormatError:
                continue
    return out


def _member_bytes(path: str, idx: fmt.ArchiveIndex, digest: str, limit: int) -> bytes:
    member = idx.members.get(digest)
    if member is None or member.size > limit:
        raise fmt.SnapshotFormatError(f"archive lacks blob {digest} (or it is too large)")
    with fmt.RangeReader(path, member.offset_data, member.size) as src:
        data = src.read()
    if of_bytes(data) != digest:
        raise fmt.SnapshotFormatError(f"archive blob {digest} does not match its digest")
    return data


def _blob(staging: Staging, path: str, idx: fmt.ArchiveIndex, desc: Descriptor) -> None:
    """Stream one archive blob into the layout, verified against `desc`."""
    member = idx.members.get(desc.digest)
    if member is None:
        raise fmt.SnapshotFormatError(f"archive lacks blob {desc.digest}")
    if member.size != desc.size:
        raise fmt.SnapshotFormatError(f"blob {desc.digest}: archive holds {member.size} bytes, "
                                      f"descriptor says {desc.size}")
    with fmt.RangeReader(path, member.offset_data, member.size) as src:
        staging.layout.put_stream(src, desc)


def _small(staging: Staging, path: str, idx: fmt.ArchiveIndex, desc: Descriptor) -> bytes:
    if desc.size > fmt.MAX_META:
        raise fmt.SnapshotFormatError(f"blob {desc.digest} is too large for metadata")
    _blob(staging, path, idx, desc)
    return staging.layout.read_blob(desc, fmt.MAX_META)


def _import_one(store: Store, staging: Staging, path: str, idx: fmt.ArchiveIndex, desc: Descriptor,
                images_name: str, owner: str, prov: provenance.Provenance,
                sigs: list[cosign.Signature]) -> fmt.Snapshot:
    ref = (desc.annotations or {}).get(REF_NAME, "")
    try:
        SnapshotRef.parse(ref)
        if ":" not in ref:
            raise AnnotationError(f"{ref!r} has no tag")
    except AnnotationError as exc:
        raise fmt.SnapshotFormatError(f"archive names a snapshot {ref!r}: {exc}") from exc
    config_desc, layers = fmt.parse_manifest(_small(staging, path, idx, desc), desc)
    config = fmt.SnapshotConfig.from_json(json.loads(_small(staging, path, idx, config_desc)))
    snap = replace(fmt.assemble(ref, desc, config_desc, config, layers), namespace=owner)
    store.check_room(store.charged_to(snap), snap.size, f"importing {ref} ({snap.namespace}) from {path}")
    images = staging.new_dir(images_name)
    for d in (snap.criu_whole, snap.rootfs, snap.deleted):
        _blob(staging, path, idx, d)
    with open(staging.layout.blob_path(snap.criu_whole.digest), "rb") as f:
        # Format 1's tar holds every CRIU file; format 2's the small ones. Either way it is bounded
        # by its own (verified) size, and no more than the declared sizes reach the disk.
        hashes = fmt.unpack_whole_files(f, images, snap.criu_whole.size)
    for part in snap.parts:
        member = idx.members.get(part.desc.digest)
        if member is None or member.size != part.desc.size:
            raise fmt.SnapshotFormatError(f"archive lacks part {part.desc.digest} of {part.file}")
        if part.file in hashes:
            raise fmt.SnapshotFormatError(f"{part.file} is both a whole file and a part")
        with fmt.RangeReader(path, member.offset_data, member.size) as src:
            write_part(images, part, src)
    if snap.format_version == 1:
        return convert_v1(store, staging, snap, images, "imported", prov)
    return store.publish(snap, images, "imported", hashes, provenance=prov, signatures=sigs)


def write_part(images: str, part: fmt.FilePart, src: ByteSource) -> None:
    """Write one file part's bytes into its CRIU file at its offset, verifying its digest."""
    fd = os.open(os.path.join(images, part.file), os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        w = HashingWriter(_PWriter(fd, part.offset))
        left = part.desc.size
        while left:
            chunk = src.read(min(CHUNK, left))
            if not chunk:
                raise fmt.SnapshotFormatError(f"part {part.desc.digest} of {part.file} is truncated")
            w.write(chunk)
            left -= len(chunk)
    finally:
        os.close(fd)
    if w.digest != part.desc.digest:
        raise fmt.SnapshotFormatError(f"part {part.desc.digest} of {part.file}: content is {w.digest}")


class _PWriter:
    def __init__(self, fd: int, offset: int):
        self.fd, self.offset = fd, offset

    def write(self, data: bytes) -> int:
        view = memoryview(data)
        while view:
            n = os.pwrite(self.fd, view, self.offset)
            self.offset += n
            view = view[n:]
        return len(data)

    def flush(self) -> None:
        pass


def convert_v1(store: Store, staging: Staging, snap: fmt.Snapshot, images: str, origin: str,
               prov: provenance.Provenance | None = None) -> fmt.Snapshot:
    """A format 1 snapshot, its CRIU directory unpacked in `images`, as a format 2 one (new
    manifest and config; the same rootfs and deleted layers; the owner `snap` has; provenance
    that of the original, whose signatures no longer apply to the new manifest)."""
    whole, parts, hashes, criu_bytes = staging.package_images(images)
    config = replace(snap.config, format_version=fmt.FORMAT_VERSION,
                     sizes=replace(snap.config.sizes, criu_bytes=criu_bytes))
    new = replace(staging.write_snapshot(config, whole, parts, snap.rootfs, snap.deleted), namespace=snap.namespace)
    return store.publish(new, images, origin, hashes, provenance=prov)


def migrate_v1_store(store: Store) -> None:
    """Convert a store thaw 0.1 left (format 1 manifests, CRIU layers unpacked under layers/)
    to format 2, once. Each snapshot is rebuilt from its verified CRIU tar blob."""
    legacy = os.path.join(store.root, "layers")
    with store.staging("migrate") as staging:
        for i, desc in enumerate(store.layout.read_index()):
            if (desc.annotations or {}).get(fmt.NAMESPACE):
                continue
            try:
                snap = store.read(desc)
                if snap.format_version != 1:
                    continue
                SnapshotRef.parse(snap.ref)     # a name thaw 0.1 let in unchecked is dropped
                store.layout.verify_blob(snap.criu_whole)
                images = staging.new_dir(f"images-{i}")
                with open(store.layout.blob_path(snap.criu_whole.digest), "rb") as f:
                    fmt.unpack_whole_files(f, images, snap.criu_whole.size)
                with store.locked():        # the old entry goes; convert_v1 publishes the new one
                    store.layout.write_index([d for d in store.layout.read_index() if d.digest != desc.digest])
                convert_v1(store, staging, snap, images, "migrated")
            except (CorruptSnapshot, LayoutError, AnnotationError, OSError) as exc:
                store.report("error", f"snapshot {(desc.annotations or {}).get(REF_NAME)} could not be "
                                      f"migrated to format 2 and was dropped: {exc}")
                with store.locked():
                    store.layout.write_index([d for d in store.layout.read_index() if d.digest != desc.digest])
    shutil.rmtree(legacy, ignore_errors=True)
    store.gc()
