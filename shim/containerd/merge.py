"""What containerd loads for a main config and how it merges it.

containerd reads the main config, then its `imports` (breadth first, each file once; relative
entries relative to the importing file, entries with `*` as Go globs), and merges them in order:
- containerd >= 2.0 merges plugin sections key by key (version 2 files are first migrated to
  version 3);
- containerd 1.x replaces a plugin's whole section with the one from the file loaded last
  (containerd issues 5837 and 7982; the fix, PR 9982, is 2.0 only).
Reading uses the standard library's tomllib: this module only needs the values.
"""

from __future__ import annotations

import copy
import os
import tomllib
from collections.abc import Iterable
from typing import Any

from . import ContainerdConfigError, goglob

CRI_V2 = "io.containerd.grpc.v1.cri"       # config version 2: the CRI plugin holds the runtimes
CRI_V3 = "io.containerd.cri.v1.runtime"    # config version 3 (containerd 2.x)

ConfigFile = tuple[str, dict[str, Any]]              # (path, parsed content)


def cri_plugin(layout: int) -> str:
    """The plugin holding `containerd.runtimes` in config version `layout`."""
    return CRI_V2 if layout == 2 else CRI_V3


def load_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise ContainerdConfigError(f"{path}: not valid TOML: {exc}") from None
    except OSError as exc:
        raise ContainerdConfigError(f"{path}: {exc.strerror}") from None


def _absolute(parent: str, entry: object) -> str:
    path = os.path.normpath(str(entry))
    return path if os.path.isabs(path) else os.path.join(os.path.dirname(parent), path)


def resolve_imports(parent: str, imports: Iterable[object] | None) -> list[str]:
    """containerd's resolveImports: the files an `imports` array names, in order."""
    out = []
    for entry in imports or []:
        path = _absolute(parent, entry)
        out.extend(goglob.glob(path) if "*" in path else [path])
    return out


def covered(main: str, imports: Iterable[object] | None, path: str) -> bool:
    """Does an entry of `imports` load `path`, or match it once it exists?"""
    target = os.path.realpath(path)
    if any(os.path.realpath(p) == target for p in resolve_imports(main, imports)):
        return True
    d, name = os.path.split(os.path.abspath(path))
    for entry in imports or []:
        pattern = _absolute(main, entry)
        pd, pname = os.path.split(pattern)
        if "*" in pattern and not goglob.has_meta(pd) and os.path.realpath(pd) == os.path.realpath(d) \
                and goglob.match(pname, name):
            return True
    return False


def load_files(main: str, exclude: tuple[str, ...] = (), main_cfg: dict[str, Any] | None = None) -> list[ConfigFile]:
    """The files containerd loads for `--config main`, in its order (breadth first), each parsed.
    A missing main config reads as empty (containerd then runs on its defaults). Files in
    `exclude` are skipped as if they did not match; `main_cfg` stands for the main config's
    content when given."""
    skip = {os.path.realpath(p) for p in exclude}
    loaded: set[str] = set()
    files = []
    pending = [main]
    first = True
    while pending:
        path, pending = pending[0], pending[1:]
        if path in loaded:
            continue
        if os.path.realpath(path) in skip:
            loaded.add(path)
            continue
        if first and main_cfg is not None:
            cfg = main_cfg
        elif first and not os.path.exists(path):
            cfg = {}
        else:
            cfg = load_toml(path)
        first = False
        files.append((path, cfg))
        loaded.add(path)
        pending.extend(resolve_imports(path, cfg.get("imports")))
    return files


def deep_merge(into: dict[str, Any], src: dict[str, Any]) -> dict[str, Any]:
    """`src` merged into `into` key by key (containerd 2.x's rule); returns `into`."""
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            deep_merge(into[k], v)
        else:
            into[k] = copy.deepcopy(v)
    return into


def _migrate_v2(cfg: dict[str, Any]) -> dict[str, Any]:
    """The part of containerd 2.x's v2 -> v3 migration that concerns runtimes."""
    plugins = cfg.get("plugins") or {}
    cri = plugins.get(CRI_V2)
    if not isinstance(cri, dict) or "containerd" not in cri:
        return cfg
    cfg = copy.deepcopy(cfg)
    cri = cfg["plugins"][CRI_V2]
    deep_merge(cfg["plugins"].setdefault(CRI_V3, {}), {"containerd": cri.pop("containerd")})
    return cfg


def effective(files: list[ConfigFile], major: int) -> tuple[dict[str, Any], dict[str, str]]:
    """The merged config as containerd `major` builds it, and for each plugin the last file that
    set it. 2.x results are in the version 3 layout."""
    out: dict[str, Any] = {}
    owner: dict[str, str] = {}
    for path, cfg in files:
        if major >= 2 and cfg.get("version", 2) == 2:
            cfg = _migrate_v2(cfg)
        for k, v in cfg.items():
            if k == "plugins" and isinstance(v, dict):
                plugins = out.setdefault("plugins", {})
                for pid, section in v.items():
                    owner[pid] = path
                    if major >= 2 and isinstance(section, dict) and isinstance(plugins.get(pid), dict):
                        deep_merge(plugins[pid], section)
                    else:
                        plugins[pid] = copy.deepcopy(section)
            elif isinstance(v, dict) and isinstance(out.get(k), dict):
                deep_merge(out[k], v)
            else:
                out[k] = copy.deepcopy(v)
    return out, owner


def dig(d: Any, *keys: str) -> Any:
    """d[k1][k2]..., or None where a level is missing or not a table."""
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def runtimes_of(cfg: dict[str, Any], layout: int) -> dict[str, Any]:
    r = dig(cfg, "plugins", cri_plugin(layout), "containerd", "runtimes")
    return r if isinstance(r, dict) else {}


def default_runtime_name(cfg: dict[str, Any], layout: int) -> str:
    name = dig(cfg, "plugins", cri_plugin(layout), "containerd", "default_runtime_name")
    return name if isinstance(name, str) and name else "runc"


def cri_disabled(cfg: dict[str, Any]) -> bool:
    disabled = cfg.get("disabled_plugins") or []
    return any(d in ("cri", CRI_V2, CRI_V3) for d in disabled)
