"""CRIU's image files, read with the classes protoc generates from the .proto files of the CRIU
thaw builds (thaw.shim.drivers.criu_proto, made by install/node.sh), and what a snapshot's image
directory may hold for a container restore.

CRIU restores each thread's credentials, capabilities, no-new-privs, seccomp filters and LSM
label, each task's rlimits and oom_score_adj, exactly as its images say, running as root; runc
re-applies none of them on restore. So what a restore brings back is read here from the very
files CRIU will read (never from the snapshot's config), and shim/lifecycle/confinement.py compares it
with the new spec.

This sits in shim/ beside criu.py (the node's CRIU), not in oci/: it is CRIU's format, not an
OCI one, and its schemas are a build product of the node's CRIU source.

Image file layout (criu/image.c): u32 IMG_COMMON_MAGIC (IMG_SERVICE_MAGIC for a few service
files; nothing for inventory.img), u32 the kind's magic, then repeated (u32 little-endian length, protobuf message). Raw
kinds (pages, tmpfs archives) have no header. A message with a field the schema does not know,
or an image in a form thaw does not read (the old per-task creds-<pid>.img and per-task seccomp
fields) is refused rather than guessed at.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import re
import struct
from dataclasses import dataclass
from typing import Any

from google.protobuf.message import DecodeError

from thaw.oci import ThawError

IMG_COMMON_MAGIC = 0x54564319
IMG_SERVICE_MAGIC = 0x55105940
RAW = 0
INVENTORY_MAGIC, PSTREE_MAGIC, CORE_MAGIC, SECCOMP_MAGIC = 0x58313116, 0x50273030, 0x55053847, 0x64413049

# compel/include/uapi/task-state.h
TASK_ALIVE, TASK_DEAD, TASK_STOPPED, TASK_ZOMBIE = 0x01, 0x02, 0x03, 0x06
SECCOMP_DISABLED, SECCOMP_STRICT, SECCOMP_FILTER = 0, 1, 2


class ImageError(ThawError):
    """The snapshot's CRIU images hold something thaw does not hand to CRIU (or cannot read)."""


@dataclass(frozen=True)
class Kind:
    """One kind of CRIU image file a container snapshot may hold."""
    pattern: str          # the file name (criu/image-desc.c), %u etc. as \d+ / hex
    magic: int            # criu/include/magic.h; RAW: no header
    why: str


# The kinds of image a snapshot may hold for a container restore by runc, and why each is fine.
# Anything else is refused: tun devices, BPF maps, binfmt_misc, autofs, AppArmor policy blobs
# (apparmor.img, loaded by CRIU into the kernel), the old creds-<pid>.img, ... Namespace contents
# (hostname, IPC objects and sysctls, network devices/addresses/routes/firewall/net sysctls, user
# namespace maps) only where the new spec has that namespace (NAMESPACE_KINDS).
KINDS: dict[str, Kind] = {k.pattern: k for k in (
    Kind(r"inventory\.img", INVENTORY_MAGIC, "the dump's header: image version, root namespace ids, LSM type"),
    Kind(r"pstree\.img", PSTREE_MAGIC, "the process tree: every task and thread (checked)"),
    Kind(r"core-\d+\.img", CORE_MAGIC, "per thread: registers, signal state, credentials, seccomp (checked)"),
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
    Kind(r"seccomp\.img", SECCOMP_MAGIC, "seccomp filter chains (checked)"),
    Kind(r"timens-\d+\.img", 0x43114433, "time namespace offsets"),
    Kind(r"cgroup\.img", 0x59383330, "cgroup membership (runc restores into the new spec's cgroup)"),
    Kind(r"mountpoints-\d+\.img", 0x55563928, "the container's mount tree (runc passes its mounts as external)"),
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
    ("uts", Kind(r"utsns-\d+\.img", 0x54473203, "hostname and domain name")),
    ("ipc", Kind(r"ipcns-var-\d+\.img", 0x53115007, "IPC namespace sysctls")),
    ("ipc", Kind(r"ipcns-(shm|msg|sem)-\d+\.img", RAW, "System V IPC objects")),
    ("network", Kind(r"netns-\d+\.img", 0x55933752, "network namespace sysctls")),
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


def schemas() -> Any:
    """The generated modules (imported on first use: ~10 ms, only on the restore path)."""
    global _pb
    if _pb is None:
        try:
            mod = {name: importlib.import_module(f"{__package__}.criu_proto.{name}_pb2")
                   for name in ("core", "pstree", "seccomp", "inventory", "mnt", "utsns")}
        except ImportError as exc:
            raise ImageError(f"CRIU's image schemas are not installed (install/node.sh generates them): "
                             f"{exc}") from exc
        _pb = _Schemas(mod["core"].core_entry, mod["pstree"].pstree_entry, mod["seccomp"].seccomp_entry,
                       mod["inventory"].inventory_entry, mod["mnt"].mnt_entry, mod["utsns"].utsns_entry)
    return _pb


@dataclass(frozen=True)
class _Schemas:
    core: Any
    pstree: Any
    seccomp: Any
    inventory: Any
    mount: Any
    uts: Any


_pb: _Schemas | None = None


def header(name: str, magic: int) -> bytes:
    """The bytes an image file of this kind starts with."""
    if magic == INVENTORY_MAGIC:
        return struct.pack("<I", magic)
    service = name.startswith(("stats-", "irmap-cache"))
    return struct.pack("<II", IMG_SERVICE_MAGIC if service else IMG_COMMON_MAGIC, magic)


def read_file(path: str, magic: int, message: Any, one: bool) -> list[Any]:
    """The messages of one image file of the given kind, each checked for fields its schema does
    not know (at any depth). `one`: exactly one message."""
    try:
        data = read_bytes(path)
    except OSError as exc:
        raise ImageError(f"{os.path.basename(path)}: {exc.strerror}") from exc
    return decode(data, magic, message, one, os.path.basename(path))


def read_bytes(path: str, limit: int = 1 << 26) -> bytes:
    """A small file's bytes (os-level: a restore reads hundreds of them)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks: list[bytes] = []
        while True:
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
            limit -= len(chunk)
            if limit < 0:
                raise OSError(27, "File too large")
    finally:
        os.close(fd)


def decode(data: bytes, magic: int, message: Any, one: bool, name: str) -> list[Any]:
    head = header(name, magic)
    if not data.startswith(head):
        raise ImageError(f"{name}: not a {name.split('.')[0].rstrip('-0123456789')} image (wrong magic)")
    out = []
    pos = len(head)
    while pos < len(data):
        if pos + 4 > len(data):
            raise ImageError(f"{name}: truncated entry length at byte {pos}")
        (size,) = struct.unpack_from("<I", data, pos)
        pos += 4
        if pos + size > len(data):
            raise ImageError(f"{name}: entry of {size} bytes at byte {pos - 4} runs past the end")
        msg = message()
        try:
            msg.ParseFromString(data[pos:pos + size])
        except DecodeError as exc:
            raise ImageError(f"{name}: undecodable entry at byte {pos - 4}: {exc}") from exc
        pos += size
        size_known = msg.ByteSize()
        msg.DiscardUnknownFields()
        if msg.ByteSize() != size_known:
            raise ImageError(f"{name}: entry at byte {pos - size - 4} has fields CRIU {_CRIU} does not define")
        out.append(msg)
    if one and len(out) != 1:
        raise ImageError(f"{name}: {len(out)} entries, expected one")
    return out


_CRIU = "4.1.1"


def encode(messages: list[Any], magic: int, name: str) -> bytes:
    """An image file holding `messages` (the inverse of decode)."""
    parts = [header(name, magic)]
    for m in messages:
        body = m.SerializeToString()
        parts.append(struct.pack("<I", len(body)) + body)
    return b"".join(parts)


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
    uts: tuple[str, str] | None = None      # (nodename, domainname) CRIU sets in a UTS namespace it creates


def _caps(words: Any) -> int:
    mask = 0
    for i, w in enumerate(words):
        mask |= int(w) << (32 * i)
    return mask


_ARCH = {1: "x86_64", 2: "arm", 3: "aarch64", 4: "ppc64", 5: "s390", 6: "mips", 7: "loongarch64", 8: "riscv64"}


def check_kinds(names: list[str], namespaces: frozenset[str]) -> None:
    """Refuse any file that is not an allowed kind (`namespaces`: those the spec creates)."""
    for name in names:
        if _KIND_RE.fullmatch(name):
            continue
        m = _NS_RE.fullmatch(name)
        if m:
            ns, kind = _NS_LIST[int((m.lastgroup or "n0")[1:])]
            if ns in namespaces or _EXTERNAL_NETNS.fullmatch(name):
                continue                               # (an external netns: read() checks it is only that)
            raise ImageError(f"image {name} ({kind.why}) restores {ns} namespace state, but the spec has "
                             f"no {ns} namespace of the container's own")
        for pattern, why in REFUSED:
            if pattern.fullmatch(name):
                raise ImageError(f"image {name}: {why}: not restored by thaw")
        raise ImageError(f"image {name}: not a kind of CRIU image thaw restores (see KINDS in shim/drivers/criu_images.py)")


def check_magics(image_dir: str, names: list[str]) -> None:
    """Every allowed, non-raw file starts with its kind's header (a file named like one kind but
    holding another would have CRIU read it as that other kind)."""
    for name in names:
        if name in _DECODED or name.startswith("core-"):
            continue                                   # read() decodes these, magic included
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


_DECODED = frozenset({"inventory.img", "pstree.img", "seccomp.img"})
# A network namespace runc joins by path (a pod's) is dumped as external: an entry naming its
# key and holding nothing else, which CRIU does not restore into (runc hands it the namespace).
_EXTERNAL_NETNS = re.compile(r"netns-\d+\.img")
NETNS_MAGIC = 0x55933752


def _check_external_netns(image_dir: str, name: str) -> None:
    entry_type = importlib.import_module(f"{__package__}.criu_proto.netdev_pb2").netns_entry
    for entry in read_file(os.path.join(image_dir, name), NETNS_MAGIC, entry_type, False):
        fields = [f.name for f, _ in entry.ListFields()]
        if fields != ["ext_key"]:
            raise ImageError(f"image {name} restores network namespace state ({', '.join(fields)}), but the "
                             "spec does not create a network namespace")


def read(image_dir: str, namespaces: frozenset[str]) -> Images:
    """Every task and thread the images would restore, with what each would hold. Raises
    ImageError on a kind of image outside the allow-list or anything unreadable."""
    names = sorted(os.listdir(image_dir))
    check_kinds(names, namespaces)
    check_magics(image_dir, names)
    if "network" not in namespaces:
        for name in names:
            if _EXTERNAL_NETNS.fullmatch(name):
                _check_external_netns(image_dir, name)
    pb = schemas()
    path = os.path.join
    read_file(path(image_dir, "inventory.img"), INVENTORY_MAGIC, pb.inventory, True)
    entries = read_file(path(image_dir, "pstree.img"), PSTREE_MAGIC, pb.pstree, False)
    if not entries:
        raise ImageError("pstree.img: no tasks")
    chains: list[tuple[bytes, int, int | None]] = []
    if "seccomp.img" in names:
        [sec] = read_file(path(image_dir, "seccomp.img"), SECCOMP_MAGIC, pb.seccomp, True)
        chains = [(bytes(f.filter), f.flags if f.HasField("flags") else 0, f.prev if f.HasField("prev") else None)
                  for f in sec.seccomp_filters]
    tasks = []
    seen: set[int] = set()
    arch = ""
    for e in entries:
        tids = list(e.threads) or [e.pid]
        if e.pid not in tids:
            raise ImageError(f"pstree.img: task {e.pid} is not among its own threads {tids}")
        for t in tids:
            if t in seen:
                raise ImageError(f"pstree.img: thread id {t} appears twice")
            seen.add(t)
        threads = []
        leader_tc = None
        for tid in tids:
            name = f"core-{tid}.img"
            if name not in names:
                raise ImageError(f"{name}: missing (task {e.pid} lists thread {tid})")
            [core] = read_file(path(image_dir, name), CORE_MAGIC, pb.core, True)
            arch = arch or _ARCH.get(core.mtype, "unknown")
            if tid == e.pid:
                if not core.HasField("tc"):
                    raise ImageError(f"{name}: the task core (tc) of task {e.pid} is missing")
                leader_tc = core.tc
                if core.tc.HasField("old_seccomp_mode") or core.tc.HasField("old_seccomp_filter"):
                    raise ImageError(f"{name}: per-task seccomp fields (an old image form thaw does not read)")
            threads.append(_thread(e.pid, tid, core, chains, name))
        assert leader_tc is not None
        threads = _synced(threads)
        rl = tuple((int(r.cur), int(r.max)) for r in leader_tc.rlimits.rlimits) if leader_tc.HasField("rlimits") else ()
        tasks.append(Task(pid=e.pid, ppid=e.ppid, state=leader_tc.task_state, comm=leader_tc.comm, rlimits=rl,
                          oom_score_adj=leader_tc.oom_score_adj if leader_tc.HasField("oom_score_adj") else None,
                          loginuid=leader_tc.loginuid if leader_tc.HasField("loginuid") else None,
                          threads=tuple(threads)))
    mounts = []
    uts = None
    for name in names:
        if name.startswith("mountpoints-"):
            for m in read_file(path(image_dir, name), MOUNTPOINTS_MAGIC, pb.mount, False):
                mounts.append(ImageMount(name, m.mountpoint, m.fstype, m.fsname, m.source, m.root, m.flags, m.sb_flags,
                                    m.ext_key if m.HasField("ext_key") else None))
        elif name.startswith("utsns-") and "uts" in namespaces:
            [u] = read_file(path(image_dir, name), UTSNS_MAGIC, pb.uts, True)
            uts = (u.nodename, u.domainname)
    return Images(tuple(tasks), tuple(names), arch, tuple(mounts), uts)


MOUNTPOINTS_MAGIC, UTSNS_MAGIC = 0x55563928, 0x54473203


SECCOMP_FILTER_FLAG_TSYNC = 1


def _synced(threads: list[Thread]) -> list[Thread]:
    """Where every thread shared the leader's chain, CRIU's dump keeps the chain on the leader
    alone, flagged TSYNC, and leaves the others' mode disabled: installing it on the leader
    (oldest first) gives every thread without a chain of its own the leader's chain up to its
    newest TSYNC filter. That is what such a thread holds after the restore."""
    leader = threads[0]
    synced = [i for i, (_, flags) in enumerate(leader.seccomp_chain) if flags & SECCOMP_FILTER_FLAG_TSYNC]
    if leader.seccomp_mode != SECCOMP_FILTER or not synced:
        return threads
    chain = leader.seccomp_chain[:synced[-1] + 1]
    return [leader] + [dataclasses.replace(t, seccomp_mode=SECCOMP_FILTER, seccomp_chain=chain)
                       if t.seccomp_mode == SECCOMP_DISABLED else t for t in threads[1:]]


def _thread(pid: int, tid: int, core: Any, chains: list[tuple[bytes, int, int | None]], name: str) -> Thread:
    if not core.HasField("thread_core"):
        raise ImageError(f"{name}: no thread core (a very old image form: CRIU would restore the thread "
                         "with its own credentials)")
    tc = core.thread_core
    if not tc.HasField("creds"):
        raise ImageError(f"{name}: no credentials in the thread core (the old creds-<pid>.img form)")
    c = tc.creds
    mode = tc.seccomp_mode if tc.HasField("seccomp_mode") else SECCOMP_DISABLED
    chain: list[tuple[bytes, int]] = []
    if mode == SECCOMP_FILTER:
        index: int | None = tc.seccomp_filter if tc.HasField("seccomp_filter") else None
        if index is None:
            raise ImageError(f"{name}: seccomp mode filter without a filter")
        seen: set[int] = set()
        while index is not None:
            if index in seen or index >= len(chains):
                raise ImageError(f"{name}: seccomp filter chain {'loops' if index in seen else 'names no filter'} "
                                 f"at index {index}")
            seen.add(index)
            program, flags, index = chains[index]
            chain.append((program, flags))
    return Thread(pid=pid, tid=tid, uids=(c.uid, c.euid, c.suid, c.fsuid), gids=(c.gid, c.egid, c.sgid, c.fsgid),
                  groups=tuple(c.groups),
                  caps={"inh": _caps(c.cap_inh), "prm": _caps(c.cap_prm), "eff": _caps(c.cap_eff),
                        "bnd": _caps(c.cap_bnd), "amb": _caps(c.cap_amb)},
                  secbits=c.secbits, no_new_privs=bool(c.no_new_privs) if c.HasField("no_new_privs") else None,
                  seccomp_mode=mode, seccomp_chain=tuple(chain),
                  lsm_profile=c.lsm_profile, lsm_sockcreate=c.lsm_sockcreate,
                  apparmor_data=c.HasField("apparmor_data"),
                  sched_policy=tc.sched_policy if tc.HasField("sched_policy") else None,
                  sched_nice=tc.sched_nice if tc.HasField("sched_nice") else None)
