"""The names of thaw's snapshot format: media types, annotation keys, versions, and the one error
a malformed snapshot raises."""

from __future__ import annotations

from ..layout import LayoutError

MANIFEST_MEDIA_TYPE = "application/vnd.oci.image.manifest.v1+json"
ARTIFACT_TYPE = "application/vnd.thaw.snapshot.v1"
CONFIG_MEDIA_TYPE = "application/vnd.thaw.snapshot.config.v1+json"
CRIU_WHOLE_LAYER = "application/vnd.thaw.criu.images.v2.tar"
CRIU_PART_LAYER = "application/vnd.thaw.criu.file-part.v2"
CRIU_LAYER_V1 = "application/vnd.thaw.criu.images.v1.tar"
ROOTFS_LAYER = "application/vnd.thaw.rootfs.diff.v1.tar"
DELETED_LAYER = "application/vnd.thaw.rootfs.deleted.v1+json"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
MAX_META = 16 << 20
NAMESPACE = "dev.thaw.namespace"          # index and manifest annotation: the owner namespace
PART_FILE = "dev.thaw.file"
PART_OFFSET = "dev.thaw.offset"
OCI_CREATED = "org.opencontainers.image.created"
OCI_TITLE = "org.opencontainers.image.title"
OCI_BASE_NAME = "org.opencontainers.image.base.name"


class SnapshotFormatError(LayoutError):
    """A manifest, config or archive is not a valid thaw snapshot."""
