"""Before CRIU runs: what it would write into namespaces — the hostname and domain name (utsns),
the IPC sysctls (ipcns-var) and System V objects (ipcns-shm/msg/sem) — against the spec.

CRIU writes a namespace's contents wherever the images say the container had one of its own,
running as root, into the namespace the restored task is in by then: one runc has it create, or
one the spec joins by path (CRIU's join_ns: it setns()es first, then writes; criu/cr-restore.c,
criu/namespaces.c). So a namespace the spec creates gets only what a cold start of the spec
would have (the spec's values, else a fresh namespace's), and one it joins is written into only
where the write changes nothing (the joined namespace's current values, no objects).
"""

from __future__ import annotations

import json
import os
import subprocess
from typing import Any

from thaw.oci.files import atomic_write, make_private_dir

from ...drivers.criu_images import Images
from .grant import Excess

# ipc-var.proto's fields and the sysctl CRIU writes each to (criu/ipc_ns.c ipc_sysctl_req), as
# OCI's linux.sysctl names it.
IPC_SYSCTLS = {
    "sem_ctls": "kernel.sem", "msg_ctlmax": "kernel.msgmax", "msg_ctlmnb": "kernel.msgmnb",
    "auto_msgmni": "kernel.auto_msgmni", "msg_ctlmni": "kernel.msgmni", "shm_ctlmax": "kernel.shmmax",
    "shm_ctlall": "kernel.shmall", "shm_ctlmni": "kernel.shmmni", "shm_rmid_forced": "kernel.shm_rmid_forced",
    "mq_queues_max": "fs.mqueue.queues_max", "mq_msg_max": "fs.mqueue.msg_max",
    "mq_msgsize_max": "fs.mqueue.msgsize_max", "mq_msg_default": "fs.mqueue.msg_default",
    "mq_msgsize_default": "fs.mqueue.msgsize_default", "msg_next_id": "kernel.msg_next_id",
    "sem_next_id": "kernel.sem_next_id", "shm_next_id": "kernel.shm_next_id",
}
_PROC_SYS = "/proc/sys/"


def spec_namespaces(spec: dict[str, Any]) -> frozenset[str]:
    """The namespaces whose contents a restore may bring back: those the spec has, except a
    network namespace joined by path (a pod's, shared by its containers: CRIU must treat it as
    external). Contents written into an IPC or UTS namespace joined by path are compared with
    that namespace (joined_excess)."""
    return frozenset(n.get("type", "") for n in (spec.get("linux") or {}).get("namespaces") or []
                     if not (n.get("path") and n.get("type") == "network"))


def _joined(spec: dict[str, Any]) -> dict[str, str]:
    """Namespace type -> the path the spec joins it by."""
    return {str(n.get("type")): str(n["path"]) for n in (spec.get("linux") or {}).get("namespaces") or []
            if n.get("path")}


def _root_pid(images: Images) -> int:
    return images.tasks[0].pid if images.tasks else 0


def uts_excess(images: Images, spec: dict[str, Any]) -> list[Excess]:
    """The hostname and domain name CRIU would set in a UTS namespace the spec creates: those the
    spec sets (unset: CRIU's value stands, as a cold start would have the runtime's)."""
    if images.uts is None or "uts" not in spec_namespaces(spec) or "uts" in _joined(spec):
        return []
    pid = _root_pid(images)
    out = []
    for field, got, want in (("hostname", images.uts[0], spec.get("hostname")),
                             ("domainname", images.uts[1], spec.get("domainname"))):
        if want is not None and got != want:
            out.append(Excess(pid, pid, field, repr(got), repr(want)))
    return out


def sysctl_values(text: str) -> list[int]:
    """A sysctl's value as CRIU reads and writes it (kernel.sem: four numbers)."""
    return [int(x) for x in text.split()]


def _image_values(value: Any) -> list[int]:
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


def ipc_excess(images: Images, spec: dict[str, Any], fresh: dict[str, list[int]] | None) -> list[Excess]:
    """The IPC sysctls CRIU would write into an IPC namespace the spec creates: each the spec's
    value (linux.sysctl) or, where the spec sets none, a fresh IPC namespace's on this node
    (`fresh`, fresh_ipc_sysctls; None: not known, so not provable)."""
    if images.ipc_vars is None or "ipc" in _joined(spec):
        return []
    sysctl = {str(k).replace("/", "."): str(v) for k, v in ((spec.get("linux") or {}).get("sysctl") or {}).items()}
    pid = _root_pid(images)
    out = []
    for field, value in sorted(images.ipc_vars.items()):
        name = IPC_SYSCTLS.get(field, field)
        got = _image_values(value)
        if name in sysctl:
            want: list[int] | None = sysctl_values(sysctl[name])
            source = "linux.sysctl"
        else:
            want = (fresh or {}).get(name)
            source = "a fresh IPC namespace on this node" if fresh is not None else "not known on this node"
        if got != want:
            out.append(Excess(pid, pid, f"IPC sysctl {name}", " ".join(map(str, got)),
                              f"{' '.join(map(str, want)) if want is not None else 'unset'} ({source})"))
    return out


def joined_excess(images: Images, spec: dict[str, Any]) -> tuple[list[Excess], tuple[str, str] | None]:
    """What CRIU would write into a UTS or IPC namespace the spec joins by path (a pod's, shared
    with its other containers; or anyone's the spec names): only writes that change nothing. The
    IPC sysctls must be the joined namespace's own, read from it now, and there must be no System
    V objects (refused otherwise: the namespace is not the container's to change). The hostname
    and domain name: the second result, where the images' differ from the joined namespace's own
    — the names the restore hands CRIU instead (criu_decode.with_uts), so that its write changes
    nothing (a pod restored from another pod's snapshot keeps its own hostname)."""
    joined = _joined(spec)
    pid = _root_pid(images)
    out: list[Excess] = []
    names = None
    if "uts" in joined and images.uts is not None:
        live = _sysctls_in(["nsenter", f"--uts={joined['uts']}"], ["kernel/hostname", "kernel/domainname"])
        if live is None or "kernel/hostname" not in live or "kernel/domainname" not in live:
            out.append(Excess(pid, pid, f"hostname (UTS namespace joined by path {joined['uts']})",
                              repr(images.uts[0]), "the joined namespace's, unreadable: not provable"))
        elif (live["kernel/hostname"], live["kernel/domainname"]) != images.uts:
            names = (live["kernel/hostname"], live["kernel/domainname"])
    if "ipc" in joined:
        if any(size > _IMAGE_HEADER for size in images.ipc_objects.values()):
            objects = ", ".join(n for n, s in sorted(images.ipc_objects.items()) if s > _IMAGE_HEADER)
            out.append(Excess(pid, pid, f"System V IPC objects (IPC namespace joined by path {joined['ipc']})",
                              objects, "none: the joined namespace is not the container's own"))
        if images.ipc_vars is not None:
            sysctls = {f: IPC_SYSCTLS.get(f, f) for f in images.ipc_vars}
            live = _sysctls_in(["nsenter", f"--ipc={joined['ipc']}"], [n.replace(".", "/") for n in sysctls.values()])
            for field, value in sorted(images.ipc_vars.items()):
                key = sysctls[field].replace(".", "/")
                current = sysctl_values(live[key]) if live is not None and key in live else None
                values = _image_values(value)
                if values != current:
                    out.append(Excess(pid, pid, f"IPC sysctl {sysctls[field]} (IPC namespace joined by path "
                                                f"{joined['ipc']})", " ".join(map(str, values)),
                                      f"{' '.join(map(str, current))}: unchanged" if current is not None
                                      else "unreadable: not provable"))
    return out, names


_IMAGE_HEADER = 8          # the two magics: an ipcns-shm/msg/sem image of no object holds nothing more


def _sysctls_in(enter: list[str], keys: list[str]) -> dict[str, str] | None:
    """/proc/sys/<key> as a process started by `enter` (nsenter into a namespace, unshare a fresh
    one) reads it, or None."""
    try:
        proc = subprocess.run([*enter, "--", "grep", "-H", "", *(_PROC_SYS + k for k in keys)],
                              stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode not in (0, 2):          # 2: a sysctl this kernel lacks (read the others)
        return None
    return _grep_lines(proc.stdout)


def _grep_lines(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        path, sep, value = line.partition(":")
        if sep and path.startswith(_PROC_SYS):
            out[path[len(_PROC_SYS):]] = value.strip()
    return out


def fresh_ipc_sysctls(state_dir: str) -> dict[str, list[int]] | None:
    """The IPC sysctls of a fresh IPC namespace on this node (what a cold start's namespace has),
    learnt once per boot from `unshare --ipc` and kept in state_dir/ipc/<boot id>.json; None if
    they cannot be read."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        return None
    path = os.path.join(state_dir, "ipc", boot + ".json")
    try:
        with open(path) as f:
            return {str(k): [int(x) for x in v] for k, v in json.load(f).items()}
    except FileNotFoundError:
        pass
    except (OSError, ValueError, TypeError, AttributeError):
        return None
    live = _sysctls_in(["unshare", "--ipc"], [n.replace(".", "/") for n in IPC_SYSCTLS.values()])
    if live is None:
        return None
    try:
        values = {k.replace("/", "."): sysctl_values(v) for k, v in live.items()}
    except ValueError:
        return None
    make_private_dir(os.path.dirname(path))
    atomic_write(path, json.dumps(values).encode())
    return values
