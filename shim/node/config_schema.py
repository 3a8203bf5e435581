"""The node config's keys: for each section, key -> (the type its value converts to, its default,
a check naming what is wrong), and reading a parsed config.yaml against them (`parse`: a message
that names the file and the key) and writing a config back as plain values (`dump`: what the
config cache holds). install/config.yaml documents each key; config.py holds the parsed config.

On the passthrough path (a cached config is parsed again on every call): imports nothing heavy.
"""

from __future__ import annotations

import os

from thaw.oci import ThawError

TYPE_CHECKING = False  # typing stays unimported on the passthrough path (tests/test_shape.py)
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    # A section's schema: key -> (type, default, check naming what is wrong with a value).
    Schema = dict[str, tuple[type, object, Callable[[Any], str | None] | None]]

LOG_LEVELS = ("debug", "info", "warning", "error")
VERIFY_MODES = ("stat", "digest")
# Sources of unsigned snapshots that trust.unsigned may name besides repository prefixes.
UNSIGNED_IMPORT = "import"          # `thaw import` of an archive carrying no trusted signature
UNSIGNED_THAW_0_1 = "thaw-0.1"      # snapshots of a store thaw 0.1 left (origin unknown)
SECTIONS = ("policy", "restore", "registry", "store", "trust")


class ConfigError(ThawError):
    """The node config cannot be read or holds a bad value."""


def _abs_path(v: str) -> str | None:
    return None if os.path.isabs(v) else "must be an absolute path"


def _optional_abs_path(v: str) -> str | None:
    return None if not v or os.path.isabs(v) else "must be empty or an absolute path"


def _one_of(choices: tuple[str, ...]) -> Callable[[str], str | None]:
    return lambda v: None if v in choices else f"must be one of {', '.join(choices)}"


def _positive(v: float) -> str | None:
    return None if v > 0 else "must be positive"


def _not_negative(v: int) -> str | None:
    return None if v >= 0 else "must not be negative"


def _not_thaw(v: str) -> str | None:
    return "must not be thaw-runtime itself" if os.path.basename(v) == "thaw-runtime" else None


def _share(v: Any) -> str | None:
    if not isinstance(v, dict) or not all(isinstance(k, str) and isinstance(r, list) and
                                           all(isinstance(x, str) for x in r) for k, r in v.items()):
        return "must map a publishing namespace to a list of reader namespaces"
    return None


def _names(v: Any) -> str | None:
    return None if all(isinstance(x, str) for x in v) else "must be a list of names"


def _repo_map(v: Any) -> str | None:
    if not isinstance(v, dict) or not all(isinstance(k, str) and isinstance(r, list) and
                                           all(isinstance(x, str) and "/" in x for x in r) for k, r in v.items()):
        return "must map a namespace to a list of repository prefixes (REGISTRY/REPO...)"
    return None


def _quota_map(v: Any) -> str | None:
    if not isinstance(v, dict) or not all(isinstance(k, str) and isinstance(n, int) and not isinstance(n, bool)
                                           and n >= 0 for k, n in v.items()):
        return "must map a namespace to a number of bytes (0: unbounded)"
    return None


def _share_of_store(v: float) -> str | None:
    return None if 0 < v <= 1 else "must be more than 0 and at most 1"


def _key_map(v: Any) -> str | None:
    if not isinstance(v, dict) or not all(isinstance(k, str) and "/" in k and isinstance(r, list) and
                                           all(isinstance(x, str) and os.path.isabs(x) for x in r)
                                           for k, r in v.items()):
        return "must map a repository prefix (REGISTRY/REPO...) to a list of public key files (absolute paths)"
    return None


def _unsigned_sources(v: Any) -> str | None:
    if all(isinstance(x, str) and ("/" in x or x in (UNSIGNED_IMPORT, UNSIGNED_THAW_0_1)) for x in v):
        return None
    return f"must list repository prefixes (REGISTRY/REPO...), {UNSIGNED_IMPORT!r} or {UNSIGNED_THAW_0_1!r}"


TOP: Schema = {
    "store_dir": (str, "/var/lib/thaw", _abs_path),
    "state_dir": (str, "/run/thaw", _abs_path),
    "next_runtime": (str, "runc", _not_thaw),
    "criu": (str, "", None),
    "hook": (str, "/usr/local/bin/thaw-hook", None),
    "capture_ready_timeout": (float, 1800.0, _positive),
    "log_level": (str, "info", _one_of(LOG_LEVELS)),
    "metrics_dir": (str, "", _optional_abs_path),
    "events_max_bytes": (int, 8 << 20, _positive),
}

POLICY: Schema = {
    "share": (dict, {}, _share),
    "env_may_differ": (list, ("HOSTNAME",), _names),
    "verify": (str, "stat", _one_of(VERIFY_MODES)),
    "required": (bool, False, None),
}

# restore: workers (-1 = one per core, "auto" in the file) and hugepages; read by _restore_section.
RESTORE_DEFAULTS: dict[str, object] = {"workers": -1, "hugepages": "auto"}

REGISTRY: Schema = {
    "auth_file": (str, "", _optional_abs_path),
    "ca_file": (str, "", _optional_abs_path),
    "insecure": (list, (), _names),
    "pull": (dict, {}, _repo_map),
    "push": (dict, {}, _repo_map),
    "pull_timeout": (float, 60.0, _positive),
    "pull_deadline": (float, 1800.0, _positive),
    "max_blobs": (int, 10000, _positive),
    "max_manifest_bytes": (int, 4 << 20, _positive),
}

STORE: Schema = {
    "max_bytes": (int, 0, _not_negative),
    "evict_unpushed": (bool, False, None),
    "quota": (dict, {}, _quota_map),
    "quota_share": (float, 0.5, _share_of_store),
}

TRUST: Schema = {
    "keys": (dict, {}, _key_map),
    "unsigned": (list, (), _unsigned_sources),
    "signing_key": (str, "", _optional_abs_path),
}


def defaults(schema: Schema) -> dict[str, object]:
    """key -> default of a section: its record's fields (config.py)."""
    return {key: default for key, (_, default, _) in schema.items()}


def _section(raw: object, schema: Schema, where: str) -> dict[str, Any]:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}must be a mapping")
    if "allow_cross_namespace" in raw:
        # Removed with namespace ownership; `false` (the old default, in every installed config)
        # still means what it meant, `true` would now mean something it never could.
        if raw["allow_cross_namespace"] not in (False, None):
            raise ConfigError(f"{where}allow_cross_namespace was removed: a snapshot belongs to the namespace "
                              "that captured it; name who may read whose snapshots in policy.share")
        raw = {k: v for k, v in raw.items() if k != "allow_cross_namespace"}
    unknown = set(raw) - set(schema)
    if unknown:
        raise ConfigError(f"{where}unknown keys: {', '.join(sorted(map(str, unknown)))}")
    out = {}
    for key, (kind, default, check) in schema.items():
        value = raw.get(key)
        if value is None:
            out[key] = default
            continue
        if kind is bool and not isinstance(value, bool):
            raise ConfigError(f"{where}{key} must be true or false")
        if kind in (int, float) and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ConfigError(f"{where}{key} must be a number")
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ConfigError(f"{where}{key} must be a whole number")
        if kind in (dict, list) and not isinstance(value, kind):
            raise ConfigError(f"{where}{key} must be a {'mapping' if kind is dict else 'list'}")
        value = kind(value)
        if kind is str and key == "log_level":
            value = value.lower()
        problem = check(value) if check else None
        if problem:
            raise ConfigError(f"{where}{key} {problem}")
        out[key] = tuple(value) if kind is list else value
    return out


def _restore_section(raw: object, where: str) -> dict[str, Any]:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}must be a mapping")
    unknown = set(raw) - set(RESTORE_DEFAULTS)
    if unknown:
        raise ConfigError(f"{where}unknown keys: {', '.join(sorted(map(str, unknown)))}")
    workers = raw.get("workers")
    if workers == "auto" or workers is None:
        workers = RESTORE_DEFAULTS["workers"]
    elif isinstance(workers, bool) or not isinstance(workers, int) or not 0 <= workers <= 64:
        raise ConfigError(f"{where}workers must be auto or a number from 0 to 64")
    hugepages = raw.get("hugepages")
    if hugepages is True or hugepages is False:
        hugepages = "on" if hugepages else "off"
    if hugepages is None:
        hugepages = RESTORE_DEFAULTS["hugepages"]
    if hugepages not in ("auto", "on", "off"):
        raise ConfigError(f"{where}hugepages must be auto, true or false")
    return {"workers": workers, "hugepages": hugepages}


def parse(raw: object, where: str) -> dict[str, Any]:
    """A parsed config.yaml (or a cached `dump`), checked: the top level's values, and each of
    SECTIONS as a mapping of its own values; lists become tuples. `where` prefixes messages."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}top level must be a mapping")
    values = _section({k: v for k, v in raw.items() if k not in SECTIONS}, TOP, where)
    values["policy"] = _section(raw.get("policy"), POLICY, where + "policy.")
    values["restore"] = _restore_section(raw.get("restore"), where + "restore.")
    registry = _section(raw.get("registry"), REGISTRY, where + "registry.")
    registry["pull"] = {k: tuple(v) for k, v in registry["pull"].items()}
    registry["push"] = {k: tuple(v) for k, v in registry["push"].items()}
    values["registry"] = registry
    values["store"] = _section(raw.get("store"), STORE, where + "store.")
    trust = _section(raw.get("trust"), TRUST, where + "trust.")
    trust["keys"] = {k: tuple(v) for k, v in trust["keys"].items()}
    values["trust"] = trust
    return values
