"""The OCI runtime-spec bundle: config.json and the paths it names.

A `Bundle` is read once and handed around; it only interprets the spec, it never changes how a
runtime treats it. Hook edits are small composable modifiers that rewrite config.json atomically.
"""

from __future__ import annotations

import json
import os
from typing import Any

from . import ThawError
from .files import atomic_write

CONFIG = "config.json"


class SpecError(ThawError):
    """config.json is missing or not a runtime spec."""


class Bundle:
    def __init__(self, path: str, spec: dict[str, Any]):
        self.path, self.spec = path, spec

    @classmethod
    def load(cls, path: str) -> Bundle:
        cfg = os.path.join(path, CONFIG)
        try:
            with open(cfg, "rb") as f:
                spec = json.load(f)
        except (OSError, ValueError) as exc:
            raise SpecError(f"cannot read {cfg}: {exc}") from exc
        if not isinstance(spec, dict) or not isinstance(spec.get("annotations", {}), dict):
            raise SpecError(f"{cfg} is not an OCI runtime spec")
        return cls(os.path.abspath(path), spec)

    @property
    def annotations(self) -> dict[str, str]:
        return self.spec.get("annotations") or {}

    @property
    def rootfs(self) -> str:
        root = (self.spec.get("root") or {}).get("path", "rootfs")
        return root if os.path.isabs(root) else os.path.join(self.path, root)

    @property
    def mount_destinations(self) -> list[str]:
        return sorted({os.path.normpath(m.get("destination", "")) for m in self.spec.get("mounts") or []})

    def namespace_path(self, ns_type: str) -> str | None:
        """Path of a namespace joined by path (as a pod's containers join the sandbox's)."""
        for ns in (self.spec.get("linux") or {}).get("namespaces") or []:
            if ns.get("type") == ns_type:
                return ns.get("path") or None
        return None

    def creates_namespace(self, ns_type: str) -> bool:
        """The runtime makes a new namespace of this type (listed, with no path)."""
        return any(ns.get("type") == ns_type and not ns.get("path")
                   for ns in (self.spec.get("linux") or {}).get("namespaces") or [])

    def save(self) -> None:
        """Write config.json back atomically, keeping its permissions."""
        cfg = os.path.join(self.path, CONFIG)
        mode = os.stat(cfg).st_mode & 0o7777 if os.path.exists(cfg) else 0o644
        atomic_write(cfg, json.dumps(self.spec).encode(), mode=mode, durable=False)


# --- composable spec modifiers ------------------------------------------------------------------

def add_hook(spec: dict[str, Any], stage: str, hook: dict[str, Any]) -> bool:
    """Append `hook` to `stage` unless an identical path+args hook is there. Returns True if added.

    Existing hooks (NVIDIA's among them) keep their place and order.
    """
    hooks = spec.setdefault("hooks", {}).setdefault(stage, [])
    for h in hooks:
        if h.get("path") == hook["path"] and h.get("args") == hook.get("args"):
            return False
    hooks.append(hook)
    return True


IO_URING_SYSCALLS = ("io_uring_setup", "io_uring_enter", "io_uring_register")
_ENOSYS = 38
_SECCOMP_ARCHES = {"x86_64": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
                   "aarch64": ["SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"]}
_PERMISSIVE = ("SCMP_ACT_ALLOW", "SCMP_ACT_LOG", "SCMP_ACT_NOTIFY", "SCMP_ACT_TRACE")


def deny_io_uring(spec: dict[str, Any], machine: str) -> bool:
    """Make io_uring_setup/enter/register fail with ENOSYS in the container, as Docker's and
    containerd's default seccomp profiles do: CRIU cannot checkpoint an io_uring instance, and a
    program that finds the calls missing (libuv, so uvloop; liburing users) falls back to epoll or
    threads. The spec's own filter is kept and only narrowed: the three calls are taken out of its
    permissive rules, and an ENOSYS rule is added where its default action would allow them. A
    spec without a filter gets one that allows everything else. Returns True if the spec changed."""
    linux = spec.setdefault("linux", {})
    seccomp = linux.get("seccomp")
    if not isinstance(seccomp, dict):
        seccomp = {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": []}
        if machine in _SECCOMP_ARCHES:
            seccomp["architectures"] = list(_SECCOMP_ARCHES[machine])
        linux["seccomp"] = seccomp
    rules = seccomp.get("syscalls") or []
    changed = False
    kept = []
    for rule in rules:
        names = rule.get("names") or []
        if rule.get("action") in _PERMISSIVE and any(n in IO_URING_SYSCALLS for n in names):
            names = [n for n in names if n not in IO_URING_SYSCALLS]
            changed = True
            if not names:
                continue
            rule = {**rule, "names": names}
        kept.append(rule)
    # A call some remaining rule names already fails (errno, kill, trap): a second rule for it
    # would conflict in libseccomp.
    named = {n for rule in kept for n in rule.get("names") or []}
    missing = [n for n in IO_URING_SYSCALLS if n not in named]
    if missing and seccomp.get("defaultAction", "SCMP_ACT_ALLOW") in _PERMISSIVE:
        kept.append({"names": missing, "action": "SCMP_ACT_ERRNO", "errnoRet": _ENOSYS})
        changed = True
    seccomp["syscalls"] = kept
    return changed
