"""thaw's snapshot artifact: the one place that knows its format.

A snapshot is an OCI image manifest (artifactType `application/vnd.thaw.snapshot.v1`) in an OCI
image layout:
  config  application/vnd.thaw.snapshot.config.v1+json   fingerprint, source, sizes, phases
  layers  application/vnd.thaw.criu.images.v1.tar        the CRIU image directory (flat)
          application/vnd.thaw.rootfs.diff.v1.tar        files the container added or changed
          application/vnd.thaw.rootfs.deleted.v1+json    paths the container deleted
The manifest's `org.opencontainers.image.ref.name` annotation in index.json carries NAME:TAG.

An exported snapshot is an OCI archive: a tar of a layout holding just that snapshot.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from .layout import REF_NAME, Descriptor, ImageLayout, LayoutError, check_digest

MANIFEST_MEDIA_TYPE = "application/vnd.oci.image.manifest.v1+json"
ARTIFACT_TYPE = "application/vnd.thaw.snapshot.v1"
CONFIG_MEDIA_TYPE = "application/vnd.thaw.snapshot.config.v1+json"
CRIU_LAYER = "application/vnd.thaw.criu.images.v1.tar"
ROOTFS_LAYER = "application/vnd.thaw.rootfs.diff.v1.tar"
DELETED_LAYER = "application/vnd.thaw.rootfs.deleted.v1+json"
FORMAT_VERSION = 1
MAX_META = 16 << 20


class SnapshotFormatError(LayoutError):
    """A manifest, config or archive is not a valid thaw snapshot."""


@dataclass(frozen=True)
class Snapshot:
    ref: str                       # NAME:TAG
    manifest: Descriptor
    config_desc: Descriptor
    config: dict[str, Any]
    criu: Descriptor
    rootfs: Descriptor
    deleted: Descriptor

    @property
    def layers(self) -> list[Descriptor]:
        return [self.criu, self.rootfs, self.deleted]

    @property
    def blobs(self) -> list[Descriptor]:
        return [self.manifest, self.config_desc, *self.layers]

    @property
    def fingerprint(self) -> dict[str, Any]:
        return self.config.get("fingerprint") or {}

    @property
    def size(self) -> int:
        return sum(d.size for d in self.blobs)


def now_rfc3339() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def make_config(ref: str, fingerprint: dict[str, Any], source: dict[str, Any],
                sizes: dict[str, int], phases: dict[str, float],
                gpu: dict[str, Any] | None = None, network: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"formatVersion": FORMAT_VERSION, "ref": ref, "created": now_rfc3339(),
            "fingerprint": fingerprint, "source": source, "sizes": sizes,
            "phases": {k: round(v, 4) for k, v in phases.items()}, "gpu": gpu or {},
            "network": network or {}}


def write_snapshot(layout: ImageLayout, ref: str, config: dict[str, Any], criu: Descriptor,
                   rootfs: Descriptor, deleted: Descriptor) -> Snapshot:
    """Write config and manifest blobs (layers must already be in the layout). Not yet published."""
    config_desc = layout.put_bytes(json.dumps(config, sort_keys=True).encode(), CONFIG_MEDIA_TYPE)
    manifest = {
        "schemaVersion": 2,
        "mediaType": MANIFEST_MEDIA_TYPE,
        "artifactType": ARTIFACT_TYPE,
        "config": config_desc.to_json(),
        "layers": [criu.to_json(), rootfs.to_json(), deleted.to_json()],
        "annotations": {"org.opencontainers.image.created": config["created"], REF_NAME: ref},
    }
    mdesc = layout.put_bytes(json.dumps(manifest, sort_keys=True).encode(), MANIFEST_MEDIA_TYPE)
    return Snapshot(ref, Descriptor(MANIFEST_MEDIA_TYPE, mdesc.digest, mdesc.size, {REF_NAME: ref}),
                    config_desc, config, criu, rootfs, deleted)


def read_snapshot(layout: ImageLayout, desc: Descriptor) -> Snapshot:
    """Load and verify (by digest) a snapshot's manifest and config."""
    ref = (desc.annotations or {}).get(REF_NAME, "")
    try:
        manifest = json.loads(layout.read_blob(desc, MAX_META))
        if manifest.get("artifactType") != ARTIFACT_TYPE:
            raise SnapshotFormatError(f"{desc.digest} is not a thaw snapshot manifest")
        config_desc = Descriptor.from_json(manifest["config"])
        if config_desc.media_type != CONFIG_MEDIA_TYPE:
            raise SnapshotFormatError(f"unexpected config media type {config_desc.media_type}")
        config = json.loads(layout.read_blob(config_desc, MAX_META))
        layers = {}
        for obj in manifest.get("layers") or []:
            d = Descriptor.from_json(obj)
            if d.media_type in layers:
                raise SnapshotFormatError(f"duplicate layer of type {d.media_type}")
            layers[d.media_type] = d
        if config.get("formatVersion") != FORMAT_VERSION:
            raise SnapshotFormatError(f"unsupported snapshot format version {config.get('formatVersion')!r}")
        return Snapshot(ref or str(config.get("ref", "")), desc, config_desc, config,
                        layers[CRIU_LAYER], layers[ROOTFS_LAYER], layers[DELETED_LAYER])
    except KeyError as exc:
        raise SnapshotFormatError(f"snapshot {desc.digest} lacks {exc}") from exc
    except (ValueError, TypeError, AttributeError) as exc:
        if isinstance(exc, LayoutError):
            raise
        raise SnapshotFormatError(f"snapshot {desc.digest} is malformed: {exc}") from exc


def read_deleted(layout: ImageLayout, snap: Snapshot) -> list[str]:
    obj = json.loads(layout.read_blob(snap.deleted, MAX_META))
    paths = obj.get("deleted") if isinstance(obj, dict) else None
    if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
        raise SnapshotFormatError("deleted-files layer is malformed")
    return paths


def deleted_blob(paths: list[str]) -> bytes:
    return json.dumps({"deleted": sorted(paths)}).encode()


# --- the CRIU layer: a flat tar of the image directory ------------------------------------------

_IMAGE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,254}$")


def pack_criu_dir(src_dir: str, out) -> None:
    """Tar the CRIU image directory (flat, regular files only, sorted) into a writable stream."""
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for name in criu_dir_entries(src_dir):
            path = os.path.join(src_dir, name)
            info = tar.gettarinfo(path, arcname=name)
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            with open(path, "rb") as f:
                tar.addfile(info, f)


def criu_dir_entries(src_dir: str) -> list[str]:
    """The files of a CRIU image directory, sorted; anything unexpected is an error."""
    names = sorted(os.listdir(src_dir))
    for name in names:
        path = os.path.join(src_dir, name)
        if not os.path.isfile(path) or os.path.islink(path) or not _IMAGE_NAME.match(name):
            raise SnapshotFormatError(f"CRIU image directory holds an unexpected entry: {name}")
    return names


def unpack_criu_layer(src, dest_dir: str) -> dict[str, str]:
    """Extract a CRIU layer stream into dest_dir, refusing anything but flat regular files;
    returns each file's sha256."""
    hashes = {}
    with tarfile.open(fileobj=src, mode="r|") as tar:
        for member in tar:
            if not member.isreg() or not _IMAGE_NAME.match(member.name):
                raise SnapshotFormatError(f"CRIU layer holds an unexpected entry: {member.name!r}")
            f = tar.extractfile(member)
            assert f is not None
            path = os.path.join(dest_dir, member.name)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            h = hashlib.sha256()
            with os.fdopen(fd, "wb") as out:
                while chunk := f.read(4 << 20):
                    h.update(chunk)
                    out.write(chunk)
            hashes[member.name] = h.hexdigest()
    return hashes


# --- export / import: an OCI archive ------------------------------------------------------------

def write_archive(layout: ImageLayout, snap: Snapshot, out_path: str) -> None:
    """Write `snap` as an OCI archive to out_path (atomically)."""
    d = os.path.dirname(os.path.abspath(out_path))
    fd, tmp = tempfile.mkstemp(prefix=".thaw-export-", dir=d)
    try:
        with os.fdopen(fd, "wb") as f, tarfile.open(fileobj=f, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            def add_bytes(name: str, data: bytes) -> None:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                info.mode = 0o644
                tar.addfile(info, io.BytesIO(data))
            add_bytes("oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}).encode())
            index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                     "manifests": [Descriptor(snap.manifest.media_type, snap.manifest.digest,
                                              snap.manifest.size, {REF_NAME: snap.ref}).to_json()]}
            add_bytes("index.json", json.dumps(index).encode())
            for desc in snap.blobs:
                path = layout.blob_path(desc.digest)
                info = tar.gettarinfo(path, arcname="blobs/sha256/" + desc.digest.split(":", 1)[1])
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                info.mode = 0o644
                with open(path, "rb") as bf:
                    tar.addfile(info, bf)
        os.replace(tmp, out_path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_archive(path: str, layout: ImageLayout) -> list[Snapshot]:
    """Stream an OCI archive's blobs into `layout`, each verified against its digest, and return
    the snapshots its index names (their manifests, configs and layers all verified present).
    Nothing is published: the caller decides that.
    """
    index_obj = None
    try:
        with tarfile.open(path, mode="r|*") as tar:
            for member in tar:
                name = member.name.lstrip("./") if member.name.startswith("./") else member.name
                if member.isdir() and name.rstrip("/") in ("", "blobs", "blobs/sha256"):
                    continue
                if not member.isreg():
                    raise SnapshotFormatError(f"archive entry {member.name!r} is not a regular file")
                f = tar.extractfile(member)
                assert f is not None
                if name == "oci-layout":
                    continue
                if name == "index.json":
                    if member.size > MAX_META:
                        raise SnapshotFormatError("index.json too large")
                    index_obj = json.loads(f.read())
                    continue
                if not name.startswith("blobs/sha256/"):
                    raise SnapshotFormatError(f"unexpected archive entry {member.name!r}")
                digest = check_digest("sha256:" + name[len("blobs/sha256/"):])
                layout.put_stream(f, Descriptor("application/octet-stream", digest, member.size))
    except tarfile.TarError as exc:
        raise SnapshotFormatError(f"{path}: not a readable archive: {exc}") from exc
    except EOFError as exc:
        raise SnapshotFormatError(f"{path}: archive is truncated") from exc
    if not isinstance(index_obj, dict):
        raise SnapshotFormatError(f"{path}: archive has no index.json")
    snaps = []
    for obj in index_obj.get("manifests") or []:
        desc = Descriptor.from_json(obj)
        if not (desc.annotations or {}).get(REF_NAME):
            raise SnapshotFormatError(f"manifest {desc.digest} in archive has no ref name")
        snap = read_snapshot(layout, desc)
        for layer in snap.layers:
            if not layout.has_blob(layer):
                raise SnapshotFormatError(f"archive lacks layer {layer.digest} of {snap.ref}")
        snaps.append(snap)
    if not snaps:
        raise SnapshotFormatError(f"{path}: archive names no snapshot")
    return snaps
