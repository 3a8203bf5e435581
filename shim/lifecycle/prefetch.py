"""Getting a snapshot ready before its container asks for it: the pod's sandbox (pause container)
is created before CNI, the image pull and the container's own create, and carries the pod's
annotations. thaw-runtime hands that sandbox's create to runc at once and starts `thaw-hook
prepare NAMESPACE REF` beside it: a process of its own session, stdio on /dev/null, idle I/O
priority, that reads the snapshot's CRIU files into the page cache (so that CRIU's page fill reads
memory, not disk), then the weight files of a snapshot whose weights are outside it where their
host location is known (a volume's source). `thaw warm` does the same for an operator.

Bounded: one reader at a time per snapshot, however many pods ask (a lock; the others leave); one
sequential stream through a fixed 8 MiB buffer that skips what the page cache already holds (on a
warm node, copying it again would take memory bandwidth from the restore beside it); it stops
when the node's available memory would fall under a floor (page cache must not push out what the
node's processes use).

The same mechanism pulls on demand: a registry reference the node lacks is pulled first
(shim/lifecycle/distribution.py; node policy decides whether the pod's namespace may), once however many
pods ask, so that the next pod on the node restores.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import signal
from collections.abc import Callable
from typing import Any

from thaw.oci import snapshot as fmt
from thaw.oci.annotations import SnapshotRef
from thaw.oci.files import atomic_write, make_private_dir
from thaw.oci.reference import Reference

from .. import faults
from ..drivers import pagecache
from ..drivers.procs import ProcessHandle
from ..node import events
from ..node.config import Config
from ..node.store import Store, StoreError
from ..timing import Stopwatch
from . import distribution, weights

CHUNK = 8 << 20
CHECK_EVERY = 256 << 20           # cancel and the memory floor are checked between such steps
_IOPRIO_SET = {"x86_64": 251, "aarch64": 30}
_IOPRIO_CLASS_IDLE = 3


PREPARE_DIR = "prepare"   # state_dir/prepare/<container id>.json: the prepare started for it


class Cancel:
    """Why and whether a prepare must stop: set from a signal handler (no lock taken there)."""

    def __init__(self) -> None:
        self.reason = ""
        self._set = False

    def set(self, reason: str) -> None:
        self.reason, self._set = reason, True

    def is_set(self) -> bool:
        return self._set


def prepare_record(state_dir: str, container_id: str) -> str:
    return os.path.join(state_dir, PREPARE_DIR, container_id + ".json")


def register_prepare(cfg: Config, container_id: str, pid: int) -> None:
    """Record process `pid` as the prepare started for `container_id` (a pod's sandbox), so that
    the container's delete through thaw-runtime (cancel_prepare) stops it. Written by the
    runtime that spawned it, before its create returns: no delete can come before the record."""
    make_private_dir(os.path.join(cfg.state_dir, PREPARE_DIR))
    atomic_write(prepare_record(cfg.state_dir, container_id), json.dumps(ProcessHandle.of(pid).to_json()).encode(),
                 durable=False)


def unregister_prepare(cfg: Config, container_id: str) -> None:
    """A prepare that ends removes its record (only if it names this process)."""
    path = prepare_record(cfg.state_dir, container_id)
    try:
        with open(path) as f:
            if json.load(f).get("pid") == os.getpid():
                os.unlink(path)
    except (OSError, ValueError, AttributeError):
        pass


def cancel_prepare(cfg: Config, container_id: str) -> bool:
    """The container a prepare was started for is being deleted: SIGTERM that prepare (checked
    by pid and start time, never a process that reused its pid), which then cancels its pull and
    removes what it wrote. Whether one was signalled."""
    path = prepare_record(cfg.state_dir, container_id)
    try:
        with open(path) as f:
            handle = ProcessHandle.from_json(json.load(f))
        os.unlink(path)
    except (OSError, ValueError):
        return False
    return handle is not None and handle.signal(signal.SIGTERM)


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def floor_bytes() -> int:
    """Keep at least this much memory available: 1 GiB or a tenth of the node, the larger."""
    with open("/proc/meminfo") as f:
        total = int(f.readline().split()[1]) * 1024
    return max(1 << 30, total // 10)


def idle_io() -> None:
    """This process's I/O only when the disk is otherwise idle; and a low CPU priority."""
    nr = _IOPRIO_SET.get(os.uname().machine)
    if nr is not None:
        ctypes.CDLL(None, use_errno=True).syscall(nr, 1, 0, _IOPRIO_CLASS_IDLE << 13)   # IOPRIO_WHO_PROCESS, self
    os.nice(10)


def warm(cfg: Config, ref: SnapshotRef, namespace: str,
         progress: Callable[[int, int], None] | None = None, pull: bool = False, idle: bool = False,
         cancel: Cancel | None = None) -> dict[str, Any]:
    """Read snapshot `ref` of `namespace` (or of a namespace the policy lets publish to it) into
    the page cache. pull: first pull a registry reference the store lacks, for that namespace.
    idle: read at idle I/O priority (the pull, if any, runs at normal priority). cancel: an
    object whose is_set() stops the pull and the reading (prepare's sandbox was deleted).
    Returns what happened (also in the events log)."""
    locks = make_private_dir(os.path.join(cfg.state_dir, "prefetch"))
    lock = os.open(os.path.join(locks, f"{namespace}_{ref.key()}.lock"),
                   os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return _report(cfg, ref, namespace, "busy", "another prefetch of it is under way")
        store = Store.for_config(cfg)
        try:
            snap = store.resolve(ref, namespace, cfg.policy.readable_from(namespace))
        except StoreError as exc:
            if not (pull and ref.remote is not None):
                return _report(cfg, ref, namespace, "absent", str(exc))
            pulled = _pull(cfg, store, ref, ref.remote, namespace, cancel)
            if pulled is None:
                return {"outcome": "pull_failed", "bytes": 0, "seconds": 0.0}
            snap = pulled
        faults.point("prefetch")
        if idle:
            idle_io()
        with store.image_dir(snap) as path:
            names = sorted(os.listdir(path))
            total = sum(os.path.getsize(os.path.join(path, n)) for n in names)
            done, clock = 0, Stopwatch()
            floor = floor_bytes()
            buf = bytearray(CHUNK)
            found = 0                      # bytes already in the page cache: not copied again
            for name in names:
                fd = os.open(os.path.join(path, name), os.O_RDONLY | os.O_CLOEXEC)
                try:
                    size = os.fstat(fd).st_size
                    for off in range(0, size, CHECK_EVERY):
                        n_read, n_found = pagecache.fill(fd, off, min(CHECK_EVERY, size - off), buf)
                        done, found = done + n_read + n_found, found + n_found
                        if cancel is not None and cancel.is_set():
                            return _report(cfg, ref, namespace, "stopped", "cancelled: "
                                           f"{getattr(cancel, 'reason', '')}", done, clock.seconds())
                        if mem_available() < floor:
                            return _report(cfg, ref, namespace, "stopped",
                                           f"node memory is short: read {done >> 20} of {total >> 20} MiB",
                                           done, clock.seconds())
                        if progress:
                            progress(done, total)
                finally:
                    os.close(fd)
            if progress:
                progress(done, total)
            msg = f"{(done - found) >> 20} MiB read" + (f", {found >> 20} MiB already cached" if found else "")
            if snap.config.weights.outside:
                # Weight files whose host location is known before any container exists (a
                # volume's source): into the page cache, and their digests into the cache.
                got = weights.warm_sources(snap.config.weights, weights.DigestCache(cfg.state_dir),
                                           lambda: mem_available() >= floor)
                done += got
                msg += f" (weights {got >> 20} MiB)"
            return _report(cfg, ref, namespace, "warm", msg, done, clock.seconds())
    finally:
        os.close(lock)


def _pull(cfg: Config, store: Store, ref: SnapshotRef, remote: Reference, namespace: str,
          cancel: Cancel | None = None) -> fmt.Snapshot | None:
    """The pull on demand; its outcome is a `pull` event (distribution.pull writes them). Never
    raises: this runs in the background, where a traceback would reach no one."""
    try:
        return distribution.pull(cfg, store, remote, ref, for_namespace=namespace, cancel=cancel)
    except distribution.DistributionError:
        return None                             # the event says why
    except Exception as exc:  # noqa: BLE001 - reported, never a traceback to /dev/null
        events.emit(cfg, "pull", f"pull of {ref} for {namespace} failed: {type(exc).__name__}: {exc}", None,
                    "error", snapshot=str(ref), namespace=namespace, outcome="failed", reason=str(exc))
        return None


def _report(cfg: Config, ref: SnapshotRef, namespace: str, outcome: str, msg: str,
            done: int = 0, seconds: float = 0.0) -> dict[str, Any]:
    events.emit(cfg, "prefetch", f"prefetch of {ref} ({namespace}): {outcome}: {msg}", None,
                "info" if outcome in ("warm", "busy") else "warning", snapshot=str(ref),
                namespace=namespace, outcome=outcome, bytes=done, seconds=round(seconds, 3))
    return {"outcome": outcome, "bytes": done, "seconds": round(seconds, 3)}
