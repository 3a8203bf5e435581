"""Whether what a restore brings back stays within the new spec: who each restored thread is and
what it may do, proven twice and never taken from the snapshot's own word (its config is only a
hint, checked earlier by fingerprint.py, and may only refuse):

  images_excess()   before CRIU runs: every task and thread of the snapshot's CRIU images
                    (shim/drivers/criu_images.py) against what the spec grants
  mount_excess(), uts_excess()
                    before CRIU runs: the images' mount tree and hostname against the spec's
  kernel_excess()   after CRIU restored the tasks and left them stopped, before any of them runs
                    user code: every thread's /proc status and oldest seccomp filter (ptrace)
                    against the same grant
  resume()          then let them run (SIGCONT)

A thread may hold less than the spec grants, never more. Seccomp: the filter the spec's profile
installs must be the oldest of every thread's chain (filters added later only restrict); which
filter that is on this node is known only from a container of the same profile on this node:
recorded at capture (the oldest filter of the captured init, read from the kernel by CRIU's
dump), or learnt once from a probe container that runs nothing. Without it, no restore.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from thaw.oci import ThawError
from thaw.oci.digest import sha256_hex
from thaw.oci.files import atomic_write, make_private_dir
from thaw.shim.drivers import criu_images
from thaw.shim.drivers.criu_images import SECCOMP_FILTER, SECCOMP_FILTER_FLAG_TSYNC, Images

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
CAP_SETS = ("inh", "prm", "eff", "bnd", "amb")
_SPEC_SETS = {"inh": "inheritable", "prm": "permitted", "eff": "effective", "bnd": "bounding", "amb": "ambient"}
# Securebits a process may hold without CAP_SETPCAP: KEEP_CAPS (prctl PR_SET_KEEPCAPS needs no
# privilege) and those that only take privilege away (NOROOT, the locks, NO_CAP_AMBIENT_RAISE).
# NO_SETUID_FIXUP (bit 2) keeps capabilities across uid changes: only with CAP_SETPCAP.
_SECBITS_UNPRIVILEGED = 0b11_1111_1111 & ~(1 << 2)
_RLIM_INFINITY = (1 << 64) - 1
_RLIMITS: dict[str, int] = {name: getattr(resource, name) for name in dir(resource) if name.startswith("RLIMIT_")}
_RLIM_NLIMITS: int = getattr(resource, "RLIM_NLIMITS", 16)
_UNLIMITED_SCHED = (0, 3, 5)          # SCHED_OTHER, SCHED_BATCH, SCHED_IDLE: no privilege needed


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

    def may(self, cap: int) -> bool:
        return bool(self.caps["prm"] >> cap & 1)

    @classmethod
    def of(cls, spec: dict[str, Any], seccomp_reference: tuple[bytes, int] | None = None) -> Grant:
        proc = spec.get("process") or {}
        user = proc.get("user") or {}
        caps = proc.get("capabilities") or {}
        uid, gid = int(user.get("uid", 0)), int(user.get("gid", 0))
        rlimits = {}
        for number in range(_RLIM_NLIMITS):
            hard = resource.getrlimit(number)[1]
            rlimits[number] = _RLIM_INFINITY if hard == resource.RLIM_INFINITY else hard
        for r in proc.get("rlimits") or []:
            named = _RLIMITS.get(str(r.get("type", "")))
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
                   lsm_label=proc.get("apparmorProfile") or proc.get("selinuxLabel") or _own_label())


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


def _label(text: str) -> str:
    """An LSM label without AppArmor's " (enforce)" mode suffix."""
    head, sep, tail = text.strip("\0\n ").rpartition(" (")
    return head if sep and tail.endswith(")") else text.strip("\0\n ")


def _fmt_caps(mask: int) -> str:
    return f"{mask:016x}"


def _ids(values: Any) -> str:
    return "[" + ", ".join(str(v) for v in values) + "]"


# --- the images ---------------------------------------------------------------------------------------

def images_excess(images: Images, grant: Grant) -> list[Excess]:
    """What the images would restore beyond `grant`, thread by thread (empty: nothing)."""
    out: list[Excess] = []
    for task in images.tasks:
        if not task.runs:
            continue                                     # a zombie: CRIU recreates it dead
        out += _task_excess(task, grant)
        for th in task.threads:
            out += _creds_excess(task.pid, th.tid, th.uids, th.gids, th.groups, th.caps, th.no_new_privs, grant)
            out += _thread_excess(th, grant)
    return out


def _task_excess(task: criu_images.Task, grant: Grant) -> list[Excess]:
    out = []

    def add(field: str, snap: Any, spec: Any) -> None:
        out.append(Excess(task.pid, task.pid, field, str(snap), str(spec)))
    if not grant.may(CAP_SYS_RESOURCE):
        for number, (_soft, hard) in enumerate(task.rlimits):
            allowed = grant.rlimits.get(number, _RLIM_INFINITY)
            if hard > allowed:
                name = next((n for n, v in _RLIMITS.items() if v == number), str(number))
                add(f"{name} hard limit", _limit(hard), _limit(allowed))
        if task.oom_score_adj is not None and task.oom_score_adj < grant.oom_score_adj:
            add("oom_score_adj", task.oom_score_adj, f">= {grant.oom_score_adj}")
    if (task.loginuid is not None and task.loginuid != grant.loginuid and grant.loginuid is not None
            and not grant.may(CAP_AUDIT_CONTROL)):
        add("loginuid", task.loginuid, grant.loginuid)
    return out


def _limit(value: int) -> str:
    return "unlimited" if value >= _RLIM_INFINITY else str(value)


def _creds_excess(pid: int, tid: int, uids: tuple[int, ...], gids: tuple[int, ...], groups: tuple[int, ...],
                  caps: dict[str, int], no_new_privs: bool | None, grant: Grant) -> list[Excess]:
    """The checks the images and the kernel share: ids (real, effective, saved, fs), groups,
    capabilities, no_new_privs."""
    out = []

    def add(field: str, snap: str, spec: str) -> None:
        out.append(Excess(pid, tid, field, snap, spec))
    if not grant.may(CAP_SETUID) and any(u != grant.uid for u in uids):
        add("uids", _ids(uids), f"uid {grant.uid}")
    if not grant.may(CAP_SETGID):
        if any(g not in grant.gids for g in gids):
            add("gids", _ids(gids), _ids(sorted(grant.gids)))
        extra = sorted(set(groups) - grant.gids)
        if extra:
            add("supplementary groups", _ids(groups), _ids(sorted(grant.gids)))
    for k in CAP_SETS:
        if caps[k] & ~grant.caps[k]:
            add(f"Cap{k.capitalize()}", _fmt_caps(caps[k]), _fmt_caps(grant.caps[k]))
    if grant.no_new_privs and not no_new_privs:
        add("no_new_privs", "off" if no_new_privs is False else "not recorded", "on (noNewPrivileges)")
    return out


def _thread_excess(th: criu_images.Thread, grant: Grant) -> list[Excess]:
    out = []

    def add(field: str, snap: Any, spec: Any) -> None:
        out.append(Excess(th.pid, th.tid, field, str(snap), str(spec)))
    if th.secbits & ~_SECBITS_UNPRIVILEGED and not grant.may(CAP_SETPCAP):
        add("securebits", f"{th.secbits:#x}", f"{_SECBITS_UNPRIVILEGED:#x} without CAP_SETPCAP")
    if grant.seccomp is not None:
        add_seccomp = _seccomp_excess(th, grant)
        if add_seccomp:
            add("seccomp", *add_seccomp)
    if th.apparmor_data:
        add("AppArmor policy data (creds.apparmor_data)", "present", "none: thaw never loads policy")
    if th.lsm_profile and _label(th.lsm_profile) != _label(grant.lsm_label):
        add("LSM label", repr(th.lsm_profile), repr(grant.lsm_label))
    if th.lsm_sockcreate:
        add("LSM socket-create label", repr(th.lsm_sockcreate), "none")
    if not grant.may(CAP_SYS_NICE):
        if th.sched_policy is not None and th.sched_policy not in _UNLIMITED_SCHED:
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
    return _filter_mismatch(program, flags, ref)


def _filter_mismatch(program: bytes, flags: int, ref: tuple[bytes, int]) -> tuple[str, str] | None:
    """(found, spec) if an oldest filter is not the profile's (TSYNC aside: CRIU's way of
    restoring a chain all threads share, not a property of the filter)."""
    if (program, flags & ~SECCOMP_FILTER_FLAG_TSYNC) != ref:
        return (f"oldest filter sha256:{sha256_hex(program)[:16]} "
                f"({len(program) // 8} instructions, flags {flags:#x})",
                f"the profile's filter sha256:{sha256_hex(ref[0])[:16]} "
                f"({len(ref[0]) // 8} instructions, flags {ref[1]:#x})")
    return None


# --- the seccomp reference of a profile on this node --------------------------------------------------

def profile_key(seccomp: dict[str, Any], runtime: str) -> str:
    """What decides the BPF a profile compiles to here: the profile, the machine, the kernel
    (libseccomp probes its API level) and the runtime binary (its libseccomp)."""
    path = shutil.which(runtime) or runtime
    try:
        st = os.stat(path)
        who = f"{os.path.realpath(path)}:{st.st_size}:{st.st_mtime_ns}"
    except OSError:
        who = path
    u = os.uname()
    blob = json.dumps({"profile": seccomp, "arch": u.machine, "kernel": u.release, "runtime": who},
                      sort_keys=True, separators=(",", ":"))
    return sha256_hex(blob.encode())


def _reference_path(state_dir: str, key: str) -> str:
    return os.path.join(state_dir, "seccomp", key + ".json")


def reference(state_dir: str, key: str) -> tuple[bytes, int] | None:
    try:
        with open(_reference_path(state_dir, key)) as f:
            obj = json.load(f)
        return bytes.fromhex(obj["filter"]), int(obj["flags"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def record_reference(state_dir: str, key: str, program: bytes, flags: int, source: str) -> None:
    """Remember the filter a container of this profile got from the runtime on this node."""

    make_private_dir(os.path.join(state_dir, "seccomp"))
    atomic_write(_reference_path(state_dir, key), json.dumps(
        {"filter": program.hex(), "flags": flags, "source": source, "recorded": time.time()}).encode())


def record_from_capture(state_dir: str, image_dir: str, spec: dict[str, Any], runtime: str, source: str) -> None:
    """At capture: the captured init's oldest filter is the one the runtime installed for the
    spec's profile before any of the container's code ran (a process can only add filters),
    read from the kernel by CRIU's dump into images nothing else has touched yet."""
    seccomp = (spec.get("linux") or {}).get("seccomp")
    if not seccomp:
        return
    images = criu_images.read(image_dir, frozenset(_NAMESPACES))
    init = images.tasks[0].threads[0]
    if init.seccomp_mode == SECCOMP_FILTER and init.seccomp_chain:
        program, flags = init.seccomp_chain[0]
        # TSYNC is CRIU's way of restoring a chain all threads share (criu_images._synced), not a
        # property of the filter.
        record_reference(state_dir, profile_key(seccomp, runtime), program, flags & ~SECCOMP_FILTER_FLAG_TSYNC,
                         source)


def probe_reference(state_dir: str, seccomp: dict[str, Any], runtime: str) -> tuple[bytes, int] | None:
    """The filter this node's runtime installs for `seccomp`, learnt from a container that runs
    nothing: `runtime create` of an empty rootfs under a runc root of its own, without
    no-new-privs (then runc installs the filter before it waits to be started; with it, only
    after), its init's filter read with ptrace (PTRACE_SECCOMP_GET_FILTER), the container deleted.
    The BPF does not depend on no-new-privs, the user or the capabilities. Recorded like one from
    a capture; None if it cannot be learnt (the restore then cold-starts)."""

    key = profile_key(seccomp, runtime)
    work = tempfile.mkdtemp(prefix="probe-", dir=make_private_dir(os.path.join(state_dir, "seccomp")))
    root, cid = os.path.join(work, "runc"), f"thaw-seccomp-probe-{os.getpid()}-{key[:12]}"
    argv = [runtime, "--root", root]
    try:
        os.makedirs(os.path.join(work, "rootfs", "proc"))          # runc's init needs a /proc
        fd = os.open(os.path.join(work, "rootfs", "probe"), os.O_CREAT | os.O_WRONLY, 0o755)
        os.close(fd)
        spec = {"ociVersion": "1.0.2",
                "process": {"args": ["/probe"], "cwd": "/", "user": {"uid": 0, "gid": 0}, "env": [],
                            "noNewPrivileges": False},
                "root": {"path": "rootfs", "readonly": True},
                "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"}],
                "linux": {"namespaces": [{"type": t} for t in ("pid", "mount", "ipc", "uts", "network")],
                          "seccomp": seccomp}}
        with open(os.path.join(work, "config.json"), "w") as f:
            json.dump(spec, f)
        pid_file = os.path.join(work, "pid")
        proc = subprocess.run([*argv, "create", "--bundle", work, "--pid-file", pid_file, cid],
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              timeout=30)
        if proc.returncode != 0:
            return None
        with open(pid_file) as f:
            pid = int(f.read())
        found = _oldest_filter(pid)
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return None
    finally:
        subprocess.run([*argv, "delete", "--force", cid], stdin=subprocess.DEVNULL, capture_output=True, timeout=30)
        shutil.rmtree(work, ignore_errors=True)
    if found is None:
        return None
    program, flags = found
    record_reference(state_dir, key, program, flags & ~SECCOMP_FILTER_FLAG_TSYNC, "probe container")
    return program, flags & ~SECCOMP_FILTER_FLAG_TSYNC


_PTRACE_SEIZE, _PTRACE_INTERRUPT, _PTRACE_DETACH = 0x4206, 0x4207, 17
_BPF_MAXINSNS = 4096
_LIBC: Any = None


def _libc() -> Any:
    """libc with ptrace's prototype and a buffer for the longest filter, made once (the kernel
    check reads every thread's filter)."""
    global _LIBC
    if _LIBC is None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.ptrace.restype = ctypes.c_long
        libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
        _LIBC = libc, ctypes.create_string_buffer(_BPF_MAXINSNS * 8)
    return _LIBC
_PTRACE_SECCOMP_GET_FILTER, _PTRACE_SECCOMP_GET_METADATA = 0x420C, 0x420D


def _oldest_filter(pid: int, count: int | None = None, stopped: bool = False) -> tuple[bytes, int] | None:
    """The oldest seccomp filter of a thread (`pid`: any thread id) and its flags, read with
    ptrace while it is held in a ptrace stop (the chain cannot change meanwhile). `count`: the
    thread's Seccomp_filters, if the caller read its status already. `stopped`: the thread is in
    a group stop (as CRIU leaves a restore): seizing it already moves it into a ptrace stop (the
    kernel waits for that in PTRACE_SEIZE), so no interrupt and wait; it returns to the group
    stop on detach."""
    if count is None:
        count = int(_fields(_read(f"/proc/{pid}/status")).get("Seccomp_filters", "0"))
    if count < 1:
        return None
    libc, buf = _libc()
    if libc.ptrace(_PTRACE_SEIZE, pid, None, None) != 0:
        return None
    try:
        index = count - 1                                # 0 is the newest
        n = libc.ptrace(_PTRACE_SECCOMP_GET_FILTER, pid, index, buf) if stopped else -1
        if n < 0:                                        # running (the probe), or no longer stopped
            libc.ptrace(_PTRACE_INTERRUPT, pid, None, None)
            os.waitpid(pid, 0x40000000)                  # __WALL: the ptrace stop
            n = libc.ptrace(_PTRACE_SECCOMP_GET_FILTER, pid, index, buf)
        if n <= 0:
            return None
        meta = (ctypes.c_uint64 * 2)(index, 0)
        flags = int(meta[1]) if libc.ptrace(_PTRACE_SECCOMP_GET_METADATA, pid, 16, meta) == 16 else 0
        return ctypes.string_at(buf, n * 8), flags
    finally:
        libc.ptrace(_PTRACE_DETACH, pid, None, None)


_NAMESPACES = ("pid", "network", "mount", "ipc", "uts", "user", "cgroup", "time")


def spec_namespaces(spec: dict[str, Any]) -> frozenset[str]:
    """The namespaces whose contents a restore may bring back: those the spec has, except a
    network namespace joined by path (a pod's, shared by its containers: CRIU must treat it as
    external). IPC and UTS namespaces joined by path are a pod's own and get its contents as
    before (not compared)."""
    return frozenset(n.get("type", "") for n in (spec.get("linux") or {}).get("namespaces") or []
                     if not (n.get("path") and n.get("type") == "network"))


def check_images(image_dir: str, spec: dict[str, Any], grant: Grant) -> Images:
    """The images' tasks, if nothing in them exceeds the grant; else ConfinementError naming each
    excess (criu_images.ImageError for an image thaw does not restore)."""
    images = criu_images.read(image_dir, spec_namespaces(spec))
    excess = images_excess(images, grant) + mount_excess(images, spec) + uts_excess(images, spec)
    if excess:
        raise ConfinementError(_describe("the snapshot's images", excess))
    return images


def _clean(path: str) -> str:
    return os.path.normpath("/" + path.lstrip("/"))


def _is_bind(m: dict[str, Any]) -> bool:
    return m.get("type") == "bind" or bool({"bind", "rbind"} & set(m.get("options") or []))


def _same_type(e: criu_images.ImageMount, m: dict[str, Any]) -> bool:
    """Whether CRIU would make the spec mount `m`'s kind of filesystem (auto: by name, from the
    spec's own source only)."""
    if e.fstype in criu_images.MOUNT_FSTYPES.get(m.get("type", ""), ()):
        return True
    return e.fstype == criu_images.FSTYPE_AUTO and e.fsname == m.get("type") and e.source == m.get("source")


def mount_excess(images: Images, spec: dict[str, Any]) -> list[Excess]:
    """The images' mount tree against the spec's: CRIU makes every mount its images list (runc
    maps the spec's bind mounts and masks in as external ones, keyed by destination), so a forged
    entry could unmask a masked path, make a read-only one writable, or mount what the spec never
    asked for (a host disk: fstype auto). Every entry must be one the spec makes — the root, a
    spec mount of its type (a bind: external under its destination's key), a mask (/dev/null or a
    read-only tmpfs), a read-only path — with MS_RDONLY where the spec makes it read-only; every
    masked or read-only path that exists on this node (the same kernel: fingerprint.py) must be
    there. A mount the container made itself, or a submount under an rbind, is refused too
    (cold start: not provable from the spec)."""
    linux = spec.get("linux") or {}
    masked = {_clean(p) for p in linux.get("maskedPaths") or []}
    readonly = {_clean(p) for p in linux.get("readonlyPaths") or []}
    mounts = {_clean(m["destination"]): m for m in spec.get("mounts") or [] if m.get("destination")}
    root_ro = bool((spec.get("root") or {}).get("readonly"))
    terminal = bool((spec.get("process") or {}).get("terminal"))
    pid = images.tasks[0].pid if images.tasks else 0
    out: list[Excess] = []

    def add(mp: str, what: str, snap: str, want: str) -> None:
        out.append(Excess(pid, pid, f"mount {mp}{what}", snap, want))
    seen: set[str] = set()
    for e in images.mounts:
        mp = _clean(e.mountpoint)
        seen.add(mp)
        ro = bool((e.flags | e.sb_flags) & criu_images.MS_RDONLY)
        if mp == "/":
            if root_ro and not ro:
                add(mp, "", "writable", "read-only (root.readonly)")
        elif mp in masked:
            if not (e.ext_key == "/dev/null" or (e.fstype == criu_images.FSTYPE_TMPFS and ro)):
                add(mp, " (maskedPaths)", f"a mount of {e.fsname or e.fstype} {e.ext_key or e.source}",
                    "masked: /dev/null or a read-only tmpfs")
        elif mp in readonly:
            if not ro:
                add(mp, " (readonlyPaths)", "writable", "read-only")
        elif mp in mounts:
            m = mounts[mp]
            if _is_bind(m):
                if e.ext_key != mp:
                    add(mp, "", f"{'external ' + repr(e.ext_key) if e.ext_key else 'not external'}",
                        f"the spec's bind mount of {m.get('source')!r} (external {mp!r})")
            elif m.get("type") == "cgroup" and e.fstype == criu_images.FSTYPE_TMPFS and e.ext_key is None:
                # cgroup v1: runc's tmpfs holding a bind per hierarchy (each checked below); the
                # images of a real capture record it writable even under "ro": nothing but
                # runc's empty directories in it
                continue
            elif e.ext_key is not None or not _same_type(e, m):
                add(mp, "", f"fstype {e.fsname or e.fstype} source {e.ext_key or e.source!r}",
                    f"{m.get('type')} from {m.get('source')!r}")
            if "ro" in (m.get("options") or []) and not ro:
                add(mp, "", "writable", "read-only (options: ro)")
        elif (e.fstype == criu_images.FSTYPE_CGROUP and e.ext_key in (None, mp) and os.path.dirname(mp) in mounts
              and mounts[os.path.dirname(mp)].get("type") == "cgroup"):
            # cgroup v1: runc binds each hierarchy below the spec's cgroup mount (external under its
            # destination), read-only where that mount is
            if "ro" in (mounts[os.path.dirname(mp)].get("options") or []) and not ro:
                add(mp, "", "writable", "read-only (the cgroup mount's options: ro)")
        elif mp == "/dev/console" and terminal and e.fstype == criu_images.FSTYPE_DEVPTS and e.ext_key is None:
            pass                                         # runc binds the container's pty there
        else:
            add(mp, "", f"a mount of {e.fsname or e.fstype} {e.ext_key or e.source!r}",
                "no such mount in the spec")
    for mp in sorted((masked | readonly) - seen):
        if mp.startswith(("/proc/", "/sys/")) and os.path.lexists(mp):
            add(mp, " (maskedPaths)" if mp in masked else " (readonlyPaths)", "absent from the images",
                "masked" if mp in masked else "read-only")
    return out


def uts_excess(images: Images, spec: dict[str, Any]) -> list[Excess]:
    """The hostname and domain name CRIU would set in the container's own UTS namespace: those
    the spec sets. (A UTS namespace joined by path is a pod's: not compared.)"""
    if images.uts is None:
        return []
    own = any(n.get("type") == "uts" and not n.get("path") for n in (spec.get("linux") or {}).get("namespaces") or [])
    pid = images.tasks[0].pid if images.tasks else 0
    out = []
    for field, got, want in (("hostname", images.uts[0], spec.get("hostname")),
                             ("domainname", images.uts[1], spec.get("domainname"))):
        if own and want is not None and got != want:
            out.append(Excess(pid, pid, field, repr(got), repr(want)))
    return out


def _describe(where: str, excess: list[Excess]) -> str:
    """Each kind of excess once (its first thread), then how many more threads repeat them."""
    first: dict[str, Excess] = {}
    for e in excess:
        first.setdefault(e.field, e)
    more = len(excess) - len(first)
    return (f"{where} hold more than the spec grants: " + "; ".join(str(e) for e in first.values())
            + (f"; and {more} more in other threads or tasks" if more else ""))


# --- the kernel -------------------------------------------------------------------------------------------

def _read(path: str) -> str:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.read(fd, 1 << 16).decode(errors="replace")
    finally:
        os.close(fd)


def tree(root_pid: int) -> list[int]:
    """root_pid and its descendants (every thread's children), parents first."""
    out, todo = [], [root_pid]
    while todo:
        pid = todo.pop(0)
        out.append(pid)
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                todo += [int(c) for c in _read(f"/proc/{pid}/task/{tid}/children").split()]
            except OSError:
                pass
    return out


def _status(path: str) -> dict[str, str]:
    return dict(line.split(":\t", 1) for line in _read(path).split("\n") if ":\t" in line)


_STATUS_KEYS = ("State", "NStgid", "NSpid", "Uid", "Gid", "Groups", "CapInh", "CapPrm", "CapEff", "CapBnd",
                "CapAmb", "NoNewPrivs", "Seccomp", "Seccomp_filters")


def _fields(text: str) -> dict[str, str]:
    """The lines of a /proc status this module reads (found by key: ~60 lines a file, 200+ files)."""
    out = {}
    text = "\n" + text
    for key in _STATUS_KEYS:
        at = text.find(f"\n{key}:")
        if at >= 0:
            start = at + len(key) + 2
            end = text.find("\n", start)
            out[key] = text[start:end if end >= 0 else None].strip()
    return out


@dataclass(frozen=True)
class RestoredTree:
    """The restored tree as the kernel check found it: host pid -> pid in the container."""
    tasks: dict[int, int]


def kernel_excess(root_pid: int, images: Images, grant: Grant) -> tuple[list[Excess], RestoredTree]:
    """Every thread of the restored tree, as the kernel has it, against the grant; and the tree
    itself against the images (the same tasks and threads, each seccomp chain as long)."""
    out: list[Excess] = []
    want = {th.tid: th for t in images.tasks if t.runs for th in t.threads}
    seen: set[int] = set()
    tasks: dict[int, int] = {}
    for pid in tree(root_pid):
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid_text in tids:
            try:
                st = _fields(_read(f"/proc/{pid}/task/{tid_text}/status"))
            except OSError:
                continue
            if st.get("State", "").startswith(("Z", "X")):
                continue                                 # a zombie runs nothing
            # Ids in the container's pid namespace (the images' numbering): the last of each list.
            vpid, vtid = _last(st.get("NStgid"), pid), _last(st.get("NSpid"), int(tid_text))
            tasks[pid] = vpid
            seen.add(vtid)
            caps = {k: int(st.get("Cap" + k.capitalize(), "0"), 16) for k in CAP_SETS}
            nnp = st.get("NoNewPrivs", "0") == "1"
            out += _creds_excess(vpid, vtid, _ints(st, "Uid"), _ints(st, "Gid"), _ints(st, "Groups"), caps, nnp, grant)
            mode = int(st.get("Seccomp", "0"))
            filters = int(st.get("Seccomp_filters", "0"))
            if not st.get("State", "").startswith(("T", "t")):
                # CRIU was asked to leave every task stopped: one that is not may have run code.
                out.append(Excess(vpid, vtid, "state", st.get("State", "?"), "stopped until checked"))
            if grant.seccomp is not None and mode != SECCOMP_FILTER:
                out.append(Excess(vpid, vtid, "seccomp", f"mode {mode}", "a filter (linux.seccomp)"))
            th = want.get(vtid)
            if th is None:
                out.append(Excess(vpid, vtid, "thread", "restored, not in the images", "only the images' tasks"))
            elif mode != th.seccomp_mode or (mode == SECCOMP_FILTER and filters != len(th.seccomp_chain)):
                out.append(Excess(vpid, vtid, "seccomp", f"mode {mode} with {filters} filter(s)",
                                  f"the images' mode {th.seccomp_mode} with {len(th.seccomp_chain)}"))
            if grant.seccomp is not None and mode == SECCOMP_FILTER:
                wrong = _kernel_filter_excess(int(tid_text), filters, grant, st.get("State", "").startswith("T"))
                if wrong:
                    out.append(Excess(vpid, vtid, "seccomp (kernel)", *wrong))
    missing = sorted(set(want) - seen)
    if missing:
        out.append(Excess(root_pid, root_pid, "threads", f"{_ids(missing)} missing from the restored tree",
                          "every thread of the images"))
    return out, RestoredTree(tasks)


def _kernel_filter_excess(tid: int, count: int, grant: Grant, stopped: bool) -> tuple[str, str] | None:
    """(kernel, spec) unless the stopped thread's oldest filter, read from the kernel, is the
    profile's: the images' bytes are what CRIU was asked to install, this is what it installed."""
    ref = grant.seccomp_reference
    if ref is None:
        return f"{count} filter(s), not provable", "linux.seccomp's filter, of which this node holds no record"
    found = _oldest_filter(tid, count, stopped)
    if found is None:
        return f"{count} filter(s), unreadable with ptrace", "linux.seccomp's filter"
    program, flags = found
    return _filter_mismatch(program, flags, ref)


def _ints(status: dict[str, str], key: str) -> tuple[int, ...]:
    return tuple(int(x) for x in status.get(key, "").split())


def _last(nspid: str | None, default: int) -> int:
    fields = (nspid or "").split()
    return int(fields[-1]) if fields else default


def check_kernel(root_pid: int, images: Images, grant: Grant) -> RestoredTree:
    excess, restored = kernel_excess(root_pid, images, grant)
    if excess:
        raise ConfinementError(_describe("the restored tasks (kernel)", excess))
    return restored


def resume(restored: RestoredTree, images: Images) -> None:
    """Let the restored tasks run: SIGCONT to each task CRIU left stopped at thaw's request (a
    task that was stopped when captured stays stopped)."""
    stopped = {t.pid for t in images.tasks if t.state == criu_images.TASK_STOPPED}
    for pid, vpid in restored.tasks.items():
        if vpid not in stopped:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
