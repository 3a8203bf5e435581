"""Node configuration: /etc/thaw/config.yaml, or the file named by THAW_CONFIG.

thaw-runtime reads the config on every runtime call, including pure passthrough, so this module
imports nothing heavy: parsing YAML (pyyaml alone costs ~20 ms to import) is kept off that path
by caching the parsed config with `marshal` (built in, no import cost) in
/run/thaw/config-cache/, keyed by the config file's path and validated by its (mtime, size,
inode). A missing or unwritable cache just means parsing the YAML.
"""

from __future__ import annotations

import marshal
import os

DEFAULT_PATH = "/etc/thaw/config.yaml"
CACHE_DIR = "/run/thaw/config-cache"
LOG_LEVELS = ("debug", "info", "warning", "error")
VERIFY_MODES = ("stat", "digest")


class ConfigError(ValueError):
    pass


class _Record:
    """Tiny immutable record with keyword defaults and value equality (no dataclasses import)."""
    _fields: dict = {}

    def __init__(self, **values):
        unknown = set(values) - set(self._fields)
        if unknown:
            raise TypeError(f"unknown fields {unknown}")
        for k, default in self._fields.items():
            object.__setattr__(self, k, values.get(k, default))

    def __setattr__(self, name, value):
        raise AttributeError("read-only")

    def __eq__(self, other):
        return type(other) is type(self) and all(getattr(self, k) == getattr(other, k) for k in self._fields)

    def __repr__(self):
        return f"{type(self).__name__}({', '.join(f'{k}={getattr(self, k)!r}' for k in self._fields)})"


class Policy(_Record):
    _fields = {"allow_cross_namespace": False, "verify": "stat", "required": False}


class Config(_Record):
    _fields = {"store_dir": "/var/lib/thaw", "state_dir": "/run/thaw", "next_runtime": "runc",
               "criu": "", "hook": "/usr/local/bin/thaw-hook", "capture_ready_timeout": 1800.0,
               "log_level": "info", "policy": None, "source": None}

    def __init__(self, **values):
        values.setdefault("policy", Policy())
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


def make_private_dir(path: str) -> str:
    """Create `path` and any missing parents root-only (0700): makedirs' mode applies to the
    leaf only, and thaw's state and store must never be readable by others."""
    missing = []
    cur = path
    while cur and cur != "/" and not os.path.isdir(cur):
        missing.append(cur)
        cur = os.path.dirname(cur)
    for d in reversed(missing):
        try:
            os.mkdir(d, 0o700)
        except FileExistsError:
            pass
    return path


def which(name: str) -> str | None:
    """shutil.which without importing shutil (hot path)."""
    for d in (os.environ.get("PATH") or "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin").split(":"):
        p = os.path.join(d, name)
        if d and os.access(p, os.X_OK) and not os.path.isdir(p):
            return p
    return None


def _from_mapping(raw: object, source: str | None) -> Config:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: top level must be a mapping")
    known = {"store_dir", "state_dir", "next_runtime", "criu", "hook", "capture_ready_timeout",
             "log_level", "policy"}
    unknown = set(raw) - known
    if unknown:
        raise ConfigError(f"{source}: unknown keys: {', '.join(sorted(unknown))}")
    pol_raw = raw.get("policy") or {}
    if not isinstance(pol_raw, dict):
        raise ConfigError(f"{source}: policy must be a mapping")
    pol_unknown = set(pol_raw) - {"allow_cross_namespace", "verify", "required"}
    if pol_unknown:
        raise ConfigError(f"{source}: unknown policy keys: {', '.join(sorted(pol_unknown))}")
    policy = Policy(
        allow_cross_namespace=bool(pol_raw.get("allow_cross_namespace", False)),
        verify=str(pol_raw.get("verify", "stat")),
        required=bool(pol_raw.get("required", False)),
    )
    if policy.verify not in VERIFY_MODES:
        raise ConfigError(f"{source}: policy.verify must be one of {VERIFY_MODES}")
    cfg = Config(
        store_dir=str(raw.get("store_dir", Config._fields["store_dir"])),
        state_dir=str(raw.get("state_dir", Config._fields["state_dir"])),
        next_runtime=str(raw.get("next_runtime", Config._fields["next_runtime"])),
        criu=str(raw.get("criu") or ""),
        hook=str(raw.get("hook", Config._fields["hook"]) or ""),
        capture_ready_timeout=float(raw.get("capture_ready_timeout", 1800)),
        log_level=str(raw.get("log_level", "info")).lower(),
        policy=policy,
        source=source,
    )
    if cfg.log_level not in LOG_LEVELS:
        raise ConfigError(f"{source}: log_level must be one of {LOG_LEVELS}")
    for key in ("store_dir", "state_dir"):
        if not os.path.isabs(getattr(cfg, key)):
            raise ConfigError(f"{source}: {key} must be an absolute path")
    if os.path.basename(cfg.next_runtime) == "thaw-runtime":
        raise ConfigError(f"{source}: next_runtime must not be thaw-runtime itself")
    return cfg


def _to_mapping(cfg: Config) -> dict:
    return {"store_dir": cfg.store_dir, "state_dir": cfg.state_dir, "next_runtime": cfg.next_runtime,
            "criu": cfg.criu, "hook": cfg.hook, "capture_ready_timeout": cfg.capture_ready_timeout,
            "log_level": cfg.log_level,
            "policy": {"allow_cross_namespace": cfg.policy.allow_cross_namespace,
                       "verify": cfg.policy.verify, "required": cfg.policy.required}}


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
    cache = os.path.join(CACHE_DIR, os.path.abspath(path).replace("%", "%25").replace("/", "%2F"))
    try:
        with open(cache, "rb") as f:
            cached = marshal.load(f)
        if cached.get("key") == key:
            return _from_mapping(cached["config"], path)
    except (OSError, ValueError, EOFError, TypeError, KeyError, AttributeError, ConfigError):
        pass
    import yaml  # only when the cache is cold
    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read config {path}: {exc}") from exc
    cfg = _from_mapping(raw, path)
    try:
        make_private_dir(CACHE_DIR)
        tmp = f"{cache}.{os.getpid()}"
        with open(tmp, "wb") as f:
            marshal.dump({"key": key, "config": _to_mapping(cfg)}, f)
        os.replace(tmp, cache)
    except OSError:
        pass
    return cfg
