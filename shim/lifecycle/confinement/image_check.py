"""Before CRIU runs: what the snapshot's images would restore (criu_images.Images, the facts the
store keeps beside the seal, decoded from the images themselves) against what the new spec
grants: every task and thread's credentials, securebits, seccomp chain, LSM data, rlimits,
oom_score_adj, scheduling, loginuid; the mount tree; the hostname; the IPC sysctls; the kinds of
image and the namespaces their contents are written into."""

from __future__ import annotations

from typing import Any

from ...drivers import criu_images
from ...drivers.criu_images import SECCOMP_FILTER, Images
from .grant import (
    CAP_AUDIT_CONTROL,
    CAP_SETPCAP,
    CAP_SYS_NICE,
    CAP_SYS_RESOURCE,
    RLIM_INFINITY,
    RLIMITS,
    SECBITS_UNPRIVILEGED,
    UNLIMITED_SCHED,
    ConfinementError,
    Excess,
    Grant,
    bare_label,
    creds_excess,
    describe,
    filter_mismatch,
)
from .mounts import mount_excess
from .namespaces import ipc_excess, joined_excess, spec_namespaces, uts_excess


def images_excess(images: Images, grant: Grant) -> list[Excess]:
    """What the images would restore beyond `grant`, thread by thread (empty: nothing)."""
    out: list[Excess] = []
    for task in images.tasks:
        if not task.runs:
            continue                                     # a zombie: CRIU recreates it dead
        out += _task_excess(task, grant)
        for th in task.threads:
            out += creds_excess(task.pid, th.tid, th.uids, th.gids, th.groups, th.caps, th.no_new_privs, grant)
            out += _thread_excess(th, grant)
    return out


def _task_excess(task: criu_images.Task, grant: Grant) -> list[Excess]:
    out = []

    def add(field: str, snap: Any, spec: Any) -> None:
        out.append(Excess(task.pid, task.pid, field, str(snap), str(spec)))
    if not grant.may(CAP_SYS_RESOURCE):
        for number, (_soft, hard) in enumerate(task.rlimits):
            allowed = grant.rlimits.get(number, RLIM_INFINITY)
            if hard > allowed:
                name = next((n for n, v in RLIMITS.items() if v == number), str(number))
                add(f"{name} hard limit", _limit(hard), _limit(allowed))
        if task.oom_score_adj is not None and task.oom_score_adj < grant.oom_score_adj:
            add("oom_score_adj", task.oom_score_adj, f">= {grant.oom_score_adj}")
    if (task.loginuid is not None and task.loginuid != grant.loginuid and grant.loginuid is not None
            and not grant.may(CAP_AUDIT_CONTROL)):
        add("loginuid", task.loginuid, grant.loginuid)
    return out

def _limit(value: int) -> str:
    return "unlimited" if value >= RLIM_INFINITY else str(value)


def _thread_excess(th: criu_images.Thread, grant: Grant) -> list[Excess]:
    out = []

    def add(field: str, snap: Any, spec: Any) -> None:
        out.append(Excess(th.pid, th.tid, field, str(snap), str(spec)))
    if th.secbits & ~SECBITS_UNPRIVILEGED and not grant.may(CAP_SETPCAP):
        add("securebits", f"{th.secbits:#x}", f"{SECBITS_UNPRIVILEGED:#x} without CAP_SETPCAP")
    if grant.seccomp is not None:
        add_seccomp = _seccomp_excess(th, grant)
        if add_seccomp:
            add("seccomp", *add_seccomp)
    if th.apparmor_data:
        add("AppArmor policy data (creds.apparmor_data)", "present", "none: thaw never loads policy")
    if th.lsm_profile and bare_label(th.lsm_profile) != bare_label(grant.lsm_label):
        add("LSM label", repr(th.lsm_profile), repr(grant.lsm_label))
    if th.lsm_sockcreate:
        add("LSM socket-create label", repr(th.lsm_sockcreate), "none")
    if not grant.may(CAP_SYS_NICE):
        if th.sched_policy is not None and th.sched_policy not in UNLIMITED_SCHED:
            add("scheduling policy", th.sched_policy, "SCHED_OTHER/BATCH/IDLE")
        if th.sched_nice is not None and th.sched_nice < grant.nice:
            add("nice", th.sched_nice, f">= {grant.nice}")
    return out


def _seccomp_excess(th: criu_images.Thread, grant: Grant) -> tuple[str, str] | None:
    """(snapshot, spec) if the thread's chain does not start with the spec profile's filter."""
    if th.seccomp_mode != SECCOMP_FILTER or not th.seccomp_chain:
        mode = {0: "disabled", 1: "strict", 2: "filter"}.get(th.seccomp_mode, str(th.seccomp_mode))
        return f"mode {mode}", "a filter (linux.seccomp)"
    ref = grant.seccomp_reference
    if ref is None:
        return (f"{len(th.seccomp_chain)} filter(s), not provable",
                "linux.seccomp's filter, of which this node holds no record (recorded when a container "
                "of this profile is captured here)")
    program, flags = th.seccomp_chain[0]
    return filter_mismatch(program, flags, ref)

def check_images(images: Images, spec: dict[str, Any], grant: Grant) -> tuple[str, str] | None:
    """Nothing the images would restore (criu_decode.read(), or the facts the store keeps)
    exceeds the grant and the spec; else ConfinementError naming each excess
    (criu_images.ImageError for a kind of image thaw does not restore). Returns the hostname and
    domain name to hand CRIU in place of the images' (a UTS namespace the spec joins by path:
    its own, namespaces.joined_excess), or None."""
    criu_images.check(images, spec_namespaces(spec))
    joined, uts_names = joined_excess(images, spec)
    excess = (images_excess(images, grant) + mount_excess(images, spec) + uts_excess(images, spec)
              + ipc_excess(images, spec, grant.ipc_sysctls) + joined)
    if excess:
        raise ConfinementError(describe("the snapshot's images", excess))
    return uts_names


