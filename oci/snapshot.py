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

import io
import json
import os
import re
import tarfile
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from .layout import CHUNK, REF_NAME, Descriptor, HashingWriter, ImageLayout, LayoutError, check_digest

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


# --- the config blob, typed ---------------------------------------------------------------------
# Every other module reads and writes a snapshot's metadata through these classes; their JSON
# names are the format. Unknown keys are ignored on read (a newer writer may add some); a key of
# the wrong type is a SnapshotFormatError.

def _get(obj: Any, key: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
    if not isinstance(obj, dict):
        raise SnapshotFormatError(f"expected an object holding {key!r}, got {type(obj).__name__}")
    value = obj.get(key, default)
    if value is None:
        return default
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise SnapshotFormatError(f"{key!r} has the wrong type ({type(value).__name__})")
    return value


def _strs(obj: Any, key: str) -> tuple[str, ...]:
    items = _get(obj, key, list, [])
    if not all(isinstance(i, str) for i in items):
        raise SnapshotFormatError(f"{key!r} must be a list of strings")
    return tuple(items)


@dataclass(frozen=True)
class GpuFingerprint:
    """The GPUs a snapshot's CUDA state needs (empty: none). UUIDs are recorded, not compared:
    restore pairs them."""
    count: int = 0
    model: str | None = None
    uuids: tuple[str, ...] = ()
    driver: str | None = None
    cuda: int | None = None
    error: str | None = None          # why the GPUs could not be read (never in a snapshot)

    def to_json(self) -> dict[str, Any]:
        if not self.count:
            return {}
        return {"count": self.count, "model": self.model, "uuids": list(self.uuids),
                "driver": self.driver, "cuda": self.cuda}

    @classmethod
    def from_json(cls, obj: Any) -> "GpuFingerprint":
        obj = obj or {}
        return cls(count=_get(obj, "count", int, 0), model=_get(obj, "model", str),
                   uuids=_strs(obj, "uuids"), driver=_get(obj, "driver", str),
                   cuda=_get(obj, "cuda", int))


@dataclass(frozen=True)
class NodeFingerprint:
    kernel: str = ""
    arch: str = ""
    cpu_flags: tuple[str, ...] = ()
    criu: str | None = None
    runc: str = ""
    gpu: GpuFingerprint = GpuFingerprint()

    def to_json(self) -> dict[str, Any]:
        return {"kernel": self.kernel, "arch": self.arch, "cpu_flags": list(self.cpu_flags),
                "criu": self.criu, "runc": self.runc, "gpu": self.gpu.to_json()}

    @classmethod
    def from_json(cls, obj: Any) -> "NodeFingerprint":
        obj = obj or {}
        return cls(kernel=_get(obj, "kernel", str, ""), arch=_get(obj, "arch", str, ""),
                   cpu_flags=_strs(obj, "cpu_flags"), criu=_get(obj, "criu", str),
                   runc=_get(obj, "runc", str, ""), gpu=GpuFingerprint.from_json(obj.get("gpu")))


@dataclass(frozen=True)
class ContainerFingerprint:
    image: str | None = None
    mounts: tuple[str, ...] = ()
    namespace: str | None = None
    container_name: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"image": self.image, "mounts": list(self.mounts), "namespace": self.namespace,
                "container_name": self.container_name}

    @classmethod
    def from_json(cls, obj: Any) -> "ContainerFingerprint":
        obj = obj or {}
        return cls(image=_get(obj, "image", str), mounts=_strs(obj, "mounts"),
                   namespace=_get(obj, "namespace", str),
                   container_name=_get(obj, "container_name", str))


@dataclass(frozen=True)
class Fingerprint:
    """What must match between where a snapshot was captured and where it is restored."""
    node: NodeFingerprint = NodeFingerprint()
    container: ContainerFingerprint = ContainerFingerprint()

    def to_json(self) -> dict[str, Any]:
        return {"node": self.node.to_json(), "container": self.container.to_json()}

    @classmethod
    def from_json(cls, obj: Any) -> "Fingerprint":
        obj = obj or {}
        return cls(NodeFingerprint.from_json(_get(obj, "node", dict, {})),
                   ContainerFingerprint.from_json(_get(obj, "container", dict, {})))


@dataclass(frozen=True)
class Source:
    """Where the snapshot came from (informational)."""
    container_id: str = ""
    image: str | None = None
    namespace: str | None = None
    container_name: str | None = None
    left_running: bool = True

    def to_json(self) -> dict[str, Any]:
        return {"container_id": self.container_id, "image": self.image, "namespace": self.namespace,
                "container_name": self.container_name, "left_running": self.left_running}

    @classmethod
    def from_json(cls, obj: Any) -> "Source":
        obj = obj or {}
        return cls(container_id=_get(obj, "container_id", str, ""), image=_get(obj, "image", str),
                   namespace=_get(obj, "namespace", str),
                   container_name=_get(obj, "container_name", str),
                   left_running=_get(obj, "left_running", bool, True))


@dataclass(frozen=True)
class Sizes:
    criu_bytes: int = 0
    rootfs_bytes: int = 0
    rootfs_entries: int = 0
    rootfs_deleted: int = 0
    gpu_bytes: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"criu_bytes": self.criu_bytes, "rootfs_bytes": self.rootfs_bytes,
                "rootfs_entries": self.rootfs_entries, "rootfs_deleted": self.rootfs_deleted,
                "gpu_bytes": self.gpu_bytes}

    @classmethod
    def from_json(cls, obj: Any) -> "Sizes":
        obj = obj or {}
        return cls(**{k: _get(obj, k, int, 0) for k in
                      ("criu_bytes", "rootfs_bytes", "rootfs_entries", "rootfs_deleted", "gpu_bytes")})


@dataclass(frozen=True)
class GpuState:
    """The checkpointed CUDA processes a snapshot holds: a restore must restore and unlock them."""
    pids: int = 0
    uuids: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"pids": self.pids, "uuids": list(self.uuids)} if self.pids else {}

    @classmethod
    def from_json(cls, obj: Any) -> "GpuState":
        obj = obj or {}
        return cls(pids=_get(obj, "pids", int, 0), uuids=_strs(obj, "uuids"))


@dataclass(frozen=True)
class Listen:
    addr: str
    port: int

    def to_json(self) -> dict[str, Any]:
        return {"addr": self.addr, "port": self.port}


@dataclass(frozen=True)
class Network:
    """The listening TCP sockets of the captured network namespace (a restore needs their
    addresses), and whether it was joined by path (a pod's)."""
    listen: tuple[Listen, ...] = ()
    netns_joined: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"listen": [sock.to_json() for sock in self.listen], "netns_joined": self.netns_joined}

    @classmethod
    def from_json(cls, obj: Any) -> "Network":
        obj = obj or {}
        listen = tuple(Listen(_get(s, "addr", str, ""), _get(s, "port", int, 0))
                       for s in _get(obj, "listen", list, []))
        return cls(listen, _get(obj, "netns_joined", bool, False))


@dataclass(frozen=True)
class SnapshotConfig:
    """The config blob: everything thaw records about a snapshot besides its layers."""
    ref: str
    fingerprint: Fingerprint
    source: Source = Source()
    sizes: Sizes = Sizes()
    phases: dict[str, float] = field(default_factory=dict)
    gpu: GpuState = GpuState()
    network: Network = Network()
    created: str = ""
    format_version: int = FORMAT_VERSION

    def to_json(self) -> dict[str, Any]:
        return {"formatVersion": self.format_version, "ref": self.ref,
                "created": self.created or now_rfc3339(),
                "fingerprint": self.fingerprint.to_json(), "source": self.source.to_json(),
                "sizes": self.sizes.to_json(),
                "phases": {k: round(v, 4) for k, v in self.phases.items()},
                "gpu": self.gpu.to_json(), "network": self.network.to_json()}

    @classmethod
    def from_json(cls, obj: Any) -> "SnapshotConfig":
        version = _get(obj, "formatVersion", int)
        if version != FORMAT_VERSION:
            raise SnapshotFormatError(f"unsupported snapshot format version {version!r}")
        phases = _get(obj, "phases", dict, {})
        if not all(isinstance(v, (int, float)) for v in phases.values()):
            raise SnapshotFormatError("'phases' must map names to seconds")
        return cls(ref=_get(obj, "ref", str, ""),
                   fingerprint=Fingerprint.from_json(_get(obj, "fingerprint", dict, {})),
                   source=Source.from_json(_get(obj, "source", dict, {})),
                   sizes=Sizes.from_json(_get(obj, "sizes", dict, {})),
                   phases={str(k): float(v) for k, v in phases.items()},
                   gpu=GpuState.from_json(_get(obj, "gpu", dict, {})),
                   network=Network.from_json(_get(obj, "network", dict, {})),
                   created=_get(obj, "created", str, ""), format_version=version)


@dataclass(frozen=True)
class Snapshot:
    ref: str                       # NAME:TAG
    manifest: Descriptor
    config_desc: Descriptor
    config: SnapshotConfig
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
    def fingerprint(self) -> Fingerprint:
        return self.config.fingerprint

    @property
    def size(self) -> int:
        return sum(d.size for d in self.blobs)


def now_rfc3339() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def write_snapshot(layout: ImageLayout, config: SnapshotConfig, criu: Descriptor,
                   rootfs: Descriptor, deleted: Descriptor) -> Snapshot:
    """Write config and manifest blobs (layers must already be in the layout). Not yet published."""
    ref = config.ref
    config_json = config.to_json()
    config = SnapshotConfig.from_json(config_json)        # with its creation time fixed
    config_desc = layout.put_bytes(json.dumps(config_json, sort_keys=True).encode(), CONFIG_MEDIA_TYPE)
    manifest = {
        "schemaVersion": 2,
        "mediaType": MANIFEST_MEDIA_TYPE,
        "artifactType": ARTIFACT_TYPE,
        "config": config_desc.to_json(),
        "layers": [criu.to_json(), rootfs.to_json(), deleted.to_json()],
        "annotations": {"org.opencontainers.image.created": config.created, REF_NAME: ref},
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
        config = SnapshotConfig.from_json(json.loads(layout.read_blob(config_desc, MAX_META)))
        layers = {}
        for obj in manifest.get("layers") or []:
            d = Descriptor.from_json(obj)
            if d.media_type in layers:
                raise SnapshotFormatError(f"duplicate layer of type {d.media_type}")
            layers[d.media_type] = d
        return Snapshot(ref or config.ref, desc, config_desc, config,
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
    returns each file's digest."""
    hashes = {}
    with tarfile.open(fileobj=src, mode="r|") as tar:
        for member in tar:
            if not member.isreg() or not _IMAGE_NAME.match(member.name):
                raise SnapshotFormatError(f"CRIU layer holds an unexpected entry: {member.name!r}")
            f = tar.extractfile(member)
            assert f is not None
            path = os.path.join(dest_dir, member.name)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "wb") as out:
                w = HashingWriter(out)
                while chunk := f.read(CHUNK):
                    w.write(chunk)
            hashes[member.name] = w.digest
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
