"""The config blob, typed: every other module reads and writes a snapshot's metadata through these
classes; their JSON names are the format. Unknown keys are ignored on read (a newer writer may
add some); a key of the wrong type is a SnapshotFormatError."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from ..annotations import LOCAL_NAMESPACE, valid_namespace
from .media import FORMAT_VERSION, READABLE_VERSIONS, SnapshotFormatError


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
