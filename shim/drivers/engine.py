"""Calls to the inference engine inside a container: quiesce/resume steps (a preset such as vLLM's
sleep/wake, custom steps, or one URL; oci/annotations.py parses them) and readiness probes.

The URLs name 127.0.0.1 *inside the container*: the request is made from a forked child that
has joined the container's network namespace, so it works for pods whose network is not
reachable from the host's. A `ContainerView` opens the container's network namespace and root
once, from a pid it has just checked (with its start time); later calls go through those
descriptors, never through /proc/PID again: a pid that was reused after the container ended
cannot turn a probe into a request from the host's network or a look at the host's files.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import socket
import struct
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any

from thaw.oci import ThawError
from thaw.oci.annotations import Step

from ..timing import Stopwatch
from .procs import ProcessHandle

CLONE_NEWNET = 0x40000000
_SYS_OPENAT2 = 437                 # the same number on every architecture (generic syscall table)
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_IN_ROOT = 0x10


class EngineError(ThawError):
    pass


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def open_in_root(root_fd: int, path: str, flags: int = os.O_PATH) -> int:
    """A descriptor (default O_PATH) of `path` resolved inside root_fd as if it were `/` (openat2
    RESOLVE_IN_ROOT: absolute symlinks and `..` stay inside; no /proc magic links)."""
    how = _OpenHow(flags | os.O_CLOEXEC, 0, _RESOLVE_IN_ROOT | _RESOLVE_NO_MAGICLINKS)
    libc = _libc()
    libc.syscall.restype = ctypes.c_long
    fd: int = libc.syscall(_SYS_OPENAT2, root_fd, path.encode(), ctypes.byref(how), ctypes.sizeof(how))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return fd


class ContainerView:
    """A running container's network namespace and root, held by descriptors."""

    def __init__(self, pid: int):
        self.handle = ProcessHandle.of(pid)
        try:
            self.netns_fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            self.root_fd = os.open(f"/proc/{pid}/root", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise EngineError(f"container process {pid} is gone: {exc.strerror}") from exc
        if not self.handle.alive():          # the pid named another process by the time we looked
            self.close()
            raise EngineError(f"container process {pid} is gone")

    def alive(self) -> bool:
        return self.handle.alive()

    def close(self) -> None:
        for fd in (getattr(self, "netns_fd", -1), getattr(self, "root_fd", -1)):
            if fd >= 0:
                os.close(fd)
        self.netns_fd = self.root_fd = -1

    def __enter__(self) -> ContainerView:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _in_netns(self, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """fn() run in a forked child that joined the container's network namespace; its dict
        (or {"error": ...}) comes back through a pipe."""
        r, w = os.pipe()
        child = os.fork()
        if child == 0:  # pragma: no cover - runs in the forked child
            os.close(r)
            try:
                if _libc().setns(self.netns_fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns: {os.strerror(err)}")
                answer = fn()
            except Exception as exc:  # noqa: BLE001 - everything goes back to the parent
                answer = {"error": f"{type(exc).__name__}: {exc}"}
            os.write(w, json.dumps(answer).encode())
            os._exit(0)
        os.close(w)
        chunks = []
        while chunk := os.read(r, 65536):
            chunks.append(chunk)
        os.close(r)
        os.waitpid(child, 0)
        try:
            out: dict[str, Any] = json.loads(b"".join(chunks) or b"{}")
        except ValueError:
            out = {}
        return out

    def request(self, url: str, method: str = "POST", timeout: float = 60.0,
                json_body: dict[str, Any] | None = None) -> tuple[int, str]:
        """An HTTP request made from inside the container's network namespace (a POST sends
        `json_body` as JSON, else nothing)."""

        def call() -> dict[str, Any]:
            status, body = _request(url, method, timeout, json_body)
            return {"status": status, "body": body}
        out = self._in_netns(call)
        if "error" in out or "status" not in out:
            raise EngineError(f"{method} {url} in the netns of pid {self.handle.pid}: {out.get('error', 'no answer')}")
        return int(out["status"]), str(out["body"])

    def loopback_up(self) -> None:
        """Bring `lo` up in the container's network namespace: runc does it for a namespace it
        creates for a new container, not for one it creates for a restore."""
        out = self._in_netns(_loopback_up)
        if "error" in out:
            raise EngineError(f"loopback in the netns of pid {self.handle.pid}: {out['error']}")

    def file_exists(self, path: str) -> bool:
        try:
            os.close(open_in_root(self.root_fd, path))
            return True
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.EXDEV):
                return False
            raise EngineError(f"cannot look for {path} in the container: {exc}") from exc

    def ready(self, probe: str, timeout: float = 5.0) -> bool:
        """One readiness probe: `http://...` (GET, 2xx is ready) or `file:/path` (exists inside
        the container's root file system)."""
        if probe.startswith("file:"):
            return self.file_exists(probe[len("file:"):])
        try:
            status, _ = self.request(probe, "GET", timeout)
        except EngineError:
            return False
        return 200 <= status < 300


_SIOCGIFFLAGS, _SIOCSIFFLAGS, _IFF_UP = 0x8913, 0x8914, 0x1


def _loopback_up() -> dict[str, Any]:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        ifreq = fcntl.ioctl(s.fileno(), _SIOCGIFFLAGS, struct.pack("16sH22x", b"lo", 0))
        flags = struct.unpack("16sH22x", ifreq)[1]
        if not flags & _IFF_UP:
            fcntl.ioctl(s.fileno(), _SIOCSIFFLAGS, struct.pack("16sH22x", b"lo", flags | _IFF_UP))
    return {}


def _request(url: str, method: str, timeout: float, json_body: dict[str, Any] | None = None) -> tuple[int, str]:
    data = json.dumps(json_body).encode() if json_body is not None else b"" if method == "POST" else None
    req = urllib.request.Request(url, method=method, data=data,
                                 headers={"Content-Type": "application/json"} if json_body is not None else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read(65536).decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(65536).decode(errors="replace")


def run_steps(view: ContainerView, steps: Sequence[Step], what: str, budget: float | None = None,
              log: Callable[[str], None] = lambda msg: None) -> list[dict[str, Any]]:
    """Run engine steps (oci.annotations.Step) in order inside the container's network namespace;
    each within its own timeout and, all together, within `budget` seconds. A step that fails (a
    non-2xx answer, no answer, or a poll that never matches) stops the rest: EngineError naming it.
    Returns what each step took."""
    all_steps = Stopwatch()
    done: list[dict[str, Any]] = []
    for i, step in enumerate(steps):
        this_step = Stopwatch()
        limit = step.timeout if budget is None else min(step.timeout, budget - all_steps.seconds())
        if limit <= 0:
            raise EngineError(f"{what} step {i + 1} ({step!r}) not started: the {budget:g}s for all "
                              f"{what} steps are spent")
        deadline = time.monotonic() + limit
        status, body, tries = 0, "", 0
        while True:
            tries += 1
            try:
                status, body = view.request(step.url, step.method, max(0.1, deadline - time.monotonic()),
                                            json_body=step.body)
            except EngineError as exc:
                if not step.until:
                    raise EngineError(f"{what} step {i + 1} ({step!r}): {exc}") from exc
                status, body = 0, str(exc)
            if step.matches(status, body):
                break
            if not step.until or (not 200 <= status < 300 and status not in (0, 503) \
                    and status != step.until.get("status", 200)):
                raise EngineError(f"{what} step {i + 1} ({step!r}) answered {status}: {body[:200]}")
            if time.monotonic() + step.interval > deadline:
                raise EngineError(f"{what} step {i + 1} ({step!r}) did not match within {limit:.1f}s "
                                  f"(last answer {status}: {body[:200]})")
            time.sleep(step.interval)
        done.append({"step": repr(step), "seconds": round(this_step.seconds(), 4), "tries": tries})
        log(f"{what} step {i + 1}: {step!r} ({this_step.seconds():.2f}s)")
    return done


def steps(steps: Sequence[Step], pid: int, what: str, budget: float | None = None) -> list[dict[str, Any]]:
    """run_steps in the container of `pid`."""
    with ContainerView(pid) as view:
        return run_steps(view, steps, what, budget)


def call(url: str, pid: int, timeout: float = 120.0) -> str:
    """POST to a quiesce/resume URL inside the container of `pid`; a non-2xx answer is an error."""
    with ContainerView(pid) as view:
        status, body = view.request(url, "POST", timeout)
    if not 200 <= status < 300:
        raise EngineError(f"POST {url} answered {status}: {body[:200]}")
    return body


def ready(probe: str, pid: int, timeout: float = 5.0) -> bool:
    """One readiness probe of the container of `pid` (a container that is gone is not ready)."""
    try:
        with ContainerView(pid) as view:
            return view.ready(probe, timeout)
    except EngineError:
        return False
