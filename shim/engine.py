"""Calls to the inference engine inside a container: quiesce/resume URLs and readiness probes.

The URLs name 127.0.0.1 *inside the container*: the request is made from a forked child that
has joined the container's network namespace (setns on /proc/PID/ns/net), so it works for pods
whose network is not reachable from the host's.
"""

from __future__ import annotations

import ctypes
import json
import os
import urllib.error
import urllib.request

from thaw.oci import ThawError

CLONE_NEWNET = 0x40000000


class EngineError(ThawError):
    pass


def _setns(path: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({path}): {os.strerror(err)}")
    finally:
        os.close(fd)


def _request(url: str, method: str, timeout: float) -> tuple[int, str]:
    req = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read(65536).decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(65536).decode(errors="replace")


def request_in_netns(pid: int | None, url: str, method: str = "POST", timeout: float = 60.0) -> tuple[int, str]:
    """Make an HTTP request from inside pid's network namespace (pid None: from here)."""
    if pid is None:
        return _request(url, method, timeout)
    r, w = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the forked child
        os.close(r)
        try:
            _setns(f"/proc/{pid}/ns/net")
            status, body = _request(url, method, timeout)
            answer: dict = {"status": status, "body": body}
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
        out: dict = json.loads(b"".join(chunks) or b"{}")
    except ValueError:
        out = {}
    if "error" in out or "status" not in out:
        raise EngineError(f"{method} {url} in netns of pid {pid}: {out.get('error', 'no answer')}")
    return int(out["status"]), str(out["body"])


def call(url: str, pid: int | None, timeout: float = 120.0) -> str:
    """POST to a quiesce/resume URL; a non-2xx answer is an error."""
    status, body = request_in_netns(pid, url, "POST", timeout)
    if not 200 <= status < 300:
        raise EngineError(f"POST {url} answered {status}: {body[:200]}")
    return body


def ready(probe: str, pid: int | None, rootfs: str | None = None, timeout: float = 5.0) -> bool:
    """One readiness probe: `http://...` (GET, 2xx is ready) or `file:/path` (exists inside the
    container's root file system)."""
    if probe.startswith("file:"):
        path = probe[len("file:"):]
        base = f"/proc/{pid}/root" if pid else (rootfs or "/")
        return os.path.exists(os.path.join(base, path.lstrip("/")))
    try:
        status, _ = request_in_netns(pid, probe, "GET", timeout)
    except EngineError:
        return False
    return 200 <= status < 300
