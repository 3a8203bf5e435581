"""After CRIU restored the tasks and left them stopped, before any of them runs user code: every
thread of the restored tree as the kernel has it (/proc status, and its oldest seccomp filter read
with ptrace) against the grant and against the images; then resume() lets them run."""

from __future__ import annotations

import ctypes
import os
import signal
from dataclasses import dataclass
from typing import Any

from ...drivers import criu_images
from ...drivers.criu_images import CAP_SETS, SECCOMP_FILTER, Images
from .grant import ConfinementError, Excess, Grant, creds_excess, describe, filter_mismatch, id_list

# --- the kernel -------------------------------------------------------------------------------------------

def read_text(path: str) -> str:
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
                todo += [int(c) for c in read_text(f"/proc/{pid}/task/{tid}/children").split()]
            except OSError:
                pass
    return out


_STATUS_KEYS = ("State", "NStgid", "NSpid", "Uid", "Gid", "Groups", "CapInh", "CapPrm", "CapEff", "CapBnd",
                "CapAmb", "NoNewPrivs", "Seccomp", "Seccomp_filters")


def status_fields(text: str) -> dict[str, str]:
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
                st = status_fields(read_text(f"/proc/{pid}/task/{tid_text}/status"))
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
            out += creds_excess(vpid, vtid, _ints(st, "Uid"), _ints(st, "Gid"), _ints(st, "Groups"), caps, nnp, grant)
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
        out.append(Excess(root_pid, root_pid, "threads", f"{id_list(missing)} missing from the restored tree",
                          "every thread of the images"))
    return out, RestoredTree(tasks)


def _kernel_filter_excess(tid: int, count: int, grant: Grant, stopped: bool) -> tuple[str, str] | None:
    """(kernel, spec) unless the stopped thread's oldest filter, read from the kernel, is the
    profile's: the images' bytes are what CRIU was asked to install, this is what it installed."""
    ref = grant.seccomp_reference
    if ref is None:
        return f"{count} filter(s), not provable", "linux.seccomp's filter, of which this node holds no record"
    found = oldest_filter(tid, count, stopped)
    if found is None:
        return f"{count} filter(s), unreadable with ptrace", "linux.seccomp's filter"
    program, flags = found
    return filter_mismatch(program, flags, ref)


def _ints(status: dict[str, str], key: str) -> tuple[int, ...]:
    return tuple(int(x) for x in status.get(key, "").split())


def _last(nspid: str | None, default: int) -> int:
    fields = (nspid or "").split()
    return int(fields[-1]) if fields else default


def check_kernel(root_pid: int, images: Images, grant: Grant) -> RestoredTree:
    excess, restored = kernel_excess(root_pid, images, grant)
    if excess:
        raise ConfinementError(describe("the restored tasks (kernel)", excess))
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


def oldest_filter(pid: int, count: int | None = None, stopped: bool = False) -> tuple[bytes, int] | None:
    """The oldest seccomp filter of a thread (`pid`: any thread id) and its flags, read with
    ptrace while it is held in a ptrace stop (the chain cannot change meanwhile). `count`: the
    thread's Seccomp_filters, if the caller read its status already. `stopped`: the thread is in
    a group stop (as CRIU leaves a restore): seizing it already moves it into a ptrace stop (the
    kernel waits for that in PTRACE_SEIZE), so no interrupt and wait; it returns to the group
    stop on detach."""
    if count is None:
        count = int(status_fields(read_text(f"/proc/{pid}/status")).get("Seccomp_filters", "0"))
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
