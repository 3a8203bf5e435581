"""What a snapshot's CRIU image directory may hold for a container restore, and what its images
would restore (the facts thaw compares with the new spec), with no protobuf in sight: the decoding
itself is criu_decode.py's, done once when a snapshot enters the store (the facts are kept beside
its seal, shim/node/store/images.py) and again only for a store entry without them.

CRIU restores each thread's credentials, capabilities, no-new-privs, seccomp filters and LSM
label, each task's rlimits and oom_score_adj, each namespace's contents (hostname, IPC sysctls
and objects, ...) exactly as its images say, running as root; runc re-applies none of them on
restore. So what a restore brings back is read from the very files CRIU will read (never from the
snapshot's config), and shim/lifecycle/confinement/ compares it with the new spec.

This sits in shim/ beside criu.py (the node's CRIU), not in oci/: it is CRIU's format, not an
OCI one, and its schemas are a build product of the node's CRIU source.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import struct
from dataclasses import dataclass
from typing import Any

from thaw.oci import ThawError

IMG_COMMON_MAGIC = 0x54564319
IMG_SERVICE_MAGIC = 0x55105940
RAW = 0
INVENTORY_MAGIC, PSTREE_MAGIC, CORE_MAGIC, SECCOMP_MAGIC = 0x58313116, 0x50273030, 0x55053847, 0x64413049
MOUNTPOINTS_MAGIC, UTSNS_MAGIC, IPCNS_VAR_MAGIC, NETNS_MAGIC = 0x55563928, 0x54473203, 0x53115007, 0x55933752

# compel/include/uapi/task-state.h
TASK_ALIVE, TASK_DEAD, TASK_STOPPED, TASK_ZOMBIE = 0x01, 0x02, 0x03, 0x06
SECCOMP_DISABLED, SECCOMP_STRICT, SECCOMP_FILTER = 0, 1, 2
SECCOMP_FILTER_FLAG_TSYNC = 1

class ImageError(ThawError):
    """The snapshot's CRIU images hold something thaw does not hand to CRIU (or cannot read)."""


class DecoderMissing(ImageError):
    """This node cannot decode CRIU images (their schemas are not installed): a fact about the
    node, never sealed as one about a snapshot."""


@dataclass(frozen=True)
class Kind:
    """One kind of CRIU image file a container snapshot may hold."""
    pattern: str          # the file name (criu/image-desc.c), %u etc. as \d+ / hex
    magic: int            # criu/include/magic.h; RAW: no header
    why: str


# The file names of the kinds criu_decode reads (one spelling, used by KINDS and the decoder).
INVENTORY, PSTREE, SECCOMP = r"inventory\.img", r"pstree\.img", r"seccomp\.img"
CORE, MOUNTPOINTS = r"core-\d+\.img", r"mountpoints-\d+\.img"
UTSNS, IPCNS_VAR, IPC_OBJECTS, NETNS = (r"utsns-\d+\.img", r"ipcns-var-\d+\.img", r"ipcns-(shm|msg|sem)-\d+\.img",
                                         r"netns-\d+\.img")

# The kinds of image a snapshot may hold for a container restore by runc, and why each is fine.
# Anything else is refused: tun devices, BPF maps, binfmt_misc, autofs, AppArmor policy blobs
# (apparmor.img, loaded by CRIU into the kernel), the old creds-<pid>.img, ... Namespace contents
# (hostname, IPC objects and sysctls, network devices/addresses/routes/firewall/net sysctls, user
# namespace maps) only where the new spec has that namespace (NAMESPACE_KINDS).
KINDS: dict[str, Kind] = {k.pattern: k for k in (
    Kind(INVENTORY, INVENTORY_MAGIC, "the dump's header: image version, root namespace ids, LSM type"),
    Kind(PSTREE, PSTREE_MAGIC, "the process tree: every task and thread (checked)"),
    Kind(CORE, CORE_MAGIC, "per thread: registers, signal state, credentials, seccomp (checked)"),
    Kind(r"ids-\d+\.img", 0x54432030, "per task: the ids of its namespaces and shared objects"),
    Kind(r"mm-\d+\.img", 0x57492820, "per task: its address space layout"),
    Kind(r"pagemap-\d+\.img", 0x56084025, "per task: which pages pages-*.img holds"),
    Kind(r"pagemap-shmem-\d+\.img", 0x56084025, "shared memory page maps"),
    Kind(r"pages-\d+\.img", RAW, "memory contents"),
    Kind(r"fs-\d+\.img", 0x51403912, "per task: cwd, root, umask"),
    Kind(r"files\.img", 0x56303138, "open files of every kind CRIU knows, by id"),
    Kind(r"fdinfo-\d+\.img", 0x56213732, "per task: its file descriptor table"),
    Kind(r"pipes-data\.img", 0x56453709, "data buffered in pipes"),
    Kind(r"fifo-data\.img", 0x59333054, "data buffered in FIFOs"),
    Kind(r"sk-queues\.img", 0x56264026, "data queued on sockets"),
    Kind(r"tcp-stream-[0-9a-f]+\.img", 0x51465506, "TCP connection state"),
    Kind(r"memfd\.img", 0x48453499, "memfd inodes"),
    Kind(r"remap-fpath\.img", 0x59133954, "open files whose path was unlinked or moved"),
    Kind(r"ghost-file-[0-9a-f]+\.img", RAW, "contents of open, unlinked files"),
    Kind(r"filelocks\.img", 0x54323616, "file locks"),
    Kind(SECCOMP, SECCOMP_MAGIC, "seccomp filter chains (checked)"),
    Kind(r"timens-\d+\.img", 0x43114433, "time namespace offsets"),
    Kind(r"cgroup\.img", 0x59383330, "cgroup membership (runc restores into the new spec's cgroup)"),
    Kind(MOUNTPOINTS, MOUNTPOINTS_MAGIC, "the container's mount tree (runc passes its mounts as external)"),
    Kind(r"tmpfs-dev-\d+\.tar\.gz(\.img)?", RAW, "contents of tmpfs mounts of the container (e.g. /dev)"),
    Kind(r"tmpfs-\d+\.tar\.gz(\.img)?", RAW, "contents of tmpfs mounts of the container"),
    Kind(r"tty-info\.img", 0x59453036, "terminal state"),
    Kind(r"tty-data\.img", 0x59413026, "data buffered in terminals"),
    Kind(r"stats-(dump|restore)", 0x57093306, "CRIU's own statistics"),
    Kind(r"irmap-cache\.img", 0x57004059, "inotify path cache"),
    Kind(r"descriptors\.json", RAW, "runc's record of the init's stdio"),
    Kind(r"cpuinfo\.img", 0x61404013, "CPU features at dump"),
)}

# Namespace contents: allowed only where the spec has the namespace (confinement.spec_namespaces:
# a network namespace joined by path, a pod's, only in CRIU's external form).
NAMESPACE_KINDS: dict[str, tuple[str, Kind]] = {k.pattern: (ns, k) for ns, k in (
    ("uts", Kind(UTSNS, UTSNS_MAGIC, "hostname and domain name")),
    ("ipc", Kind(IPCNS_VAR, IPCNS_VAR_MAGIC, "IPC namespace sysctls")),
    ("ipc", Kind(IPC_OBJECTS, RAW, "System V IPC objects")),
    ("network", Kind(NETNS, NETNS_MAGIC, "network namespace sysctls")),
    ("network", Kind(r"netdev-\d+\.img", 0x57373951, "network devices (loopback, veth) of the namespace")),
    ("network", Kind(r"(ifaddr|route|route6|rule|iptables|ip6tables|nftables)-\d+\.img", RAW,
                     "addresses, routes, rules, firewall of the namespace")),
    ("network", Kind(r"netns-(ct|exp)-\d+\.img", 0x57373951, "conntrack entries of the namespace")),
    ("user", Kind(r"userns-\d+\.img", 0x55474906, "user namespace id maps")),
    ("pid", Kind(r"pidns-\d+\.img", 0x61157326, "pid namespace")),
)}

_KIND_RE = re.compile("|".join(f"(?P<k{i}>{p})" for i, p in enumerate(KINDS)))
_NS_RE = re.compile("|".join(f"(?P<n{i}>{p})" for i, p in enumerate(NAMESPACE_KINDS)))
_KIND_LIST = list(KINDS.values())
_NS_LIST = list(NAMESPACE_KINDS.values())

# Refused by name, with the reason (a clearer message than "not allowed").
REFUSED = (
    (re.compile(r"creds-\d+\.img"), "the old per-task credentials form (creds-<pid>.img); thaw reads only "
                                    "per-thread credentials in core-<tid>.img"),
    (re.compile(r"apparmor\.img"), "AppArmor policy blobs, which CRIU would load into the kernel"),
    (re.compile(r"tunfile\.img"), "tun/tap devices"),
    (re.compile(r"bpfmap-(file|data)\.img"), "BPF maps"),
    (re.compile(r"binfmt-misc(-\d+)?\.img"), "binfmt_misc registrations (host-wide)"),
    (re.compile(r"autofs-\d+\.img"), "autofs mounts"),
)


def header(name: str, magic: int) -> bytes:
    """The bytes an image file of this kind starts with."""
    if magic == INVENTORY_MAGIC:
        return struct.pack("<I", magic)
    service = name.startswith(("stats-", "irmap-cache"))
    return struct.pack("<II", IMG_SERVICE_MAGIC if service else IMG_COMMON_MAGIC, magic)


# --- what a snapshot's images would restore --------------------------------------------------------

@dataclass(frozen=True)
class Thread:
    """One thread's credentials and confinement as CRIU would restore them."""
    pid: int                       # its task (thread group) in the snapshot's pid namespace
    tid: int
    uids: tuple[int, int, int, int]     # real, effective, saved, fs
    gids: tuple[int, int, int, int]
    groups: tuple[int, ...]
    caps: dict[str, int]                # inh, prm, eff, bnd, amb -> mask
    secbits: int
    no_new_privs: bool | None           # None: the image does not say (CRIU leaves it off)
    seccomp_mode: int
    # (BPF program, flags), oldest first: the order CRIU installs them in (thread_core names the
    # oldest filter of the chain, and each filter's `prev` the next newer one; criu/seccomp.c).
    seccomp_chain: tuple[tuple[bytes, int], ...]
    lsm_profile: str
    lsm_sockcreate: str
    apparmor_data: bool
    sched_policy: int | None
    sched_nice: int | None


@dataclass(frozen=True)
class Task:
    pid: int
    ppid: int
    state: int
    comm: str
    rlimits: tuple[tuple[int, int], ...]    # by RLIMIT_* number: (soft, hard)
    oom_score_adj: int | None
    loginuid: int | None
    threads: tuple[Thread, ...]

    @property
    def runs(self) -> bool:
        """Whether CRIU brings it back as a task that runs: all but a dead one (a zombie), which
        it recreates only to exit. Any other state, known or not, is checked as running."""
        return self.state not in (TASK_DEAD, TASK_ZOMBIE)


@dataclass(frozen=True)
class ImageMount:
    """One entry of a mountpoints-<id>.img: a mount CRIU would make in the container."""
    image: str
    mountpoint: str         # in the container
    fstype: int             # mnt.proto's fstype: MOUNT_FSTYPES
    fsname: str
    source: str
    root: str
    flags: int              # per-mount flags (MS_RDONLY, ...)
    sb_flags: int           # the superblock's (a remount without MS_BIND sets MS_RDONLY here)
    ext_key: str | None     # an external mount: runc's key, mapped at restore to what the spec names


MS_RDONLY = 1
# mnt.proto's fstype numbers, by the OCI mount type that makes each (runc mounts cgroup2 for a
# "cgroup" mount on a cgroup v2 node).
MOUNT_FSTYPES = {"proc": {1}, "sysfs": {2}, "devtmpfs": {3}, "tmpfs": {5}, "devpts": {6}, "cgroup": {12, 23},
                 "mqueue": {14}, "cgroup2": {23}}
FSTYPE_TMPFS, FSTYPE_DEVPTS, FSTYPE_CGROUP, FSTYPE_AUTO = 5, 6, 12, 16


@dataclass(frozen=True)
class Images:
    tasks: tuple[Task, ...]
    files: tuple[str, ...]
    arch: str
    mounts: tuple[ImageMount, ...] = ()
    uts: tuple[str, str] | None = None      # (nodename, domainname) CRIU sets in the UTS namespace
    # The IPC sysctls CRIU writes into the IPC namespace (ipcns-var, ipc-var.proto's field names)
    ipc_vars: dict[str, Any] | None = None
    # Each netns-<id>.img: None where it is an external namespace's entry only (runc hands CRIU
    # a network namespace the spec joins), else the fields it would restore.
    netns: dict[str, str | None] = dataclasses.field(default_factory=dict)
    # Each ipcns-shm/msg/sem-<id>.img and its size (more than its header: System V objects to create)
    ipc_objects: dict[str, int] = dataclasses.field(default_factory=dict)


ARCH_NAMES = {1: "x86_64", 2: "arm", 3: "aarch64", 4: "ppc64", 5: "s390", 6: "mips", 7: "loongarch64", 8: "riscv64"}


def check_kinds(names: list[str], namespaces: frozenset[str]) -> None:
    """Refuse any file that is not an allowed kind (`namespaces`: those the spec creates)."""
    for name in names:
        if _KIND_RE.fullmatch(name):
            continue
        m = _NS_RE.fullmatch(name)
        if m:
            ns, kind = _NS_LIST[int((m.lastgroup or "n0")[1:])]
            if ns in namespaces or _EXTERNAL_NETNS.fullmatch(name):
                continue                               # (an external netns: check() sees it is only that)
            raise ImageError(f"image {name} ({kind.why}) restores {ns} namespace state, but the spec has "
                             f"no {ns} namespace of the container's own")
        for pattern, why in REFUSED:
            if pattern.fullmatch(name):
                raise ImageError(f"image {name}: {why}: not restored by thaw")
        raise ImageError(f"image {name}: not a kind of CRIU image thaw restores (see KINDS in shim/drivers/criu_images.py)")


def check_magics(image_dir: str, names: list[str], decoded: re.Pattern[str]) -> None:
    """Every allowed, non-raw file starts with its kind's header (a file named like one kind but
    holding another would have CRIU read it as that other kind). `decoded`: the names the caller
    decodes (checking their magic itself)."""
    for name in names:
        if decoded.fullmatch(name):
            continue                                   # the decoder reads these, magic included
        m = _KIND_RE.fullmatch(name) or _NS_RE.fullmatch(name)
        if not m:
            continue
        group = m.lastgroup or ""
        kind = _KIND_LIST[int(group[1:])] if group.startswith("k") else _NS_LIST[int(group[1:])][1]
        if kind.magic == RAW:
            continue
        head = header(name, kind.magic)
        try:
            fd = os.open(os.path.join(image_dir, name), os.O_RDONLY | os.O_CLOEXEC)
            try:
                ok = os.read(fd, len(head)) == head
            finally:
                os.close(fd)
        except OSError as exc:
            raise ImageError(f"image {name}: {exc.strerror}") from exc
        if not ok:
            raise ImageError(f"image {name}: not a {name.split('.')[0].rstrip('-0123456789')} image (wrong magic)")


# A network namespace runc joins by path (a pod's) is dumped as external: an entry naming its
# key and holding nothing else, which CRIU does not restore into (runc hands it the namespace).
_EXTERNAL_NETNS = re.compile(NETNS)


def check(images: Images, namespaces: frozenset[str]) -> None:
    """Refuse images that hold a kind thaw does not restore, or namespace contents the spec has
    no namespace for (`namespaces`: those whose contents it may get, confinement.spec_namespaces)."""
    check_kinds(list(images.files), namespaces)
    if "network" not in namespaces:
        for name, restores in sorted(images.netns.items()):
            if restores is not None:
                raise ImageError(f"image {name} restores network namespace state ({restores}), but the "
                                 "spec does not create a network namespace")


# --- the facts, kept beside a snapshot's seal ------------------------------------------------------
# Bumped whenever what criu_decode.read() derives changes: a store entry with facts of another
# version is decoded again from its images.
CAP_SETS = ("inh", "prm", "eff", "bnd", "amb")   # the capability sets, in CRIU's and the facts' order
FACTS_VERSION = 2


class StaleFacts(ThawError):
    """Facts of another version of this reader: decode the images again."""


def to_facts(images: Images | None, error: str | None = None) -> bytes:
    """The facts of a decoded image directory as compact JSON (or the reason it cannot be
    decoded, which a restore then reports). Each distinct seccomp filter is written once: the 200
    threads of a process share one chain."""
    if images is None:
        return json.dumps({"version": FACTS_VERSION, "error": error}).encode()
    filters: dict[bytes, int] = {}

    def chain(th: Thread) -> list[list[int]]:
        return [[filters.setdefault(p, len(filters)), f] for p, f in th.seccomp_chain]

    tasks = [{"pid": t.pid, "ppid": t.ppid, "state": t.state, "comm": t.comm, "rlimits": t.rlimits,
              "oom_score_adj": t.oom_score_adj, "loginuid": t.loginuid,
              "threads": [[th.tid, th.uids, th.gids, th.groups, [th.caps[k] for k in CAP_SETS], th.secbits,
                           th.no_new_privs, th.seccomp_mode, chain(th), th.lsm_profile, th.lsm_sockcreate,
                           th.apparmor_data, th.sched_policy, th.sched_nice] for th in t.threads]}
             for t in images.tasks]
    return json.dumps({
        "version": FACTS_VERSION, "error": None, "files": images.files, "arch": images.arch, "tasks": tasks,
        "filters": [p.hex() for p in filters], "mounts": [dataclasses.astuple(m) for m in images.mounts],
        "uts": images.uts, "ipc_vars": images.ipc_vars, "netns": images.netns,
        "ipc_objects": images.ipc_objects,
    }, separators=(",", ":")).encode()




def from_facts(data: bytes) -> Images:
    """The Images the facts describe; ImageError if the images could not be decoded, StaleFacts
    if they were written by another version (or are not facts at all)."""
    try:
        obj = json.loads(data)
        if obj.get("version") != FACTS_VERSION:
            raise StaleFacts(f"image facts of version {obj.get('version')!r}, not {FACTS_VERSION}")
        if obj["error"] is not None:
            raise ImageError(str(obj["error"]))
        filters = [bytes.fromhex(h) for h in obj["filters"]]
        tasks = tuple(Task(
            pid=t["pid"], ppid=t["ppid"], state=t["state"], comm=t["comm"],
            rlimits=tuple((s, h) for s, h in t["rlimits"]), oom_score_adj=t["oom_score_adj"], loginuid=t["loginuid"],
            threads=tuple(Thread(
                pid=t["pid"], tid=tid, uids=(uids[0], uids[1], uids[2], uids[3]), gids=(gids[0], gids[1], gids[2], gids[3]),
                groups=tuple(groups),
                caps=dict(zip(CAP_SETS, caps, strict=True)), secbits=secbits, no_new_privs=nnp,
                seccomp_mode=mode, seccomp_chain=tuple((filters[i], f) for i, f in chain),
                lsm_profile=lsm, lsm_sockcreate=sockcreate, apparmor_data=apparmor, sched_policy=policy,
                sched_nice=nice)
                for tid, uids, gids, groups, caps, secbits, nnp, mode, chain, lsm, sockcreate, apparmor, policy, nice
                in t["threads"])) for t in obj["tasks"])
        return Images(tasks=tasks, files=tuple(obj["files"]), arch=obj["arch"],
                      mounts=tuple(ImageMount(*m) for m in obj["mounts"]),
                      uts=(obj["uts"][0], obj["uts"][1]) if obj["uts"] is not None else None,
                      ipc_vars=obj["ipc_vars"], netns=dict(obj["netns"]),
                      ipc_objects=dict(obj["ipc_objects"]))
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
        raise StaleFacts(f"image facts unreadable: {exc}") from exc
