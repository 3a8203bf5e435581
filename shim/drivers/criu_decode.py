"""CRIU's image files decoded with the classes protoc generates from the .proto files of the CRIU
thaw builds (thaw.shim.drivers.criu_proto, made by install/node.sh) into criu_images.Images: the
facts of an image directory. Done once when a snapshot enters the store (shim/node/store/images.py
keeps the facts beside the seal, covered by it), so that a restore reads compact JSON and never
imports protobuf (~14 ms); again only for a store entry without facts.

Image file layout (criu/image.c): u32 IMG_COMMON_MAGIC (IMG_SERVICE_MAGIC for a few service
files; nothing for inventory.img), u32 the kind's magic, then repeated (u32 little-endian length,
protobuf message). Raw kinds (pages, tmpfs archives) have no header. A message with a field the
schema does not know, or an image in a form thaw does not read (the old per-task creds-<pid>.img
and per-task seccomp fields) is refused rather than guessed at.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import re
import struct
from dataclasses import dataclass
from typing import Any

from .criu_images import (
    ARCH_NAMES,
    CORE,
    CORE_MAGIC,
    INVENTORY,
    INVENTORY_MAGIC,
    IPC_OBJECTS,
    IPCNS_VAR,
    IPCNS_VAR_MAGIC,
    MOUNTPOINTS,
    MOUNTPOINTS_MAGIC,
    NETNS,
    NETNS_MAGIC,
    PSTREE,
    PSTREE_MAGIC,
    SECCOMP,
    SECCOMP_DISABLED,
    SECCOMP_FILTER,
    SECCOMP_FILTER_FLAG_TSYNC,
    SECCOMP_MAGIC,
    UTSNS,
    UTSNS_MAGIC,
    DecoderMissing,
    ImageError,
    ImageMount,
    Images,
    Task,
    Thread,
    check_magics,
    header,
)


def schemas() -> Any:
    """The generated modules (imported on first use: ~14 ms with protobuf; at publish, not restore)."""
    global _pb
    if _pb is None:
        try:
            mod = {name: importlib.import_module(f"{__package__}.criu_proto.{name}_pb2")
                   for name in ("core", "pstree", "seccomp", "inventory", "mnt", "utsns", "ipc_var", "netdev")}
            decode_error = importlib.import_module("google.protobuf.message").DecodeError
        except ImportError as exc:
            raise DecoderMissing(f"CRIU's image schemas are not installed (install/node.sh generates them): "
                             f"{exc}") from exc
        _pb = _Schemas(mod["core"].core_entry, mod["pstree"].pstree_entry, mod["seccomp"].seccomp_entry,
                       mod["inventory"].inventory_entry, mod["mnt"].mnt_entry, mod["utsns"].utsns_entry,
                       mod["ipc_var"].ipc_var_entry, mod["netdev"].netns_entry, decode_error)
    return _pb


@dataclass(frozen=True)
class _Schemas:
    core: Any
    pstree: Any
    seccomp: Any
    inventory: Any
    mount: Any
    uts: Any
    ipc_var: Any
    netns: Any
    decode_error: type[Exception]


_pb: _Schemas | None = None


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
        except schemas().decode_error as exc:
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


def _caps(words: Any) -> int:
    mask = 0
    for i, w in enumerate(words):
        mask |= int(w) << (32 * i)
    return mask


# Decoded by read(), magic included (netns-ct-*/netns-exp-* are not: their magic is checked).
_DECODED = re.compile("|".join(f"(?:{p})" for p in (INVENTORY, PSTREE, SECCOMP, CORE, MOUNTPOINTS, UTSNS, IPCNS_VAR,
                                                      NETNS)))


def read(image_dir: str) -> Images:
    """Every task and thread the images would restore, with what each would hold, and the
    namespace contents CRIU would write (whatever namespaces a spec has: criu_images.check()
    compares the kinds of file with the spec). Raises ImageError on anything unreadable."""
    names = sorted(os.listdir(image_dir))
    check_magics(image_dir, names, _DECODED)
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
            arch = arch or ARCH_NAMES.get(core.mtype, "unknown")
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
    ipc_vars = None
    netns: dict[str, str | None] = {}
    ipc_objects: dict[str, int] = {}
    for name in names:
        if name.startswith("mountpoints-"):
            for m in read_file(path(image_dir, name), MOUNTPOINTS_MAGIC, pb.mount, False):
                mounts.append(ImageMount(name, m.mountpoint, m.fstype, m.fsname, m.source, m.root, m.flags, m.sb_flags,
                                    m.ext_key if m.HasField("ext_key") else None))
        elif _UTSNS.fullmatch(name):
            [u] = read_file(path(image_dir, name), UTSNS_MAGIC, pb.uts, True)
            uts = (u.nodename, u.domainname)
        elif _IPCNS_VAR.fullmatch(name):
            [v] = read_file(path(image_dir, name), IPCNS_VAR_MAGIC, pb.ipc_var, True)
            ipc_vars = {f.name: value if isinstance(value, int) else list(value) for f, value in v.ListFields()}
        elif _NETNS.fullmatch(name):
            fields = [f.name for e in read_file(path(image_dir, name), NETNS_MAGIC, pb.netns, False)
                      for f, _ in e.ListFields()]
            netns[name] = None if set(fields) <= {"ext_key"} and fields else ", ".join(fields)
        elif _IPC_OBJECTS.fullmatch(name):
            ipc_objects[name] = os.stat(path(image_dir, name)).st_size
    return Images(tuple(tasks), tuple(names), arch, tuple(mounts), uts, ipc_vars, netns, ipc_objects)


_IPC_OBJECTS = re.compile(IPC_OBJECTS)
_UTSNS, _IPCNS_VAR, _NETNS = re.compile(UTSNS), re.compile(IPCNS_VAR), re.compile(NETNS)


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


def with_uts(image_dir: str, out_dir: str, nodename: str, domainname: str) -> str:
    """A copy of `image_dir` for one restore (`out_dir`, made here on the same file system: a hard
    link to each file; CRIU opens some images from inside the restored mount namespace, where a
    symbolic link's target does not resolve) whose UTS namespace image holds these names
    instead: for a UTS namespace the spec joins by path, into which CRIU writes the images'
    names after joining it."""
    os.mkdir(out_dir, 0o700)
    for name in os.listdir(image_dir):
        if _UTSNS.fullmatch(name):
            entry = schemas().uts(nodename=nodename, domainname=domainname)
            fd = os.open(os.path.join(out_dir, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o400)
            with os.fdopen(fd, "wb") as f:
                f.write(encode([entry], UTSNS_MAGIC, name))
        else:
            os.link(os.path.join(image_dir, name), os.path.join(out_dir, name))
    return out_dir
