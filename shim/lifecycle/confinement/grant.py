"""What a runtime spec grants a container's processes (Grant), one thing a restored thread would
hold beyond it (Excess), and the comparisons the image check and the kernel check share:
credentials (ids, groups, capabilities, no_new_privs) and a seccomp filter against the one the
spec's profile installs on this node."""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass
from typing import Any

from thaw.oci import ThawError
from thaw.oci.digest import sha256_hex

from ...drivers.criu_images import CAP_SETS, SECCOMP_FILTER_FLAG_TSYNC

# Linux capability numbers (include/uapi/linux/capability.h).
CAP_BITS = {name: i for i, name in enumerate((
    "CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID", "KILL", "SETGID", "SETUID",
    "SETPCAP", "LINUX_IMMUTABLE", "NET_BIND_SERVICE", "NET_BROADCAST", "NET_ADMIN", "NET_RAW",
    "IPC_LOCK", "IPC_OWNER", "SYS_MODULE", "SYS_RAWIO", "SYS_CHROOT", "SYS_PTRACE", "SYS_PACCT",
    "SYS_ADMIN", "SYS_BOOT", "SYS_NICE", "SYS_RESOURCE", "SYS_TIME", "SYS_TTY_CONFIG", "MKNOD",
    "LEASE", "AUDIT_WRITE", "AUDIT_CONTROL", "SETFCAP", "MAC_OVERRIDE", "MAC_ADMIN", "SYSLOG",
    "WAKE_ALARM", "BLOCK_SUSPEND", "AUDIT_READ", "PERFMON", "BPF", "CHECKPOINT_RESTORE"))}
CAP_SETGID, CAP_SETUID, CAP_SETPCAP = 6, 7, 8
CAP_SYS_NICE, CAP_SYS_RESOURCE, CAP_AUDIT_CONTROL = 23, 24, 30
_SPEC_SETS = {"inh": "inheritable", "prm": "permitted", "eff": "effective", "bnd": "bounding", "amb": "ambient"}
# Securebits a process may hold without CAP_SETPCAP: KEEP_CAPS (prctl PR_SET_KEEPCAPS needs no
# privilege) and those that only take privilege away (NOROOT, the locks, NO_CAP_AMBIENT_RAISE).
# NO_SETUID_FIXUP (bit 2) keeps capabilities across uid changes: only with CAP_SETPCAP.
SECBITS_UNPRIVILEGED = 0b11_1111_1111 & ~(1 << 2)
RLIM_INFINITY = (1 << 64) - 1
RLIMITS: dict[str, int] = {name: getattr(resource, name) for name in dir(resource) if name.startswith("RLIMIT_")}
_RLIM_NLIMITS: int = getattr(resource, "RLIM_NLIMITS", 16)
UNLIMITED_SCHED = (0, 3, 5)          # SCHED_OTHER, SCHED_BATCH, SCHED_IDLE: no privilege needed


class ConfinementError(ThawError):
    """A restore would give a thread more than the spec grants (or that cannot be proven)."""


@dataclass(frozen=True)
class Excess:
    """One thing one restored thread would hold beyond the spec."""
    task: int
    thread: int
    field: str
    snapshot: str
    spec: str

    def __str__(self) -> str:
        who = f"task {self.task}" + (f" thread {self.thread}" if self.thread != self.task else "")
        return f"{who}: {self.field} {self.snapshot} (the spec grants {self.spec})"


def cap_mask(names: list[str] | None) -> int:
    """The capability names of a spec as a mask; a name this table does not know grants nothing."""
    mask = 0
    for name in names or []:
        bit = CAP_BITS.get(name.upper().removeprefix("CAP_"))
        if bit is not None:
            mask |= 1 << bit
    return mask


@dataclass(frozen=True)
class Grant:
    """What a runtime spec grants the container's processes, and what a cold start of it would
    inherit from the runtime (rlimits the spec does not set, oom_score_adj, nice, loginuid, LSM label)."""
    uid: int
    gid: int
    gids: frozenset[int]
    caps: dict[str, int]
    no_new_privs: bool
    seccomp: dict[str, Any] | None
    seccomp_reference: tuple[bytes, int] | None     # (BPF program, flags) of the profile on this node
    rlimits: dict[int, int]                         # RLIMIT_* number -> hard limit
    oom_score_adj: int
    nice: int
    loginuid: int | None
    lsm_label: str
    # The IPC sysctls of a fresh IPC namespace on this node (namespaces.fresh_ipc_sysctls): what a
    # cold start's namespace has where the spec sets none. None: not known (not provable).
    ipc_sysctls: dict[str, list[int]] | None = None

    def may(self, cap: int) -> bool:
        return bool(self.caps["prm"] >> cap & 1)

    @classmethod
    def of(cls, spec: dict[str, Any], seccomp_reference: tuple[bytes, int] | None = None,
           ipc_sysctls: dict[str, list[int]] | None = None) -> Grant:
        proc = spec.get("process") or {}
        user = proc.get("user") or {}
        caps = proc.get("capabilities") or {}
        uid, gid = int(user.get("uid", 0)), int(user.get("gid", 0))
        rlimits = {}
        for number in range(_RLIM_NLIMITS):
            hard = resource.getrlimit(number)[1]
            rlimits[number] = RLIM_INFINITY if hard == resource.RLIM_INFINITY else hard
        for r in proc.get("rlimits") or []:
            named = RLIMITS.get(str(r.get("type", "")))
            if named is not None:
                rlimits[named] = int(r.get("hard", 0))
        oom = proc.get("oomScoreAdj")
        return cls(uid=uid, gid=gid, gids=frozenset({gid, *(int(g) for g in user.get("additionalGids") or [])}),
                   caps={k: cap_mask(caps.get(_SPEC_SETS[k])) for k in CAP_SETS},
                   no_new_privs=bool(proc.get("noNewPrivileges")),
                   seccomp=(spec.get("linux") or {}).get("seccomp") or None,
                   seccomp_reference=seccomp_reference, rlimits=rlimits,
                   oom_score_adj=int(oom) if oom is not None else _read_int("/proc/self/oom_score_adj", 0),
                   nice=os.getpriority(os.PRIO_PROCESS, 0), loginuid=_read_int("/proc/self/loginuid", None),
                   lsm_label=proc.get("apparmorProfile") or proc.get("selinuxLabel") or _own_label(),
                   ipc_sysctls=ipc_sysctls)


def _read_int(path: str, default: Any) -> Any:
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return default


def _own_label() -> str:
    try:
        with open("/proc/self/attr/current") as f:
            return f.read().strip("\0\n ")
    except OSError:
        return ""


def bare_label(text: str) -> str:
    """An LSM label without AppArmor's " (enforce)" mode suffix."""
    head, sep, tail = text.strip("\0\n ").rpartition(" (")
    return head if sep and tail.endswith(")") else text.strip("\0\n ")


def _fmt_caps(mask: int) -> str:
    return f"{mask:016x}"


def id_list(values: Any) -> str:
    return "[" + ", ".join(str(v) for v in values) + "]"



def creds_excess(pid: int, tid: int, uids: tuple[int, ...], gids: tuple[int, ...], groups: tuple[int, ...],
                  caps: dict[str, int], no_new_privs: bool | None, grant: Grant) -> list[Excess]:
    """The checks the images and the kernel share: ids (real, effective, saved, fs), groups,
    capabilities, no_new_privs."""
    out = []

    def add(field: str, snap: str, spec: str) -> None:
        out.append(Excess(pid, tid, field, snap, spec))
    if not grant.may(CAP_SETUID) and any(u != grant.uid for u in uids):
        add("uids", id_list(uids), f"uid {grant.uid}")
    if not grant.may(CAP_SETGID):
        if any(g not in grant.gids for g in gids):
            add("gids", id_list(gids), id_list(sorted(grant.gids)))
        extra = sorted(set(groups) - grant.gids)
        if extra:
            add("supplementary groups", id_list(groups), id_list(sorted(grant.gids)))
    for k in CAP_SETS:
        if caps[k] & ~grant.caps[k]:
            add(f"Cap{k.capitalize()}", _fmt_caps(caps[k]), _fmt_caps(grant.caps[k]))
    if grant.no_new_privs and not no_new_privs:
        add("no_new_privs", "off" if no_new_privs is False else "not recorded", "on (noNewPrivileges)")
    return out

def filter_mismatch(program: bytes, flags: int, ref: tuple[bytes, int]) -> tuple[str, str] | None:
    """(found, spec) if an oldest filter is not the profile's (TSYNC aside: CRIU's way of
    restoring a chain all threads share, not a property of the filter)."""
    if (program, flags & ~SECCOMP_FILTER_FLAG_TSYNC) != ref:
        return (f"oldest filter sha256:{sha256_hex(program)[:16]} "
                f"({len(program) // 8} instructions, flags {flags:#x})",
                f"the profile's filter sha256:{sha256_hex(ref[0])[:16]} "
                f"({len(ref[0]) // 8} instructions, flags {ref[1]:#x})")
    return None

def describe(where: str, excess: list[Excess]) -> str:
    """Each kind of excess once (its first thread), then how many more threads repeat them."""
    first: dict[str, Excess] = {}
    for e in excess:
        first.setdefault(e.field, e)
    more = len(excess) - len(first)
    return (f"{where} hold more than the spec grants: " + "; ".join(str(e) for e in first.values())
            + (f"; and {more} more in other threads or tasks" if more else ""))
