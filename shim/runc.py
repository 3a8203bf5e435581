"""The one module that drives runc (or whatever `next_runtime` is) as a subprocess: restore,
checkpoint, state, delete. (Handing a call over by execv is the runtime entry point's job.)

Calls that thaw makes on its own behalf (restore, checkpoint) log to a private file in thaw's
work directory, not to containerd's log.json: containerd reports the last error line of that file,
and an error from an abandoned restore attempt must not be what it reports after a successful cold
start. The error text is carried into the exception instead.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass, field

from thaw.oci import ThawError, runc_args

_SYS_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class RuncError(ThawError):
    """A runc call failed; the message carries runc's and CRIU's own words."""


def _env() -> dict[str, str]:
    env = dict(os.environ)
    # CRIU needs iptables-restore for its network lock; a shim's PATH can be minimal.
    path = env.get("PATH", "")
    env["PATH"] = f"{path}:{_SYS_PATH}" if path else _SYS_PATH
    return env


def _last_errors(*paths: str, limit: int = 3) -> str:
    """The last error lines of runc JSON logs and CRIU logs, for error messages."""
    found: list[str] = []
    for path in paths:
        try:
            with open(path, errors="replace") as f:
                lines = f.readlines()[-400:]
        except OSError:
            continue
        for line in lines:
            line = line.strip()
            if line.startswith("{"):
                try:
                    obj = json.loads(line)
                except ValueError:
                    continue
                if obj.get("level") in ("error", "fatal"):
                    found.append(str(obj.get("msg", "")))
            elif "Error" in line and "rlimit" not in line:
                found.append(line)
    return " | ".join(found[-limit:])


@dataclass
class Runc:
    binary: str
    criu: str
    global_flags: dict[str, str | bool] = field(default_factory=dict)

    @classmethod
    def for_call(cls, binary: str, criu: str, call: runc_args.RuncCall) -> "Runc":
        """A driver with the caller's --root and cgroup manager (not its --log)."""
        keep = {k: v for k, v in call.global_flags.items() if k in ("root", "systemd-cgroup", "rootless")}
        return cls(binary, criu, keep)

    @classmethod
    def with_root(cls, binary: str, criu: str, root: str | None) -> "Runc":
        return cls(binary, criu, {"root": root} if root else {})

    def _argv(self, command: str, flags: dict[str, str | bool], args: list[str],
              log: str | None = None) -> list[str]:
        gflags = dict(self.global_flags)
        if log:
            gflags.update({"log": log, "log-format": "json"})
        if command in ("restore", "checkpoint"):
            gflags["criu"] = self.criu
        return [self.binary, *runc_args.render(gflags, command, flags, args)]

    def _run(self, argv: list[str], timeout: float | None = 60, capture: bool = True,
             inherit_stdio: bool = False) -> subprocess.CompletedProcess:
        kwargs: dict = {"env": _env(), "timeout": timeout}
        if not inherit_stdio:
            kwargs.update(stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE if capture else subprocess.DEVNULL,
                          stderr=subprocess.PIPE if capture else subprocess.DEVNULL)
        try:
            return subprocess.run(argv, **kwargs)
        except subprocess.TimeoutExpired as exc:
            raise RuncError(f"{' '.join(argv[:3])}... timed out after {timeout}s") from exc
        except OSError as exc:
            raise RuncError(f"cannot run {argv[0]}: {exc}") from exc

    # --- container lifecycle ----------------------------------------------------------------------
    def restore(self, container_id: str, bundle: str, image_path: str, work_path: str,
                pid_file: str, console_socket: str | None = None, no_pivot: bool = False,
                timeout: float = 600) -> None:
        """`runc restore --detach` with this process's stdio: runc maps the pipes recorded in the
        image's descriptors.json onto its own fds 0-2, i.e. the caller's (the shim's) pipes."""
        flags: dict[str, str | bool] = {"detach": True, "bundle": bundle, "image-path": image_path,
                                        "work-path": work_path, "pid-file": pid_file}
        if console_socket:
            flags["console-socket"] = console_socket
        if no_pivot:
            flags["no-pivot"] = True
        log = os.path.join(work_path, "runc.log")
        argv = self._argv("restore", flags, [container_id], log=log)
        proc = self._run(argv, timeout=timeout, inherit_stdio=True)
        if proc.returncode != 0:
            detail = _last_errors(log, os.path.join(work_path, "restore.log"))
            raise RuncError(f"runc restore exited {proc.returncode}: {detail or 'no error logged'}")

    def checkpoint(self, container_id: str, image_path: str, work_path: str,
                   leave_running: bool = True, timeout: float = 900) -> None:
        flags: dict[str, str | bool] = {"image-path": image_path, "work-path": work_path}
        if leave_running:
            flags["leave-running"] = True
        log = os.path.join(work_path, "runc.log")
        proc = self._run(self._argv("checkpoint", flags, [container_id], log=log), timeout=timeout)
        if proc.returncode != 0:
            detail = _last_errors(log, os.path.join(work_path, "dump.log"))
            stderr = proc.stderr.decode(errors="replace").strip()[-400:]
            raise RuncError(f"runc checkpoint exited {proc.returncode}: {detail or stderr or 'no error logged'}")

    def state(self, container_id: str) -> dict | None:
        """`runc state` as a dict, or None if the container does not exist."""
        proc = self._run(self._argv("state", {}, [container_id]))
        if proc.returncode != 0:
            return None
        try:
            return json.loads(proc.stdout)
        except ValueError as exc:
            raise RuncError(f"runc state {container_id}: unreadable output") from exc

    def delete_force(self, container_id: str) -> None:
        """Remove a container whatever its state; quiet if it does not exist."""
        self._run(self._argv("delete", {"force": True}, [container_id]), timeout=30)

    def version(self) -> str:
        proc = self._run([self.binary, "--version"], timeout=10)
        first = proc.stdout.decode(errors="replace").splitlines()
        return first[0].split()[-1] if first and proc.returncode == 0 else "unknown"
