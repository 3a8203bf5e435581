"""thaw's snapshot artifact: the one place that knows its format.

A snapshot is an OCI image manifest (artifactType `application/vnd.thaw.snapshot.v1`) whose
config blob (`application/vnd.thaw.snapshot.config.v1+json`) says which format version it is.

Format 2 (written since the namespace and one-copy changes):
  config  fingerprint, owner namespace, process identity, source, sizes, phases, gpu, network
  layers  application/vnd.thaw.criu.images.v2.tar       the CRIU image files stored whole (all but
                                                         the large ones), a flat tar
          application/vnd.thaw.criu.file-part.v2         one byte range of one large CRIU image
                                                         file (annotations dev.thaw.file,
                                                         dev.thaw.offset); a file's parts are in
                                                         offset order and cover it exactly
          application/vnd.thaw.rootfs.diff.v1.tar        files the container added or changed
          application/vnd.thaw.rootfs.deleted.v1+json    paths the container deleted
Large files (the pages images) are parts so that a store can keep each CRIU image file once, as
CRIU reads it, and still serve every blob by digest (a part is a range of that file); and so that
capture hashes them in parallel.

Format 1 (read for import and migration only): one `application/vnd.thaw.criu.images.v1.tar`
layer holding the whole CRIU image directory; the namespace inside the fingerprint.

An exported snapshot is an OCI archive: a tar of an image layout holding just that snapshot.

The parts: media.py (the format's names and its error), config.py (the config blob, typed),
manifest.py (the manifest and the Snapshot it makes), files.py (a CRIU image directory as whole
files and parts), archive.py (the OCI archive). Callers use this package's names
(`from thaw.oci import snapshot as fmt`).
"""

from __future__ import annotations

from ..layout import Descriptor
from .archive import (
    ArchiveIndex,
    BlobOpener,
    scan_archive,
    write_archive,
)
from .config import (
    ContainerFingerprint,
    Fingerprint,
    GpuFingerprint,
    GpuState,
    Listen,
    Network,
    NodeFingerprint,
    ProcessCreds,
    Sizes,
    SnapshotConfig,
    Source,
    WeightFile,
    Weights,
    now_rfc3339,
)
from .files import (
    PART_SIZE,
    PART_THRESHOLD,
    RangeReader,
    criu_dir_entries,
    hash_range,
    pack_whole_files,
    split_for_parts,
    unpack_whole_files,
)
from .manifest import (
    IMAGE_NAME,
    FilePart,
    Snapshot,
    assemble,
    deleted_blob,
    index_entry,
    manifest_blob,
    parse_manifest,
    read_deleted,
)
from .media import (
    ARTIFACT_TYPE,
    CONFIG_MEDIA_TYPE,
    CRIU_LAYER_V1,
    CRIU_PART_LAYER,
    CRIU_WHOLE_LAYER,
    DELETED_LAYER,
    FORMAT_VERSION,
    MANIFEST_MEDIA_TYPE,
    MAX_META,
    NAMESPACE,
    OCI_BASE_NAME,
    OCI_CREATED,
    OCI_TITLE,
    PART_FILE,
    PART_OFFSET,
    READABLE_VERSIONS,
    ROOTFS_LAYER,
    SnapshotFormatError,
)

__all__ = [
    "ARTIFACT_TYPE",
    "CONFIG_MEDIA_TYPE",
    "CRIU_LAYER_V1",
    "CRIU_PART_LAYER",
    "CRIU_WHOLE_LAYER",
    "DELETED_LAYER",
    "FORMAT_VERSION",
    "IMAGE_NAME",
    "MANIFEST_MEDIA_TYPE",
    "MAX_META",
    "NAMESPACE",
    "OCI_BASE_NAME",
    "OCI_CREATED",
    "OCI_TITLE",
    "PART_FILE",
    "PART_OFFSET",
    "PART_SIZE",
    "PART_THRESHOLD",
    "READABLE_VERSIONS",
    "ROOTFS_LAYER",
    "ArchiveIndex",
    "BlobOpener",
    "ContainerFingerprint",
    "Descriptor",
    "FilePart",
    "Fingerprint",
    "GpuFingerprint",
    "GpuState",
    "Listen",
    "Network",
    "NodeFingerprint",
    "ProcessCreds",
    "RangeReader",
    "Sizes",
    "Snapshot",
    "SnapshotConfig",
    "SnapshotFormatError",
    "Source",
    "WeightFile",
    "Weights",
    "assemble",
    "criu_dir_entries",
    "deleted_blob",
    "hash_range",
    "index_entry",
    "manifest_blob",
    "now_rfc3339",
    "pack_whole_files",
    "parse_manifest",
    "read_deleted",
    "scan_archive",
    "split_for_parts",
    "unpack_whole_files",
    "write_archive",
]
