"""The snapshot manifest: which blobs make a snapshot (the config, the whole-file tar, the file
parts, the rootfs diff, the deleted list), written, parsed and checked whole; the deleted list;
a snapshot's entry in an index."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from ..layout import REF_NAME, Descriptor, LayoutError
from .config import Fingerprint, SnapshotConfig
from .media import (
    ARTIFACT_TYPE,
    CONFIG_MEDIA_TYPE,
    CRIU_LAYER_V1,
    CRIU_PART_LAYER,
    CRIU_WHOLE_LAYER,
    DELETED_LAYER,
    MANIFEST_MEDIA_TYPE,
    NAMESPACE,
    OCI_BASE_NAME,
    OCI_CREATED,
    OCI_TITLE,
    PART_FILE,
    PART_OFFSET,
    ROOTFS_LAYER,
    SnapshotFormatError,
)

# The name of a CRIU image file (a file part's dev.thaw.file, a member of the whole-file tar).
IMAGE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,254}$")


@dataclass(frozen=True)
class FilePart:
    """One byte range of one large CRIU image file, stored as a blob of its own."""
    file: str
    offset: int
    desc: Descriptor


@dataclass(frozen=True)
class Snapshot:
    ref: str                        # NAME:TAG
    namespace: str                  # the owner
    manifest: Descriptor
    config_desc: Descriptor
    config: SnapshotConfig
    criu_whole: Descriptor          # format 2: the tar of whole CRIU files; format 1: the whole CRIU tar
    parts: tuple[FilePart, ...]
    rootfs: Descriptor
    deleted: Descriptor

    @property
    def format_version(self) -> int:
        return self.config.format_version

    @property
    def layers(self) -> list[Descriptor]:
        return [self.criu_whole, *(p.desc for p in self.parts), self.rootfs, self.deleted]

    @property
    def blobs(self) -> list[Descriptor]:
        return [self.manifest, self.config_desc, *self.layers]

    @property
    def fingerprint(self) -> Fingerprint:
        return self.config.fingerprint

    @property
    def size(self) -> int:
        return sum(d.size for d in self.blobs)

    def files(self) -> dict[str, int]:
        """Large CRIU files stored as parts -> their sizes."""
        out: dict[str, int] = {}
        for p in self.parts:
            out[p.file] = max(out.get(p.file, 0), p.offset + p.desc.size)
        return out


def manifest_blob(config: SnapshotConfig, config_desc: Descriptor, criu_whole: Descriptor,
                  parts: list[FilePart], rootfs: Descriptor, deleted: Descriptor) -> bytes:
    layers = [criu_whole.to_json()]
    for p in parts:
        layers.append(Descriptor(CRIU_PART_LAYER, p.desc.digest, p.desc.size,
                                 {PART_FILE: p.file, PART_OFFSET: str(p.offset)}).to_json())
    layers += [rootfs.to_json(), deleted.to_json()]
    annotations = {OCI_CREATED: config.created, OCI_TITLE: config.ref, NAMESPACE: config.namespace}
    if config.fingerprint.container.image:
        annotations[OCI_BASE_NAME] = config.fingerprint.container.image
    manifest = {"schemaVersion": 2, "mediaType": MANIFEST_MEDIA_TYPE, "artifactType": ARTIFACT_TYPE,
                "config": config_desc.to_json(), "layers": layers, "annotations": annotations}
    return json.dumps(manifest, sort_keys=True).encode()


def parse_manifest(data: bytes, desc: Descriptor) -> tuple[Descriptor, list[Descriptor]]:
    """(config descriptor, layer descriptors) of a thaw snapshot manifest."""
    try:
        manifest = json.loads(data)
        if not isinstance(manifest, dict) or manifest.get("artifactType") != ARTIFACT_TYPE:
            raise SnapshotFormatError(f"{desc.digest} is not a thaw snapshot manifest")
        config_desc = Descriptor.from_json(manifest["config"])
        if config_desc.media_type != CONFIG_MEDIA_TYPE:
            raise SnapshotFormatError(f"unexpected config media type {config_desc.media_type}")
        return config_desc, [Descriptor.from_json(obj) for obj in manifest.get("layers") or []]
    except KeyError as exc:
        raise SnapshotFormatError(f"snapshot {desc.digest} lacks {exc}") from exc
    except (ValueError, TypeError, AttributeError) as exc:
        if isinstance(exc, LayoutError):
            raise
        raise SnapshotFormatError(f"snapshot {desc.digest} is malformed: {exc}") from exc


def assemble(ref: str, desc: Descriptor, config_desc: Descriptor, config: SnapshotConfig,
             layers: list[Descriptor]) -> Snapshot:
    """A Snapshot from its verified manifest parts; checks the layers make a whole snapshot."""
    by_type: dict[str, Descriptor] = {}
    parts: list[FilePart] = []
    for d in layers:
        if d.media_type == CRIU_PART_LAYER:
            ann = d.annotations or {}
            name, offset = ann.get(PART_FILE, ""), ann.get(PART_OFFSET, "")
            if not IMAGE_NAME.match(name) or not offset.isdigit():
                raise SnapshotFormatError(f"file part {d.digest} has a bad file name or offset")
            parts.append(FilePart(name, int(offset), d))
        elif d.media_type in by_type:
            raise SnapshotFormatError(f"duplicate layer of type {d.media_type}")
        else:
            by_type[d.media_type] = d
    whole_type = CRIU_LAYER_V1 if config.format_version == 1 else CRIU_WHOLE_LAYER
    if config.format_version == 1 and parts:
        raise SnapshotFormatError("a format 1 snapshot has no file parts")
    _check_parts(parts)
    try:
        return Snapshot(ref or config.ref, config.namespace, desc, config_desc, config,
                        by_type[whole_type], tuple(parts), by_type[ROOTFS_LAYER], by_type[DELETED_LAYER])
    except KeyError as exc:
        raise SnapshotFormatError(f"snapshot {desc.digest} lacks a {exc} layer") from exc


def _check_parts(parts: list[FilePart]) -> None:
    """Each file's parts must follow each other exactly from offset 0 (no gap, no overlap)."""
    expected: dict[str, int] = {}
    for p in parts:
        if p.offset != expected.get(p.file, 0):
            raise SnapshotFormatError(f"parts of {p.file} are not contiguous at offset {p.offset}")
        expected[p.file] = p.offset + p.desc.size


def read_deleted(data: bytes) -> list[str]:
    try:
        obj = json.loads(data)
    except ValueError as exc:
        raise SnapshotFormatError(f"deleted-files layer is malformed: {exc}") from exc
    paths = obj.get("deleted") if isinstance(obj, dict) else None
    if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
        raise SnapshotFormatError("deleted-files layer is malformed")
    return paths


def deleted_blob(paths: list[str]) -> bytes:
    return json.dumps({"deleted": sorted(paths)}).encode()


def index_entry(snap: Snapshot) -> Descriptor:
    return Descriptor(MANIFEST_MEDIA_TYPE, snap.manifest.digest, snap.manifest.size,
                      {REF_NAME: snap.ref, NAMESPACE: snap.namespace})
