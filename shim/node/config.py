"""Node configuration: /etc/thaw/config.yaml, or the file named by THAW_CONFIG, as typed records.

thaw-runtime reads the config on every runtime call, including pure passthrough, so this module
imports nothing heavy: parsing YAML (pyyaml alone costs ~20 ms to import) is kept off that path
by caching the parsed config with `marshal` (built in, no import cost) in
/run/thaw/config-cache/, keyed by the config file's path and validated by its (mtime, size,
inode). A missing or unwritable cache just means parsing the YAML.

The keys, their types, defaults and checks are config_schema.py's tables; install/config.yaml
documents each.
"""

from __future__ import annotations

import marshal
import os

from . import config_schema
from .config_schema import LOG_LEVELS, ConfigError

TYPE_CHECKING = False  # typing stays unimported on the passthrough path (tests/test_shape.py)
if TYPE_CHECKING:
    from typing import Any, ClassVar

DEFAULT_PATH = "/etc/thaw/config.yaml"
CACHE_DIR = "/run/thaw/config-cache"
FRONT_MAGIC = "thaw-runtime-front 1\n"    # install/runtime-front.c reads the file _sync_front writes


class _Record:
    """Tiny immutable record with keyword defaults and value equality (no dataclasses import:
    this module is on the hot path)."""
    _fields: ClassVar[dict[str, object]] = {}

    def __init__(self, **values: object) -> None:
        unknown = set(values) - set(self._fields)
        if unknown:
            raise TypeError(f"unknown fields {unknown}")
        for k, default in self._fields.items():
            object.__setattr__(self, k, values.get(k, default))

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("read-only")

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and all(getattr(self, k) == getattr(other, k) for k in self._fields)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={getattr(self, k)!r}' for k in self._fields)})"


class Policy(_Record):
    share: dict[str, list[str]]
    env_may_differ: tuple[str, ...]
    verify: str
    required: bool
    _fields: ClassVar[dict[str, object]] = config_schema.defaults(config_schema.POLICY)

    def readable_from(self, namespace: str) -> tuple[str, ...]:
        """The namespaces whose snapshots `namespace` may restore besides its own, in the order
        the policy names them (`share: {PUBLISHER: [READER, ...]}`, "*" for every reader)."""
        return tuple(pub for pub, readers in self.share.items()
                     if pub != namespace and (namespace in readers or "*" in readers))


class Restore(_Record):
    """How CRIU fills a restored process's memory (thaw's CRIU patch 0002; a CRIU without it
    restores at stock speed whatever these say). workers: -1 = one per core, up to 16; 0 = stock.
    hugepages: "auto" = what the node's measured probe says, else "on"/"off"."""
    workers: int
    hugepages: str
    _fields: ClassVar[dict[str, object]] = config_schema.RESTORE_DEFAULTS

    def worker_count(self) -> int:
        return min(16, os.cpu_count() or 1) if self.workers < 0 else self.workers


class Registry(_Record):
    """How this node reaches registries (shim/lifecycle/distribution.py) and what pods may do with them.
    auth_file: docker-style config.json with credentials ("" = anonymous); ca_file: PEM bundle
    trusted besides the system's CAs; insecure: hosts spoken to over plain HTTP; pull / push:
    Kubernetes namespace -> repository prefixes (REGISTRY/REPO...) its pods' annotations may
    pull from / push to (default: none; the CLI, run by an operator, is not bound by these);
    pull_timeout: how long `thaw.dev/pull: wait` holds a create; pull_deadline: how long any
    one pull may take, all of it; max_blobs / max_manifest_bytes: the largest manifest a pull
    accepts (blobs listed, bytes)."""
    auth_file: str
    ca_file: str
    insecure: tuple[str, ...]
    pull: dict[str, tuple[str, ...]]
    push: dict[str, tuple[str, ...]]
    pull_timeout: float
    pull_deadline: float
    max_blobs: int
    max_manifest_bytes: int
    _fields: ClassVar[dict[str, object]] = config_schema.defaults(config_schema.REGISTRY)

    def allows(self, action: str, namespace: str, registry: str, repository: str) -> bool:
        """May pods of `namespace` pull (action "pull") or push ("push") REGISTRY/REPOSITORY?"""
        name = f"{registry}/{repository}"
        return any(under_prefix(name, prefix) for prefix in (self.pull if action == "pull" else self.push)
                   .get(namespace, ()))

    def pullers(self, registry: str, repository: str) -> tuple[str, ...]:
        """The namespaces registry.pull lets pull REGISTRY/REPOSITORY (the owners it may have here)."""
        return tuple(ns for ns in self.pull if self.allows("pull", ns, registry, repository))


def under_prefix(name: str, prefix: str) -> bool:
    """Is REGISTRY/REPO `name` the repository prefix `prefix` or below it (path components)?"""
    prefix = prefix.rstrip("/")
    return name == prefix or name.startswith(prefix + "/")


class Trust(_Record):
    """Which snapshots from outside this node may be restored (shim/node/provenance.py). Captured
    here: always. keys: repository prefix (REGISTRY/REPO...) -> public keys (PEM files) whose
    cosign signatures are accepted for snapshots from under that prefix (several: rotation;
    removing one: revocation, also of what it signed earlier). unsigned: sources whose unsigned
    snapshots are accepted anyway (repository prefixes, "import", "thaw-0.1"; default none).
    signing_key: the private key (PEM, ECDSA P-256) `thaw push --sign` signs with."""
    keys: dict[str, tuple[str, ...]]
    unsigned: tuple[str, ...]
    signing_key: str
    _fields: ClassVar[dict[str, object]] = config_schema.defaults(config_schema.TRUST)

    def keys_for(self, repository: str) -> tuple[str, ...]:
        """The public key files trusted for snapshots of REGISTRY/REPO `repository`."""
        out: list[str] = []
        for prefix, paths in self.keys.items():
            if under_prefix(repository, prefix):
                out += [p for p in paths if p not in out]
        return tuple(out)

    def accepts_unsigned(self, source: str) -> bool:
        """source: REGISTRY/REPO of a pull, "import" or "thaw-0.1"."""
        return any(source == entry or ("/" in entry and under_prefix(source, entry)) for entry in self.unsigned)


class StoreLimits(_Record):
    """The node cache's bound. max_bytes: 0 = unbounded. evict_unpushed: also evict snapshots
    captured or imported here that no registry holds (by default only pulled or pushed ones,
    which can be fetched again, are evicted). quota: namespace -> bytes it may hold (0:
    unbounded); quota_share: the quota of a namespace not listed, as a share of max_bytes (of
    the store's file system when max_bytes is 0)."""
    max_bytes: int
    evict_unpushed: bool
    quota: dict[str, int]
    quota_share: float
    _fields: ClassVar[dict[str, object]] = config_schema.defaults(config_schema.STORE)


class Config(_Record):
    store_dir: str
    state_dir: str
    next_runtime: str
    criu: str
    hook: str
    capture_ready_timeout: float
    log_level: str
    metrics_dir: str
    events_max_bytes: int
    policy: Policy
    restore: Restore
    registry: Registry
    store: StoreLimits
    trust: Trust
    source: str | None
    _fields: ClassVar[dict[str, object]] = {**config_schema.defaults(config_schema.TOP),
                                            **dict.fromkeys(config_schema.SECTIONS), "source": None}

    def __init__(self, **values: object) -> None:
        values.setdefault("policy", Policy())
        values.setdefault("restore", Restore())
        values.setdefault("registry", Registry())
        values.setdefault("store", StoreLimits())
        values.setdefault("trust", Trust())
        super().__init__(**values)

    def resolve_next_runtime(self) -> str:
        """Absolute path of the next runtime (never thaw-runtime itself)."""
        path = self.next_runtime if os.path.isabs(self.next_runtime) else which(self.next_runtime)
        if not path:
            raise ConfigError(f"next_runtime {self.next_runtime!r} not found on PATH")
        return path

    def resolve_criu(self) -> str:
        if self.criu:
            return self.criu
        if os.access("/usr/local/sbin/criu", os.X_OK):
            return "/usr/local/sbin/criu"
        return which("criu") or "criu"

    def logs(self, level: str) -> bool:
        return LOG_LEVELS.index(level) >= LOG_LEVELS.index(self.log_level)


def which(name: str) -> str | None:
    """shutil.which without importing shutil (hot path)."""
    for d in (os.environ.get("PATH") or "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin").split(":"):
        p = os.path.join(d, name)
        if d and os.access(p, os.X_OK) and not os.path.isdir(p):
            return p
    return None


def _from_mapping(raw: object, source: str | None) -> Config:
    v = config_schema.parse(raw, f"{source}: ")
    return Config(**{k: v[k] for k in config_schema.TOP}, policy=Policy(**v["policy"]),
                  restore=Restore(**v["restore"]), registry=Registry(**v["registry"]),
                  store=StoreLimits(**v["store"]), trust=Trust(**v["trust"]), source=source)


def load(path: str | None = None) -> Config:
    """Load the node config. A missing default file means all defaults; a missing THAW_CONFIG
    file or a malformed one raises ConfigError."""
    explicit = path or os.environ.get("THAW_CONFIG")
    path = explicit or DEFAULT_PATH
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if explicit:
            raise ConfigError(f"config file {path} does not exist") from None
        return Config()
    key = f"{st.st_mtime_ns}:{st.st_size}:{st.st_ino}"
    name = os.path.abspath(path).replace("%", "%25").replace("/", "%2F")
    cache = os.path.join(CACHE_DIR, name)
    try:
        with open(cache, "rb") as f:
            cached = marshal.load(f)
        if cached.get("key") == key:
            cfg = _from_mapping(cached["config"], path)
            _sync_front(name, key, cfg)
            return cfg
    except (OSError, ValueError, EOFError, TypeError, KeyError, AttributeError, ConfigError):
        pass
    import yaml  # noqa: PLC0415 - pyyaml ~20 ms: only when the config cache is cold
    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read config {path}: {exc}") from exc
    cfg = _from_mapping(raw, path)
    from thaw.oci.files import atomic_write, make_private_dir  # noqa: PLC0415 - passthrough: config imports only what a call uses
    try:
        make_private_dir(CACHE_DIR)
        atomic_write(cache, marshal.dumps({"key": key, "config": dump(cfg)}), durable=False)
    except OSError:
        pass
    _sync_front(name, key, cfg)
    return cfg


def _sync_front(name: str, key: str, cfg: Config) -> None:
    """Keep CACHE_DIR/front.NAME current: the two settings thaw-runtime's C front
    (install/runtime-front.c) needs to pass a call through without Python, for the config file
    with this key. One small read per load; written only when it differs. The front trusts it
    only while the key matches, so an edited config goes to Python until this runs again."""
    if any(c in v for v in (cfg.next_runtime, cfg.state_dir) for c in "\n\0"):
        return                                    # not expressible in the front's line format
    try:
        want = f"{FRONT_MAGIC}key={key}\nnext_runtime={cfg.next_runtime}\nstate_dir={cfg.state_dir}\n".encode()
    except UnicodeEncodeError:
        return
    front = os.path.join(CACHE_DIR, "front." + name)
    try:
        with open(front, "rb") as f:
            if f.read(len(want) + 1) == want:
                return
    except OSError:
        pass
    from thaw.oci.files import atomic_write, make_private_dir  # noqa: PLC0415 - passthrough: config imports only what a call uses
    try:
        make_private_dir(CACHE_DIR)
        atomic_write(front, want, mode=0o600, durable=False)
    except OSError:
        pass


def dump(cfg: Config) -> dict[str, Any]:
    """The config as plain values `parse` reads back (what the config cache holds)."""
    out = {k: getattr(cfg, k) for k in config_schema.TOP}
    out["policy"] = {k: (list(v) if isinstance(v, tuple) else v)
                     for k, v in ((k, getattr(cfg.policy, k)) for k in config_schema.POLICY)}
    out["restore"] = {"workers": "auto" if cfg.restore.workers < 0 else cfg.restore.workers,
                      "hugepages": cfg.restore.hugepages}
    reg = cfg.registry
    out["registry"] = {"auth_file": reg.auth_file, "ca_file": reg.ca_file, "insecure": list(reg.insecure),
                       "pull": {k: list(v) for k, v in reg.pull.items()},
                       "push": {k: list(v) for k, v in reg.push.items()}, "pull_timeout": reg.pull_timeout,
                       "pull_deadline": reg.pull_deadline, "max_blobs": reg.max_blobs,
                       "max_manifest_bytes": reg.max_manifest_bytes}
    out["store"] = {k: getattr(cfg.store, k) for k in config_schema.STORE}
    out["trust"] = {"keys": {k: list(v) for k, v in cfg.trust.keys.items()}, "unsigned": list(cfg.trust.unsigned),
                    "signing_key": cfg.trust.signing_key}
    return out
