"""Compatibility fingerprint: what must match between the node and container a snapshot was
captured from and the node and container it is restored into.

A fingerprint (oci/snapshot/config.py's `Fingerprint`) has two parts: `node` (kernel, arch, CPU
features, CRIU, runc, GPUs) and `container` (image, mount destinations, Kubernetes namespace).
This module measures them and `compare` returns the list of reasons a restore must not be
attempted; an empty list means compatible.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable
from typing import Any

from thaw.oci import annotations as ann
from thaw.oci import snapshot as fmt
from thaw.oci.digest import Hasher, sha256_hex
from thaw.oci.files import atomic_write
from thaw.oci.spec import Bundle

from ..drivers import criu as criu_mod
from ..drivers.mounts import MountTable
from ..drivers.rootfs import overlay_dirs
from .confinement import CAP_BITS, CAP_SETGID, CAP_SETUID

# CPU feature flags that decide whether restored code keeps running: instruction-set extensions
# (glibc and JITs pick code paths by them at start-up) and the xsave state layout CRIU restores.
_CPU_FLAG_PREFIXES = ("sse", "ssse", "avx", "fma", "xsave", "amx", "sha", "aes", "pclmul", "bmi",
                      "adx", "f16c", "popcnt", "movbe", "erms", "fsrm", "rdrand", "rdseed", "vaes",
                      "vpclmul", "gfni", "pku", "fpu", "mmx", "lzcnt", "abm", "cx16", "clflushopt",
                      "clwb", "movdir", "serialize", "waitpkg", "avx_vnni")


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> list[str]:
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    flags = line.split(":", 1)[1].split()
                    return sorted(f for f in set(flags) if f.startswith(_CPU_FLAG_PREFIXES))
    except OSError:
        pass
    return []


def node(criu: str, runc_version: str, cache_dir: str | None = None,
         gpu: fmt.GpuFingerprint | None = None) -> fmt.NodeFingerprint:
    u = os.uname()
    return fmt.NodeFingerprint(kernel=u.release, arch=u.machine, cpu_flags=tuple(cpu_flags()),
                               criu=criu_mod.version(criu, cache_dir), runc=runc_version,
                               gpu=gpu or fmt.GpuFingerprint())


def with_gpu(node_fp: fmt.NodeFingerprint, gpu: fmt.GpuFingerprint) -> fmt.NodeFingerprint:
    return dataclasses.replace(node_fp, gpu=gpu)


def container(bundle: Bundle, cache_dir: str | None = None, mounts: MountTable | None = None
              ) -> fmt.ContainerFingerprint:
    a = bundle.annotations
    return fmt.ContainerFingerprint(
        image=image_of(bundle, cache_dir, mounts),
        mounts=tuple(bundle.mount_destinations),
        container_name=a.get(ann.CRI_CONTAINER_NAME) or None,
    )


def image_of(bundle: Bundle, cache_dir: str | None = None, mounts: MountTable | None = None) -> str | None:
    """What image the container runs: its name where Kubernetes (or ctr, or an image builder)
    put one in the spec; else, for an overlay rootfs (Podman, Docker), the content of its image
    layers (`layers:sha256:...`); else None: unidentified, and never restored."""
    a = bundle.annotations
    named = a.get(ann.CRI_IMAGE_NAME) or a.get(ann.OCI_IMAGE_REF)
    if named:
        return named
    try:
        upper, lowers = overlay_dirs(bundle.rootfs, mounts)
    except OSError:
        return None
    dirs = []
    for lower in lowers:
        if not os.path.isabs(lower) and upper and os.path.isabs(upper):
            # Docker's overlay2 mounts short relative names from its storage root.
            lower = os.path.join(os.path.dirname(os.path.dirname(upper)), lower)
        if not os.path.isabs(lower) or not os.path.isdir(lower):
            return None
        dirs.append(os.path.realpath(lower))
    if not dirs:
        return None
    h = Hasher()
    for d in dirs:
        h.update(layer_digest(d, cache_dir).encode())
    return "layers:" + h.digest


def layer_digest(layer_dir: str, cache_dir: str | None = None) -> str:
    """A digest of an image layer's tree (names, types, modes, owners, sizes, mtimes, link
    targets; not the file contents: an unpacked layer never changes, and these differ between
    any two real images). Cached per directory in cache_dir (layers are immutable)."""
    st = os.stat(layer_dir)
    key = f"{layer_dir}:{st.st_dev}:{st.st_ino}:{st.st_ctime_ns}"
    cache = os.path.join(cache_dir, "layer-digests.json") if cache_dir else None
    cached: dict[str, str] = {}
    if cache:
        try:
            with open(cache) as f:
                cached = json.load(f)
            if key in cached:
                return cached[key]
        except (OSError, ValueError):
            cached = {}
    h = Hasher()
    stack = [("", layer_dir)]
    while stack:
        rel_dir, path = stack.pop()
        try:
            names = sorted(os.listdir(path))
        except OSError:
            continue
        for name in names:
            full, rel = os.path.join(path, name), f"{rel_dir}/{name}"
            est = os.lstat(full)
            link = os.readlink(full) if os.path.islink(full) else ""
            h.update(f"{rel}\0{est.st_mode:o}\0{est.st_uid}\0{est.st_gid}\0{est.st_size}\0"
                     f"{int(est.st_mtime)}\0{link}\n".encode())
            if os.path.isdir(full) and not os.path.islink(full):
                stack.append((rel, full))
    digest = h.digest
    if cache:
        cached = {k: v for k, v in cached.items() if not k.startswith(layer_dir + ":")}
        cached[key] = digest
        try:
            atomic_write(cache, json.dumps(cached).encode(), durable=False)
        except OSError:
            pass
    return digest


def compare(snap: fmt.Fingerprint, here: fmt.Fingerprint) -> list[str]:
    """Reasons the snapshot fingerprint `snap` cannot be restored where `here` was taken."""
    reasons: list[str] = []
    sn, hn = snap.node, here.node
    sc, hc = snap.container, here.container

    for key in ("arch", "kernel"):
        if getattr(sn, key) != getattr(hn, key):
            reasons.append(f"{key}: snapshot {getattr(sn, key)!r}, node {getattr(hn, key)!r}")
    missing = sorted(set(sn.cpu_flags) - set(hn.cpu_flags))
    if missing:
        reasons.append(f"cpu: node lacks features the snapshot was taken with: {' '.join(missing[:12])}")
    sv, hv = criu_mod.version_tuple(sn.criu), criu_mod.version_tuple(hn.criu)
    if not hv:
        reasons.append("criu: not found or not runnable on this node")
    elif sv and (hv[0] != sv[0] or hv < sv):
        reasons.append(f"criu: snapshot taken with {sn.criu}, node has {hn.criu}")

    reasons += _compare_gpu(sn.gpu, hn.gpu)

    if sc.image is None or hc.image is None:
        reasons.append(f"image: {'the snapshot' if sc.image is None else 'the container'}'s image cannot be "
                       "identified (no image annotation, and no overlay rootfs to identify its layers by)")
    elif sc.image != hc.image:
        reasons.append(f"image: snapshot of {sc.image!r}, container runs {hc.image!r}")
    if list(sc.mounts) != list(hc.mounts):
        only_s = sorted(set(sc.mounts) - set(hc.mounts))
        only_h = sorted(set(hc.mounts) - set(sc.mounts))
        reasons.append(f"mounts: destinations differ (snapshot only: {only_s}, container only: {only_h})")
    return reasons


def _compare_gpu(sg: fmt.GpuFingerprint, hg: fmt.GpuFingerprint) -> list[str]:
    """GPU state restores only onto the same chip type and driver (which fixes the CUDA driver
    API version), and as many GPUs as were checkpointed (their UUIDs may differ: restore remaps
    them)."""
    if not sg.count:
        return []
    reasons = []
    if not hg.count:
        return [f"gpu: snapshot holds state of {sg.count} GPU(s) ({sg.model}), "
                f"container has none{': ' + hg.error if hg.error else ''}"]
    for key in ("model", "count", "driver"):
        if getattr(sg, key) != getattr(hg, key):
            reasons.append(f"gpu {key}: snapshot {getattr(sg, key)!r}, node {getattr(hg, key)!r}")
    return reasons


# --- process identity and confinement -----------------------------------------------------------
# CRIU restores the captured processes' credentials, capabilities, no-new-privs, seccomp filters,
# LSM labels, rlimits, args, cwd and environment as they were; the new spec's say nothing. So a
# restore is allowed only when the new spec asks for exactly what the capturing spec asked for,
# and only when no captured process holds more than that spec grants.

# Device nodes restore pairs instead of comparing (the GPU fingerprint checks model and count).
_GPU_NODE = re.compile(r"/dev/nvidia\d+")


def _canon(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def identity(spec: dict[str, Any]) -> dict[str, Any]:
    """The parts of a runtime spec that decide who the container's processes are and what they
    may do, in a canonical form (lists that are sets are sorted; seccomp as a digest)."""
    proc = spec.get("process") or {}
    linux = spec.get("linux") or {}
    user = proc.get("user") or {}
    caps = proc.get("capabilities") or {}
    seccomp = linux.get("seccomp")
    return {
        "user": {"uid": user.get("uid", 0), "gid": user.get("gid", 0),
                 "additionalGids": sorted(user.get("additionalGids") or []), "umask": user.get("umask")},
        "capabilities": {k: sorted(caps.get(k) or []) for k in
                         ("bounding", "effective", "inheritable", "permitted", "ambient")},
        "noNewPrivileges": bool(proc.get("noNewPrivileges")),
        "seccomp": sha256_hex(_canon(seccomp).encode()) if seccomp else None,
        "apparmorProfile": proc.get("apparmorProfile") or None,
        "selinuxLabel": proc.get("selinuxLabel") or None,
        "mountLabel": linux.get("mountLabel") or None,
        "oomScoreAdj": proc.get("oomScoreAdj"),
        "rlimits": sorted((r.get("type"), r.get("soft"), r.get("hard")) for r in proc.get("rlimits") or []),
        "args": list(proc.get("args") or []),
        "cwd": proc.get("cwd") or "/",
        "env": sorted(proc.get("env") or []),
        "terminal": bool(proc.get("terminal")),
        "sysctl": dict(sorted((linux.get("sysctl") or {}).items())),
        "maskedPaths": sorted(linux.get("maskedPaths") or []),
        "readonlyPaths": sorted(linux.get("readonlyPaths") or []),
        "rootReadonly": bool((spec.get("root") or {}).get("readonly")),
        "namespaces": sorted(n.get("type", "") for n in linux.get("namespaces") or []),
        "idMappings": {k: linux.get(k) or [] for k in ("uidMappings", "gidMappings")},
        "mounts": sorted(_canon({"destination": m.get("destination"), "type": m.get("type"),
                                 "options": sorted(m.get("options") or [])})
                         for m in spec.get("mounts") or []),
        "devices": sorted(_canon({k: d.get(k) for k in ("path", "type", "major", "minor", "fileMode", "uid", "gid")})
                          for d in linux.get("devices") or [] if not _GPU_NODE.fullmatch(d.get("path", ""))),
        "deviceRules": sorted(_canon(r) for r in (linux.get("resources") or {}).get("devices") or []
                              if not (r.get("major") == 195 and r.get("minor") not in (None, 255))),
    }


def _env_map(env: list[str]) -> dict[str, str]:
    return {key: value for key, _, value in (e.partition("=") for e in env)}


def compare_identity(captured: dict[str, Any], here: dict[str, Any], env_may_differ: tuple[str, ...]) -> list[str]:
    """The identity fields in which the new spec differs from the capturing one. Environment
    variables named in `env_may_differ` may differ: the restored process keeps its captured values."""
    if not captured:
        return ["identity: the snapshot records no process identity (captured by an older thaw)"]
    reasons = []
    for key in sorted(set(captured) | set(here)):
        a, b = captured.get(key), here.get(key)
        if key in _MAY_GRANT_MORE:
            if _MAY_GRANT_MORE[key](a, b):
                reasons.append(f"{_IDENTITY_NAMES.get(key, key)}: snapshot {_short(a)}, container {_short(b)}")
        elif key == "env":
            ea, eb = _env_map(a or []), _env_map(b or [])
            differ = sorted(k for k in set(ea) | set(eb) if ea.get(k) != eb.get(k) and k not in env_may_differ)
            if differ:
                reasons.append(f"process.env: {', '.join(differ[:8])} differ from the snapshot's")
        elif _canon(a) != _canon(b):
            reasons.append(f"{_IDENTITY_NAMES.get(key, key)}: snapshot {_short(a)}, container {_short(b)}")
    return reasons


# Privileges the new spec may grant beyond the capturing one's: the restored processes keep less
# (what CRIU restores is proven within the new spec from the images and the kernel, shim/lifecycle/confinement/).
# Each says whether the captured value (a) is more than the new spec's (b) — an early refusal.
_MAY_GRANT_MORE: dict[str, Callable[[Any, Any], bool]] = {
    "capabilities": lambda a, b: any(set((a or {}).get(k) or []) - set((b or {}).get(k) or [])
                                     for k in set(a or {}) | set(b or {})),
    "noNewPrivileges": lambda a, b: bool(b) and not a,
    "seccomp": lambda a, b: b is not None and a != b,
}

_IDENTITY_NAMES = {"user": "process.user", "capabilities": "process.capabilities",
                   "noNewPrivileges": "process.noNewPrivileges", "seccomp": "linux.seccomp",
                   "apparmorProfile": "process.apparmorProfile", "selinuxLabel": "process.selinuxLabel",
                   "mountLabel": "linux.mountLabel", "oomScoreAdj": "process.oomScoreAdj",
                   "rlimits": "process.rlimits", "args": "process.args", "cwd": "process.cwd",
                   "terminal": "process.terminal", "sysctl": "linux.sysctl",
                   "maskedPaths": "linux.maskedPaths", "readonlyPaths": "linux.readonlyPaths",
                   "rootReadonly": "root.readonly", "namespaces": "linux.namespaces",
                   "idMappings": "linux.uidMappings/gidMappings", "mounts": "mounts (type, options)",
                   "devices": "linux.devices", "deviceRules": "linux.resources.devices"}


def _short(value: Any) -> str:
    text = _canon(value)
    return text if len(text) <= 120 else text[:117] + "..."


def process_creds(pid: int) -> fmt.ProcessCreds | None:
    """What one process really holds, from /proc/PID/status (None if it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            fields = dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)
    except OSError:
        return None

    def ints(key: str) -> tuple[int, ...]:
        return tuple(int(x) for x in fields.get(key, "").split())
    return fmt.ProcessCreds(pid=pid, uids=ints("Uid"), gids=ints("Gid"), groups=ints("Groups"),
                            cap_inh=int(fields.get("CapInh", "0"), 16), cap_prm=int(fields.get("CapPrm", "0"), 16),
                            cap_eff=int(fields.get("CapEff", "0"), 16), cap_bnd=int(fields.get("CapBnd", "0"), 16),
                            cap_amb=int(fields.get("CapAmb", "0"), 16),
                            no_new_privs=fields.get("NoNewPrivs", "0").strip() == "1",
                            seccomp=int(fields.get("Seccomp", "0")))


def _cap_mask(names: list[str]) -> int:
    mask = 0
    for name in names:
        bit = CAP_BITS.get(name.upper().removeprefix("CAP_"))
        if bit is None:
            return -1                    # a capability this table does not know: grant nothing extra
        mask |= 1 << bit
    return mask


def excess_privileges(procs: tuple[fmt.ProcessCreds, ...], spec: dict[str, Any]) -> list[str]:
    """What the captured processes hold beyond what `spec` grants (empty: nothing). A process may
    hold less (dropped capabilities, another uid reached with CAP_SETUID), never more: a setuid
    binary run without no-new-privs must not bring its privileges into a spec that does not."""
    proc = spec.get("process") or {}
    user = proc.get("user") or {}
    caps = proc.get("capabilities") or {}
    grant = {k: _cap_mask(caps.get(name) or []) for k, name in
             (("inh", "inheritable"), ("prm", "permitted"), ("eff", "effective"), ("bnd", "bounding"),
              ("amb", "ambient"))}
    uid, gid = user.get("uid", 0), user.get("gid", 0)
    gids = {gid, *(user.get("additionalGids") or [])}
    may_setuid = grant["prm"] != -1 and grant["prm"] >> CAP_SETUID & 1
    may_setgid = grant["prm"] != -1 and grant["prm"] >> CAP_SETGID & 1
    out = []
    for p in procs:
        problems = []
        if not may_setuid and any(u != uid for u in p.uids):
            problems.append(f"uids {list(p.uids)} (the spec grants uid {uid})")
        if not may_setgid and (any(g not in gids for g in p.gids) or any(g not in gids for g in p.groups)):
            problems.append(f"gids {list(p.gids)} groups {list(p.groups)} (the spec grants {sorted(gids)})")
        for k in ("inh", "prm", "eff", "bnd", "amb"):
            have = getattr(p, "cap_" + k)
            if grant[k] == -1 or have & ~grant[k]:
                problems.append(f"Cap{k.capitalize()} {have:016x} (the spec grants {max(grant[k], 0):016x})")
        if proc.get("noNewPrivileges") and not p.no_new_privs:
            problems.append("no_new_privs off (the spec sets noNewPrivileges)")
        if (spec.get("linux") or {}).get("seccomp") and p.seccomp != 2:
            problems.append(f"seccomp mode {p.seccomp} (the spec installs a filter)")
        if problems:
            out.append(f"captured process {p.pid} holds more than the spec grants: {'; '.join(problems)}")
    return out
