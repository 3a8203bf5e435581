"""Node configuration: /etc/thaw/config.yaml, or the file named by THAW_CONFIG.

thaw-runtime reads the config on every runtime call, including pure passthrough, so parsing YAML
(pyyaml alone costs ~20 ms to import) is kept off that path: the parsed config is cached as JSON
in /run/thaw/config-cache/, keyed by the config file's path and validated by its (mtime, size,
inode). A missing or unwritable cache just means parsing the YAML.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field

DEFAULT_PATH = "/etc/thaw/config.yaml"
CACHE_DIR = "/run/thaw/config-cache"
LOG_LEVELS = ("debug", "info", "warning", "error")
VERIFY_MODES = ("stat", "digest")


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class Policy:
    allow_cross_namespace: bool = False
    verify: str = "stat"
    required: bool = False


@dataclass(frozen=True)
class Config:
    store_dir: str = "/var/lib/thaw"
    state_dir: str = "/run/thaw"
    next_runtime: str = "runc"
    criu: str = ""
    log_level: str = "info"
    policy: Policy = field(default_factory=Policy)
    source: str | None = None

    def resolve_next_runtime(self) -> str:
        """Absolute path of the next runtime (never thaw-runtime itself)."""
        path = self.next_runtime if os.path.isabs(self.next_runtime) else shutil.which(self.next_runtime)
        if not path:
            raise ConfigError(f"next_runtime {self.next_runtime!r} not found on PATH")
        return path

    def resolve_criu(self) -> str:
        if self.criu:
            return self.criu
        if os.access("/usr/local/sbin/criu", os.X_OK):
            return "/usr/local/sbin/criu"
        return shutil.which("criu") or "criu"

    def logs(self, level: str) -> bool:
        return LOG_LEVELS.index(level) >= LOG_LEVELS.index(self.log_level)


def _from_mapping(raw: object, source: str | None) -> Config:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: top level must be a mapping")
    known = {"store_dir", "state_dir", "next_runtime", "criu", "log_level", "policy"}
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
        store_dir=str(raw.get("store_dir", Config.store_dir)),
        state_dir=str(raw.get("state_dir", Config.state_dir)),
        next_runtime=str(raw.get("next_runtime", Config.next_runtime)),
        criu=str(raw.get("criu") or ""),
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
            "criu": cfg.criu, "log_level": cfg.log_level,
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
    cache = os.path.join(CACHE_DIR, hashlib.sha256(os.path.abspath(path).encode()).hexdigest()[:24] + ".json")
    try:
        with open(cache) as f:
            cached = json.load(f)
        if cached.get("key") == key:
            return _from_mapping(cached["config"], path)
    except (OSError, ValueError, KeyError, ConfigError):
        pass
    import yaml  # only when the cache is cold
    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read config {path}: {exc}") from exc
    cfg = _from_mapping(raw, path)
    try:
        os.makedirs(CACHE_DIR, mode=0o700, exist_ok=True)
        tmp = f"{cache}.{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump({"key": key, "config": _to_mapping(cfg)}, f)
        os.replace(tmp, cache)
    except OSError:
        pass
    return cfg
