"""The `thaw` runtime handler: its entry, and the drop-in file that carries it.

What the drop-in holds follows containerd's merge rule (see merge.py):
- containerd 2.x merges key by key: the thaw table only.
- containerd 1.x replaces the whole CRI section with the last file's: a drop-in holding only the
  thaw table would drop every CRI setting of config.toml (cni bin_dir, sandbox_image,
  SystemdCgroup...) and, since it defines `runtimes`, the default `runc` runtime too. So there the
  drop-in carries a copy of the effective CRI section (what config.toml and its other imports
  set) plus the thaw table, and the default runtimes when config.toml defines none. NVIDIA's
  container toolkit does the same (its PR 1311). The cost: later edits to the CRI section of
  config.toml are shadowed until install/containerd.sh runs again (`thaw doctor` says so).
In both cases the thaw table starts from the default runtime's entry (runc), so settings such as
`SystemdCgroup` match the rest of the node.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import tomlkit

from thaw.oci import annotations as ann

from . import ContainerdConfigError, goglob
from .discovery import Version
from .merge import ConfigFile, cri_plugin, deep_merge, default_runtime_name, dig, effective, runtimes_of

HANDLER = "thaw"
RUNTIME_TYPE = "io.containerd.runc.v2"
DEFAULT_BINARY = "/usr/local/bin/thaw-runtime"
ANNOTATIONS = ["thaw.dev/*"]
# What the allow-lists must pass: every key of the pod contract.
ANNOTATION_KEYS = (ann.SNAPSHOT, ann.CAPTURE, ann.READY, ann.QUIESCE, ann.RESUME, ann.REQUIRED)
DEFAULT_CONF_D = "/etc/containerd/conf.d"
DROP_IN_NAME = "99-thaw.toml"


def uncovered(patterns: Iterable[object] | None, keys: Iterable[str] = ANNOTATION_KEYS) -> list[str]:
    """The keys an annotation allow-list (as read from TOML: anything) does not pass."""
    allowed = [p for p in (patterns or []) if isinstance(p, str)]
    return [k for k in keys if not any(goglob.match(p, k) for p in allowed)]


def layout_for(version: Version | None, main_cfg: dict[str, Any]) -> int:
    """The config version of the drop-in: 2 for containerd 1.x; for 2.x the main config's
    version when it is 2 (containerd refuses an import with a higher version than the main
    config), else 3."""
    major = version[0] if version else None
    main_version = main_cfg.get("version") if main_cfg else None
    if main_cfg and main_version is None:
        raise ContainerdConfigError(
            "the main config has no `version` line, so containerd reads it as version 1, which "
            "has no imports thaw can use: convert it to version 2 (containerd 1.x) or 3 (2.x) first")
    if major is None:
        raise ContainerdConfigError("cannot tell the containerd version (containerd --version)")
    if major < 2:
        if main_version not in (None, 2):
            raise ContainerdConfigError(f"containerd {major}.x needs config version 2, the main config has {main_version}")
        return 2
    if main_version not in (None, 2, 3):
        raise ContainerdConfigError(f"unsupported config version {main_version} for containerd {major}.x")
    return 3 if main_version is None else main_version


def thaw_runtime(base: dict[str, Any] | None, binary: str) -> dict[str, Any]:
    """The thaw entry: the default runtime's entry (SystemdCgroup, Root... carry over) with
    thaw's runtime_type, BinaryName and annotation allow-lists."""
    entry = copy.deepcopy(base) if isinstance(base, dict) and base.get("runtime_type", RUNTIME_TYPE) == RUNTIME_TYPE else {}
    entry.pop("runtime_path", None)  # a shim binary override of the base runtime: never inherit
    entry["runtime_type"] = RUNTIME_TYPE
    for key in ("pod_annotations", "container_annotations"):
        have = [a for a in entry.get(key) or [] if isinstance(a, str)]
        entry[key] = have + [a for a in ANNOTATIONS if a not in have]
    options: dict[str, Any] = entry["options"] if isinstance(entry.get("options"), dict) else {}
    options["BinaryName"] = binary
    entry["options"] = options
    return entry


def build(source: list[ConfigFile], layout: int, major: int, binary: str, defaults: dict[str, Any]) -> dict[str, Any]:
    """The drop-in's content, from the files containerd loads without the drop-in (`source`)
    and `containerd config default` (`defaults`)."""
    plugin = cri_plugin(layout)
    eff, _ = effective(source, major)
    if major >= 2:
        # containerd 2.x's merged config and defaults are in the version 3 layout, whatever
        # version the drop-in is written in
        eff_rts = deep_merge(copy.deepcopy(runtimes_of(defaults, 3)), runtimes_of(eff, 3))
        base = eff_rts.get(default_runtime_name(eff, 3)) or eff_rts.get("runc")
        runtimes = {HANDLER: thaw_runtime(base, binary)}
        return {"version": layout, "plugins": {plugin: {"containerd": {"runtimes": runtimes}}}}
    default_rts = runtimes_of(defaults, layout)
    cri = copy.deepcopy(dig(eff, "plugins", plugin) or {})
    if not isinstance(cri, dict):
        cri = {}
    ctrd = cri.setdefault("containerd", {})
    if not isinstance(ctrd.get("runtimes"), dict):
        # config.toml defines no runtimes, so containerd uses its default ones (runc): defining
        # thaw's would drop them. Write them out as `containerd config default` has them.
        ctrd["runtimes"] = copy.deepcopy(default_rts) or {"runc": {"runtime_type": RUNTIME_TYPE}}
    runtimes = ctrd["runtimes"]
    runtimes.pop(HANDLER, None)
    runtimes[HANDLER] = thaw_runtime(runtimes.get(default_runtime_name(eff, layout)) or runtimes.get("runc"), binary)
    return {"version": layout, "plugins": {plugin: cri}}


def render(data: dict[str, Any], layout: int, main: str) -> str:
    """The drop-in file: a header saying what it is, then `data` as TOML."""
    doc = tomlkit.document()
    doc.add(tomlkit.comment('Written by thaw\'s install/containerd.sh: registers the runtime handler "thaw".'))
    if layout == 2:
        lines = ["containerd 1.x replaces a plugin's whole section with the last imported one, so this",
                 f"file carries a copy of the CRI plugin section of {main} (and its other imports)",
                 "plus the thaw runtime. After editing that section, run install/containerd.sh again."]
    else:
        lines = ["containerd 2.x merges imported files key by key: this file only adds the thaw runtime."]
    for line in [*lines, "Delete this file and restart containerd to unregister thaw."]:
        doc.add(tomlkit.comment(line))
    doc.add(tomlkit.nl())
    doc.update(data)
    return tomlkit.dumps(doc)
