"""Compatibility fingerprint: what must match between the node and container a snapshot was
captured from and the node and container it is restored into.

A fingerprint (oci/snapshot.py's `Fingerprint`) has two parts: `node` (kernel, arch, CPU
features, CRIU, runc, GPUs) and `container` (image, mount destinations, Kubernetes namespace).
This module measures them and `compare` returns the list of reasons a restore must not be
attempted; an empty list means compatible.
"""

from __future__ import annotations

import dataclasses
import os

from thaw.oci import annotations as ann
from thaw.oci import snapshot as fmt
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


def node(criu: str, runc_version: str, cache_dir: str | None = None,
         gpu: fmt.GpuFingerprint | None = None) -> fmt.NodeFingerprint:
    u = os.uname()
    return fmt.NodeFingerprint(kernel=u.release, arch=u.machine, cpu_flags=tuple(cpu_flags()),
                               criu=criu_mod.version(criu, cache_dir), runc=runc_version,
                               gpu=gpu or fmt.GpuFingerprint())


def with_gpu(node_fp: fmt.NodeFingerprint, gpu: fmt.GpuFingerprint) -> fmt.NodeFingerprint:
    return dataclasses.replace(node_fp, gpu=gpu)


def container(bundle: Bundle) -> fmt.ContainerFingerprint:
    a = bundle.annotations
    return fmt.ContainerFingerprint(
        image=a.get(ann.CRI_IMAGE_NAME) or a.get(ann.OCI_IMAGE_REF) or None,
        mounts=tuple(bundle.mount_destinations),
        namespace=a.get(ann.CRI_SANDBOX_NAMESPACE) or None,
        container_name=a.get(ann.CRI_CONTAINER_NAME) or None,
    )


def compare(snap: fmt.Fingerprint, here: fmt.Fingerprint, allow_cross_namespace: bool = False) -> list[str]:
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

    if sc.image != hc.image:
        reasons.append(f"image: snapshot of {sc.image!r}, container runs {hc.image!r}")
    if list(sc.mounts) != list(hc.mounts):
        only_s = sorted(set(sc.mounts) - set(hc.mounts))
        only_h = sorted(set(hc.mounts) - set(sc.mounts))
        reasons.append(f"mounts: destinations differ (snapshot only: {only_s}, container only: {only_h})")
    if sc.namespace != hc.namespace and not allow_cross_namespace:
        reasons.append(f"namespace: snapshot captured in {sc.namespace!r}, "
                       f"requested from {hc.namespace!r} (policy.allow_cross_namespace is off)")
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
