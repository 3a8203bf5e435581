"""Compatibility fingerprint: what must match between the node and container a snapshot was
captured from and the node and container it is restored into.

A fingerprint is a flat JSON object in two parts: `node` (kernel, arch, CPU features, CRIU, runc,
GPUs) and `container` (image, mount destinations, Kubernetes namespace). `compare` returns the
list of reasons a restore must not be attempted; an empty list means compatible.
"""

from __future__ import annotations

import os
from typing import Any

from thaw.oci import annotations as ann
from thaw.oci.spec import Bundle

from . import criu as criu_mod

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


def node(criu: str, runc_version: str, gpu: dict[str, Any] | None = None,
         cache_dir: str | None = None) -> dict[str, Any]:
    u = os.uname()
    return {"kernel": u.release, "arch": u.machine, "cpu_flags": cpu_flags(),
            "criu": criu_mod.version(criu, cache_dir), "runc": runc_version, "gpu": gpu or {}}


def container(bundle: Bundle) -> dict[str, Any]:
    a = bundle.annotations
    return {
        "image": a.get(ann.CRI_IMAGE_NAME) or a.get(ann.OCI_IMAGE_REF) or None,
        "mounts": bundle.mount_destinations,
        "namespace": a.get(ann.CRI_SANDBOX_NAMESPACE) or None,
        "container_name": a.get(ann.CRI_CONTAINER_NAME) or None,
    }


def compare(snap: dict[str, Any], here: dict[str, Any], allow_cross_namespace: bool = False) -> list[str]:
    """Reasons the snapshot fingerprint `snap` cannot be restored where `here` was taken."""
    reasons: list[str] = []
    sn, hn = snap.get("node") or {}, here.get("node") or {}
    sc, hc = snap.get("container") or {}, here.get("container") or {}

    for key in ("arch", "kernel"):
        if sn.get(key) != hn.get(key):
            reasons.append(f"{key}: snapshot {sn.get(key)!r}, node {hn.get(key)!r}")
    missing = sorted(set(sn.get("cpu_flags") or []) - set(hn.get("cpu_flags") or []))
    if missing:
        reasons.append(f"cpu: node lacks features the snapshot was taken with: {' '.join(missing[:12])}")
    sv, hv = criu_mod.version_tuple(sn.get("criu")), criu_mod.version_tuple(hn.get("criu"))
    if not hv:
        reasons.append("criu: not found or not runnable on this node")
    elif sv and (hv[0] != sv[0] or hv < sv):
        reasons.append(f"criu: snapshot taken with {sn.get('criu')}, node has {hn.get('criu')}")

    reasons += _compare_gpu(sn.get("gpu") or {}, hn.get("gpu") or {})

    if sc.get("image") != hc.get("image"):
        reasons.append(f"image: snapshot of {sc.get('image')!r}, container runs {hc.get('image')!r}")
    if list(sc.get("mounts") or []) != list(hc.get("mounts") or []):
        only_s = sorted(set(sc.get("mounts") or []) - set(hc.get("mounts") or []))
        only_h = sorted(set(hc.get("mounts") or []) - set(sc.get("mounts") or []))
        reasons.append(f"mounts: destinations differ (snapshot only: {only_s}, container only: {only_h})")
    if sc.get("namespace") != hc.get("namespace") and not allow_cross_namespace:
        reasons.append(f"namespace: snapshot captured in {sc.get('namespace')!r}, "
                       f"requested from {hc.get('namespace')!r} (policy.allow_cross_namespace is off)")
    return reasons


def _compare_gpu(sg: dict[str, Any], hg: dict[str, Any]) -> list[str]:
    """GPU state restores only onto the same chip type and driver (which fixes the CUDA driver
    API version), and as many GPUs as were checkpointed (their UUIDs may differ: restore remaps
    them)."""
    if not sg.get("count"):
        return []
    reasons = []
    if not hg.get("count"):
        return [f"gpu: snapshot holds state of {sg.get('count')} GPU(s) ({sg.get('model')}), "
                f"container has none{': ' + hg['error'] if hg.get('error') else ''}"]
    for key in ("model", "count", "driver"):
        if sg.get(key) != hg.get(key):
            reasons.append(f"gpu {key}: snapshot {sg.get(key)!r}, node {hg.get(key)!r}")
    return reasons
