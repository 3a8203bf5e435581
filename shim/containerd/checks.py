"""What `thaw doctor` reports about containerd: is the `thaw` handler registered, and right, in
what containerd loads; on 1.x, is the drop-in's copy of the CRI section still current."""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator
from typing import Any

from . import ContainerdConfigError, dropin
from .discovery import containerd_version, find_config, find_containerd, is_running
from .merge import (
    CRI_V2,
    ConfigFile,
    cri_disabled,
    cri_plugin,
    default_runtime_name,
    dig,
    effective,
    load_files,
    runtimes_of,
)

FIX = "install/node.sh --containerd"

Check = tuple[bool, str, str]     # (ok, what, detail)


def registration_checks(main: str, major: int, files: list[ConfigFile] | None = None) -> list[Check]:
    """Is the thaw handler registered, and right, in what containerd loads for `main`?"""
    if files is None:
        files = load_files(main)
    eff, owner = effective(files, major)
    layout = 2 if major < 2 else 3   # effective() gives 2.x configs in the version 3 layout
    plugin = cri_plugin(layout)
    rts = runtimes_of(eff, layout)
    entry = rts.get(dropin.HANDLER)
    what = f"containerd handler {dropin.HANDLER}"
    if not isinstance(entry, dict):
        detail = f"not registered in {main}"
        if major < 2 and owner.get(plugin) and owner[plugin] != main:
            detail += f" (the CRI section containerd uses comes from {owner[plugin]})"
        return [(False, what, f"{detail}: run {FIX}")]
    out: list[Check] = []
    rt = entry.get("runtime_type")
    out.append((rt == dropin.RUNTIME_TYPE, f"{what} runtime_type",
                f"{rt!r}" + ("" if rt == dropin.RUNTIME_TYPE else f", want {dropin.RUNTIME_TYPE!r}")))
    bn = dig(entry, "options", "BinaryName")
    if not isinstance(bn, str) or not bn:
        out.append((False, f"{what} BinaryName", f"not set: run {FIX}"))
    else:
        ok = os.path.isfile(bn) and os.access(bn, os.X_OK)
        out.append((ok, f"{what} BinaryName", bn if ok else f"{bn} is not an executable file: run {FIX}"))
    for key in ("pod_annotations", "container_annotations"):
        missing = dropin.uncovered(entry.get(key))
        out.append((not missing, f"{what} {key}",
                    f"{entry.get(key) or []}" + (f" do not pass {', '.join(missing)}: run {FIX}" if missing else "")))
    default = default_runtime_name(eff, layout)
    if major < 2 and default not in rts:
        out.append((False, "containerd default runtime",
                    f"{default!r} is not among the runtimes of {owner.get(plugin, main)}: every pod without "
                    f"a RuntimeClass would fail; run {FIX}"))
    return out


def _without_runtimes(cri: dict[str, Any]) -> dict[str, Any]:
    cri = copy.deepcopy(cri)
    if isinstance(cri.get("containerd"), dict):
        cri["containerd"].pop("runtimes", None)
        if not cri["containerd"]:
            del cri["containerd"]
    return cri


def stale_check(files: list[ConfigFile], drop_in: str) -> Check | None:
    """containerd 1.x: does the drop-in still carry the CRI section the other files set?"""
    real = os.path.realpath(drop_in)
    ours = [cfg for p, cfg in files if os.path.realpath(p) == real]
    if not ours:
        return None
    src, _ = effective([(p, cfg) for p, cfg in files if os.path.realpath(p) != real], 1)
    src_cri = dig(src, "plugins", CRI_V2) or {}
    mine = dig(ours[0], "plugins", CRI_V2) or {}
    src_rts = dig(src_cri, "containerd", "runtimes") or {}
    my_rts = dig(mine, "containerd", "runtimes") or {}
    drift = [k for k in src_rts if k != dropin.HANDLER and src_rts[k] != my_rts.get(k)]
    same = _without_runtimes(src_cri) == _without_runtimes(mine) and not drift
    return (same, "containerd drop-in in sync",
            f"{drop_in} carries the CRI section of the main config" if same else
            f"the CRI section of the main config changed after {drop_in} was written (containerd 1.x uses "
            f"the drop-in's copy): run install/containerd.sh again")


def doctor_checks(config: str | None = None, containerd_bin: str | None = None,
                  conf_d: str | None = None) -> list[Check]:
    """What `thaw doctor` reports about containerd. Never raises."""
    try:
        return list(_doctor_checks(config, containerd_bin, conf_d))
    except Exception as exc:  # noqa: BLE001 - doctor must report, not crash
        return [(False, "containerd", f"checking the configuration failed: {exc}")]


def _doctor_checks(config: str | None, containerd_bin: str | None, conf_d: str | None) -> Iterator[Check]:
    binary = containerd_bin or find_containerd()
    if not binary:
        yield True, "containerd", "not installed"
        return
    main = config or find_config()
    conf_d = conf_d or os.environ.get("CONTAINERD_CONF_D") or dropin.DEFAULT_CONF_D
    version = containerd_version(binary)
    try:
        files = load_files(main)
    except ContainerdConfigError as exc:
        yield False, "containerd config", str(exc)
        return
    major = version[0] if version else (3 if files[0][1].get("version") == 3 else 1)
    eff, _ = effective(files, major)
    running = is_running(eff)
    vtext = ".".join(map(str, version)) if version else "unknown version"
    state = "running" if running else "not running"
    yield True, "containerd", f"{binary} {vtext} ({state}), config {main}" + (
        "" if os.path.exists(main) else " (absent: defaults)")
    if cri_disabled(eff):
        yield True, "containerd CRI", "plugin disabled (disabled_plugins): not used by Kubernetes"
        return
    checks = registration_checks(main, major, files=files)
    if not running and len(checks) == 1 and not checks[0][0]:
        # installed (e.g. for tests) but not serving: nothing uses it, so no problem yet
        yield True, checks[0][1], f"not registered (containerd is not running; to register: {FIX})"
        return
    yield from checks
    if major < 2:
        stale = stale_check(files, os.path.join(conf_d, dropin.DROP_IN_NAME))
        if stale:
            yield stale
