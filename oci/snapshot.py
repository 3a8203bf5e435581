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
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import IO, Any, cast

from .annotations import LOCAL_NAMESPACE, valid_namespace
from .layout import (
    CHUNK,
    INDEX_MEDIA_TYPE,
    LAYOUT_VERSION,
    REF_NAME,
    ByteSink,
    Descriptor,
    HashingWriter,
    LayoutError,
    check_digest,
)

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
# CRIU image files at least this large are stored as parts of at most PART_SIZE bytes.
PART_THRESHOLD = 64 << 20
PART_SIZE = 256 << 20


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


def _ints(obj: Any, key: str) -> tuple[int, ...]:
    items = _get(obj, key, list, [])
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in items):
        raise SnapshotFormatError(f"{key!r} must be a list of integers")
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
    def from_json(cls, obj: Any) -> GpuFingerprint:
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
    def from_json(cls, obj: Any) -> NodeFingerprint:
        obj = obj or {}
        return cls(kernel=_get(obj, "kernel", str, ""), arch=_get(obj, "arch", str, ""),
                   cpu_flags=_strs(obj, "cpu_flags"), criu=_get(obj, "criu", str),
                   runc=_get(obj, "runc", str, ""), gpu=GpuFingerprint.from_json(obj.get("gpu")))


@dataclass(frozen=True)
class ContainerFingerprint:
    """What the captured container ran: its image (by name, or by the content of its image layers
    where nothing names it), its mount destinations (CRIU needs the same set)."""
    image: str | None = None
    mounts: tuple[str, ...] = ()
    container_name: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"image": self.image, "mounts": list(self.mounts), "container_name": self.container_name}

    @classmethod
    def from_json(cls, obj: Any) -> ContainerFingerprint:
        obj = obj or {}
        return cls(image=_get(obj, "image", str), mounts=_strs(obj, "mounts"),
                   container_name=_get(obj, "container_name", str))


@dataclass(frozen=True)
class Fingerprint:
    """What must match between where a snapshot was captured and where it is restored."""
    node: NodeFingerprint = NodeFingerprint()
    container: ContainerFingerprint = ContainerFingerprint()

    def to_json(self) -> dict[str, Any]:
        return {"node": self.node.to_json(), "container": self.container.to_json()}

    @classmethod
    def from_json(cls, obj: Any) -> Fingerprint:
        obj = obj or {}
        return cls(NodeFingerprint.from_json(_get(obj, "node", dict, {})),
                   ContainerFingerprint.from_json(_get(obj, "container", dict, {})))


@dataclass(frozen=True)
class ProcessCreds:
    """The credentials and confinement one captured process really had (from /proc/PID/status):
    CRIU restores exactly these, whatever the new spec says."""
    pid: int
    uids: tuple[int, ...] = ()        # real, effective, saved, filesystem
    gids: tuple[int, ...] = ()
    groups: tuple[int, ...] = ()
    cap_inh: int = 0
    cap_prm: int = 0
    cap_eff: int = 0
    cap_bnd: int = 0
    cap_amb: int = 0
    no_new_privs: bool = False
    seccomp: int = 0                  # 0 none, 1 strict, 2 filter

    def to_json(self) -> dict[str, Any]:
        return {"pid": self.pid, "uids": list(self.uids), "gids": list(self.gids),
                "groups": list(self.groups),
                "caps": {k: f"{getattr(self, 'cap_' + k):016x}" for k in ("inh", "prm", "eff", "bnd", "amb")},
                "no_new_privs": self.no_new_privs, "seccomp": self.seccomp}

    @classmethod
    def from_json(cls, obj: Any) -> ProcessCreds:
        caps = _get(obj, "caps", dict, {})
        try:
            masks = {f"cap_{k}": int(caps.get(k, "0"), 16) for k in ("inh", "prm", "eff", "bnd", "amb")}
        except (TypeError, ValueError) as exc:
            raise SnapshotFormatError(f"process capabilities are malformed: {exc}") from exc
        return cls(pid=_get(obj, "pid", int, 0), uids=_ints(obj, "uids"), gids=_ints(obj, "gids"),
                   groups=_ints(obj, "groups"), no_new_privs=_get(obj, "no_new_privs", bool, False),
                   seccomp=_get(obj, "seccomp", int, 0), **masks)


@dataclass(frozen=True)
class Source:
    """Where the snapshot came from (informational)."""
    container_id: str = ""
    image: str | None = None
    container_name: str | None = None
    left_running: bool = True

    def to_json(self) -> dict[str, Any]:
        return {"container_id": self.container_id, "image": self.image,
                "container_name": self.container_name, "left_running": self.left_running}

    @classmethod
    def from_json(cls, obj: Any) -> Source:
        obj = obj or {}
        return cls(container_id=_get(obj, "container_id", str, ""), image=_get(obj, "image", str),
                   container_name=_get(obj, "container_name", str),
                   left_running=_get(obj, "left_running", bool, True))


@dataclass(frozen=True)
class Sizes:
    criu_bytes: int = 0
    rootfs_bytes: int = 0
    rootfs_entries: int = 0
    rootfs_deleted: int = 0
    gpu_bytes: int = 0                # device memory the CUDA checkpoint moved into host memory
    # What the captured processes' memory held when CRIU dumped it, in bytes by kind of mapping:
    # heap, anonymous (GPU state staged by the CUDA checkpoint is here), stack, file_private
    # (libraries' and other files' private dirty pages), shared (memfd, shmem, SysV).
    composition: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"criu_bytes": self.criu_bytes, "rootfs_bytes": self.rootfs_bytes,
                "rootfs_entries": self.rootfs_entries, "rootfs_deleted": self.rootfs_deleted,
                "gpu_bytes": self.gpu_bytes, "composition": dict(self.composition)}

    @classmethod
    def from_json(cls, obj: Any) -> Sizes:
        obj = obj or {}
        composition = _get(obj, "composition", dict, {})
        if not all(isinstance(v, int) for v in composition.values()):
            raise SnapshotFormatError("'composition' must map kinds of memory to bytes")
        return cls(**{k: _get(obj, k, int, 0) for k in
                      ("criu_bytes", "rootfs_bytes", "rootfs_entries", "rootfs_deleted", "gpu_bytes")},
                   composition=dict(composition))


@dataclass(frozen=True)
class GpuState:
    """The checkpointed CUDA processes a snapshot holds: a restore must restore and unlock them."""
    pids: int = 0
    uuids: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"pids": self.pids, "uuids": list(self.uuids)} if self.pids else {}

    @classmethod
    def from_json(cls, obj: Any) -> GpuState:
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
    def from_json(cls, obj: Any) -> Network:
        obj = obj or {}
        listen = tuple(Listen(_get(s, "addr", str, ""), _get(s, "port", int, 0))
                       for s in _get(obj, "listen", list, []))
        return cls(listen, _get(obj, "netns_joined", bool, False))


@dataclass(frozen=True)
class WeightFile:
    """One weight file the engine reads at its wake, outside the snapshot: its path inside the
    container, size and content digest at capture, and where it came from: `image` (the layer
    that holds it, `layer`), `volume` (the mount's destination and, on the capturing node, its
    source), or `rootfs` (the container's root file system, no overlay to tell a layer by)."""
    path: str
    size: int
    digest: str
    origin: str = "rootfs"
    layer: str | None = None
    mount: str | None = None          # volume: the mount destination the path is under
    source: str | None = None         # volume: that mount's source on the capturing node

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"path": self.path, "size": self.size, "digest": self.digest, "origin": self.origin}
        for k in ("layer", "mount", "source"):
            if getattr(self, k) is not None:
                out[k] = getattr(self, k)
        return out

    @classmethod
    def from_json(cls, obj: Any) -> WeightFile:
        path, digest = _get(obj, "path", str, ""), _get(obj, "digest", str, "")
        origin = _get(obj, "origin", str, "rootfs")
        if not path.startswith("/") or origin not in ("image", "volume", "rootfs") or \
                not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
            raise SnapshotFormatError(f"weight file {path!r} is malformed")
        return cls(path, _get(obj, "size", int, 0), digest, origin, _get(obj, "layer", str),
                   _get(obj, "mount", str), _get(obj, "source", str))


@dataclass(frozen=True)
class Weights:
    """The weights manifest: the files the engine reloads at resume, and what the capture
    measured. `outside`: the engine released them before the dump (memory it held fell by at
    least the files' size), so the snapshot holds no weight bytes and a restore must find,
    verify and prefetch the files; False: the engine kept them, the snapshot carries them as
    before. held_before/held_after: the memory the container held around the quiesce, measured as
    `measure` says (gpu: device memory of its CUDA processes; rss: resident host memory)."""
    files: tuple[WeightFile, ...] = ()
    outside: bool = False
    held_before: int = 0
    held_after: int = 0
    measure: str = ""

    @property
    def bytes(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def released(self) -> int:
        return max(0, self.held_before - self.held_after)

    def to_json(self) -> dict[str, Any]:
        if not self.files:
            return {}
        return {"files": [f.to_json() for f in self.files], "outside": self.outside, "bytes": self.bytes,
                "held_before": self.held_before, "held_after": self.held_after, "released": self.released,
                "measure": self.measure}

    @classmethod
    def from_json(cls, obj: Any) -> Weights:
        obj = obj or {}
        return cls(tuple(WeightFile.from_json(f) for f in _get(obj, "files", list, [])),
                   _get(obj, "outside", bool, False), _get(obj, "held_before", int, 0),
                   _get(obj, "held_after", int, 0), _get(obj, "measure", str, ""))


@dataclass(frozen=True)
class SnapshotConfig:
    """The config blob: everything thaw records about a snapshot besides its layers."""
    ref: str
    fingerprint: Fingerprint
    namespace: str = LOCAL_NAMESPACE      # the owner: who captured it (authoritative)
    identity: dict[str, Any] = field(default_factory=dict)   # the capturing spec's process identity
    processes: tuple[ProcessCreds, ...] = ()
    source: Source = Source()
    sizes: Sizes = Sizes()
    phases: dict[str, float] = field(default_factory=dict)
    gpu: GpuState = GpuState()
    network: Network = Network()
    weights: Weights = Weights()
    created: str = ""
    format_version: int = FORMAT_VERSION

    def to_json(self) -> dict[str, Any]:
        return {"formatVersion": FORMAT_VERSION, "ref": self.ref, "namespace": self.namespace,
                "created": self.created or now_rfc3339(),
                "fingerprint": self.fingerprint.to_json(), "identity": self.identity,
                "processes": [p.to_json() for p in self.processes],
                "source": self.source.to_json(), "sizes": self.sizes.to_json(),
                "phases": {k: round(v, 4) for k, v in self.phases.items()},
                "gpu": self.gpu.to_json(), "network": self.network.to_json(),
                **({"weights": self.weights.to_json()} if self.weights.files else {})}

    @classmethod
    def from_json(cls, obj: Any) -> SnapshotConfig:
        version = _get(obj, "formatVersion", int)
        if version not in READABLE_VERSIONS:
            raise SnapshotFormatError(f"unsupported snapshot format version {version!r}")
        phases = _get(obj, "phases", dict, {})
        if not all(isinstance(v, (int, float)) for v in phases.values()):
            raise SnapshotFormatError("'phases' must map names to seconds")
        fp = _get(obj, "fingerprint", dict, {})
        if version == 1:    # the owner was the namespace in the container fingerprint
            namespace = _get(_get(fp, "container", dict, {}), "namespace", str) or LOCAL_NAMESPACE
        else:
            namespace = _get(obj, "namespace", str, "")
        if not valid_namespace(namespace):
            raise SnapshotFormatError(f"invalid owner namespace {namespace!r}")
        return cls(ref=_get(obj, "ref", str, ""), namespace=namespace,
                   fingerprint=Fingerprint.from_json(fp),
                   identity=_get(obj, "identity", dict, {}),
                   processes=tuple(ProcessCreds.from_json(p) for p in _get(obj, "processes", list, [])),
                   source=Source.from_json(_get(obj, "source", dict, {})),
                   sizes=Sizes.from_json(_get(obj, "sizes", dict, {})),
                   phases={str(k): float(v) for k, v in phases.items()},
                   gpu=GpuState.from_json(_get(obj, "gpu", dict, {})),
                   network=Network.from_json(_get(obj, "network", dict, {})),
                   weights=Weights.from_json(_get(obj, "weights", dict, {})),
                   created=_get(obj, "created", str, ""), format_version=version)

    def blob(self) -> bytes:
        return json.dumps(self.to_json(), sort_keys=True).encode()


def now_rfc3339() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


# --- the manifest -------------------------------------------------------------------------------

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
            if not _IMAGE_NAME.match(name) or not offset.isdigit():
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


# --- the CRIU image directory -------------------------------------------------------------------

_IMAGE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,254}$")


def criu_dir_entries(src_dir: str) -> list[str]:
    """The files of a CRIU image directory, sorted; anything unexpected is an error."""
    names = sorted(os.listdir(src_dir))
    for name in names:
        path = os.path.join(src_dir, name)
        if not os.path.isfile(path) or os.path.islink(path) or not _IMAGE_NAME.match(name):
            raise SnapshotFormatError(f"CRIU image directory holds an unexpected entry: {name}")
    return names


def split_for_parts(sizes: dict[str, int]) -> tuple[list[str], list[tuple[str, int, int]]]:
    """Which CRIU files are stored whole (in the tar) and the (file, offset, length) ranges of
    the others, in manifest order."""
    whole, ranges = [], []
    for name in sorted(sizes):
        size = sizes[name]
        if size < PART_THRESHOLD:
            whole.append(name)
            continue
        for offset in range(0, size, PART_SIZE):
            ranges.append((name, offset, min(PART_SIZE, size - offset)))
    return whole, ranges


def pack_whole_files(src_dir: str, names: list[str], out: ByteSink) -> None:
    """Tar the named CRIU files (flat, regular, sorted, owner root, mtime kept) into `out`."""
    # Stream mode ("w|") only writes; typeshed's tarfile asks every fileobj for read/seek/tell too.
    with tarfile.open(fileobj=cast("IO[bytes]", out), mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for name in names:
            path = os.path.join(src_dir, name)
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            with os.fdopen(fd, "rb") as f:
                st = os.fstat(f.fileno())
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = st.st_size, int(st.st_mtime), 0o600
                tar.addfile(info, f)


def unpack_whole_files(src: IO[bytes], dest_dir: str, limit: int) -> dict[str, str]:
    """Extract a (digest-verified) CRIU tar into dest_dir: flat regular files only, no sparse
    members, at most `limit` bytes in all. Returns each file's digest."""
    try:
        return _unpack_whole_files(src, dest_dir, limit)
    except tarfile.TarError as exc:
        raise SnapshotFormatError(f"CRIU layer is not a valid tar: {exc}") from exc


def _unpack_whole_files(src: IO[bytes], dest_dir: str, limit: int) -> dict[str, str]:
    hashes = {}
    total = 0
    with tarfile.open(fileobj=src, mode="r|") as tar:
        for member in tar:
            if not member.isreg() or member.issparse() or not _IMAGE_NAME.match(member.name):
                raise SnapshotFormatError(f"CRIU layer holds an unexpected entry: {member.name!r}")
            total += member.size
            if total > limit:
                raise SnapshotFormatError(f"CRIU layer unpacks to more than its {limit} bytes")
            f = tar.extractfile(member)
            assert f is not None
            fd = os.open(os.path.join(dest_dir, member.name),
                         os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "wb") as out:
                w = HashingWriter(out)
                while chunk := f.read(CHUNK):
                    w.write(chunk)
            if w.size != member.size:
                raise SnapshotFormatError(f"CRIU layer entry {member.name} is truncated")
            hashes[member.name] = w.digest
    return hashes


def hash_range(path: str, offset: int, length: int) -> str:
    """Digest of `length` bytes of `path` at `offset` (a file part)."""
    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        done = 0
        while done < length:
            chunk = os.pread(fd, min(CHUNK, length - done), offset + done)
            if not chunk:
                raise SnapshotFormatError(f"{path} is shorter than its parts say")
            h.update(chunk)
            done += len(chunk)
    finally:
        os.close(fd)
    return "sha256:" + h.hexdigest()


class RangeReader:
    """A readable stream of `length` bytes of a file at `offset` (a file part as a blob)."""

    def __init__(self, path: str, offset: int, length: int):
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self._pos, self._end = offset, offset + length

    def read(self, n: int = -1) -> bytes:
        n = self._end - self._pos if n < 0 else min(n, self._end - self._pos)
        data = os.pread(self._fd, n, self._pos) if n > 0 else b""
        self._pos += len(data)
        return data

    def close(self) -> None:
        os.close(self._fd)

    def __enter__(self) -> RangeReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- export / import: an OCI archive ------------------------------------------------------------

BlobOpener = Callable[[Descriptor], Any]     # -> a context manager yielding a readable stream


def write_archive(snaps: list[Snapshot], open_blob: BlobOpener, out_path: str,
                  attached: Sequence[tuple[str, bytes, dict[str, bytes]]] = ()) -> None:
    """Write `snaps` as an OCI archive to out_path (atomically): oci-layout and index.json first,
    then each snapshot's manifest, config and layers, so that a reader meets a manifest before
    its layers. attached: other manifests to carry (ref name, manifest bytes, its blobs by
    digest), e.g. cosign signatures under their `sha256-<hex>.sig` names. Every entry is 0600:
    the archive holds process memory."""
    d = os.path.dirname(os.path.abspath(out_path))
    fd, tmp = tempfile.mkstemp(prefix=".thaw-export-", dir=d)
    try:
        with os.fdopen(fd, "wb") as f, tarfile.open(fileobj=f, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            def add(name: str, size: int, stream: Any) -> None:
                info = tarfile.TarInfo(name)
                info.size, info.mode = size, 0o600
                tar.addfile(info, stream)
            def add_bytes(name: str, data: bytes) -> None:
                add(name, len(data), io.BytesIO(data))
            add_bytes("oci-layout", json.dumps(LAYOUT_VERSION).encode())
            extra = [Descriptor(MANIFEST_MEDIA_TYPE, "sha256:" + hashlib.sha256(data).hexdigest(), len(data),
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
        os.chmod(tmp, 0o600)
        os.replace(tmp, out_path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def index_entry(snap: Snapshot) -> Descriptor:
    return Descriptor(MANIFEST_MEDIA_TYPE, snap.manifest.digest, snap.manifest.size,
                      {REF_NAME: snap.ref, NAMESPACE: snap.namespace})


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
                digest = check_digest("sha256:" + name[len("blobs/sha256/"):])
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
