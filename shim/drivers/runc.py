"""The one module that drives runc (or whatever `next_runtime` is) as a subprocess: restore,
checkpoint, state, delete. (Handing a call over by execv is the runtime entry point's job.)

Calls that thaw makes on its own behalf (restore, checkpoint) log to a private file in thaw's
work directory, not to containerd's log.json: containerd reports the last error line of that file,
and an error from an abandoned restore attempt must not be what it reports after a successful cold
start. The error text is carried into the exception instead.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from thaw.oci import ThawError, runc_args
from thaw.oci.spec import Bundle

from .mounts import MountTable

_SYS_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class RuncError(ThawError):
    """A runc call failed; the message carries runc's and CRIU's own words."""


def _env() -> dict[str, str]:
    env = dict(os.environ)
    # CRIU needs iptables-restore for its network lock; a shim's PATH can be minimal.
    path = env.get("PATH", "")
    env["PATH"] = f"{path}:{_SYS_PATH}" if path else _SYS_PATH
    return env


CRIU_CONFIG = "org.criu.config"

# The checkpoint guard (see Runc.resumed_if_we_die): argv[1] is runc's `state` command line.
_GUARD = """
import json, subprocess, sys
state = json.loads(sys.argv[1])
if sys.stdin.buffer.read() != b"done":
    out = subprocess.run(state, capture_output=True).stdout
    try:
        paused = json.loads(out).get("status") == "paused"
    except ValueError:
        paused = False
    if paused:
        subprocess.run(state[:-2] + ["resume", state[-1]], capture_output=True)
"""


def cgroup_dirs(spec: dict[str, Any], systemd: bool, mounts: MountTable | None = None) -> list[str]:
    """Where runc puts a container's cgroup, in every cgroup hierarchy mounted here (one on a
    unified v2 host, one per controller on v1): cgroupsPath under each hierarchy's root with the
    cgroupfs driver; with systemd's, "slice:prefix:name" is the unit prefix-name.scope in that slice
    (a slice "a-b-c.slice" nests as a.slice/a-b.slice/a-b-c.slice). Empty when the spec names none."""
    path = (spec.get("linux") or {}).get("cgroupsPath") or ""
    if not path:
        return []
    if systemd:
        parts = path.split(":")
        if len(parts) != 3:
            return []
        slice_, prefix, name = parts
        slice_ = slice_ or "system.slice"
        words = slice_.removesuffix(".slice").split("-")
        nested = [] if slice_ == "-.slice" else ["-".join(words[:i + 1]) + ".slice" for i in range(len(words))]
        rel = os.path.join(*nested, f"{prefix}-{name}.scope" if prefix else f"{name}.scope")
    else:
        rel = path.lstrip("/")
    return [os.path.join(h, rel) for h in (mounts or MountTable.read()).cgroup_mount_points()]


def pid_file_temp(pid_file: str) -> str:
    """runc writes --pid-file through ".NAME" beside it, opened O_EXCL: one left by a runc that
    died in between fails every later create or restore with that pid file."""
    return os.path.join(os.path.dirname(pid_file), "." + os.path.basename(pid_file))


# Runs runc in the cgroup named by $0 (a cgroup.procs file): the shell moves itself, then execs.
_IN_CGROUP = 'echo $$ > "$0" && exec "$@"'


def stdio_descriptors(image_path: str) -> list[str]:
    """What the checkpointed init's fds 0-2 were (runc's descriptors.json in the image): e.g.
    "pipe:[1234]", "/dev/null", "/dev/pts/0"."""
    try:
        with open(os.path.join(image_path, "descriptors.json")) as f:
            value = json.load(f)
    except (OSError, ValueError) as exc:
        raise RuncError(f"image has no readable descriptors.json: {exc}") from exc
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise RuncError("image's descriptors.json is not a list of strings")
    return value[:3]


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
    def for_call(cls, binary: str, criu: str, call: runc_args.RuncCall) -> Runc:
        """A driver with the caller's --root and cgroup manager (not its --log)."""
        keep = {k: v for k, v in call.global_flags.items() if k in ("root", "systemd-cgroup", "rootless")}
        return cls(binary, criu, keep)

    @classmethod
    def with_root(cls, binary: str, criu: str, root: str | None) -> Runc:
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
             stdio: tuple[Any, Any, Any] | None = None, pass_fds: tuple[int, ...] = (),
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
        kwargs: dict[str, Any] = {"env": {**_env(), **(env or {})}, "timeout": timeout, "pass_fds": pass_fds}
        if stdio is not None:
            kwargs.update(stdin=stdio[0], stdout=stdio[1], stderr=stdio[2])
        else:
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
    def restore(self, container_id: str, bundle: Bundle, image_path: str, work_path: str,
                pid_file: str, console_socket: str | None = None, no_pivot: bool = False,
                criu_options: tuple[str, ...] = (), timeout: float = 600, cgroup: str | None = None) -> None:
        """`runc restore --detach` into the caller's stdio (the shim's pipes), with thaw's own
        CRIU config file for this one restore; runc starts in `cgroup` (a directory) when given, so
        that CRIU and everything it forks can be found again (shim/node/cgroups.py).

        The restored processes get the caller's fds 0-2 from CRIU itself: the config file maps
        each stdio pipe the image recorded (descriptors.json) to a copy of the caller's fd, and
        CRIU takes those before the ones runc adds. runc's own stdio are /dev/null and a file, so
        nothing runc or CRIU prints on a failed restore reaches the container's stdout/stderr.
        The config file is named by the `org.criu.config` annotation, which replaces any the
        container's spec carries (a spec must never choose CRIU's options), and is removed again
        from config.json afterwards."""
        flags: dict[str, str | bool] = {"detach": True, "bundle": bundle.path, "image-path": image_path,
                                        "work-path": work_path, "pid-file": pid_file}
        if console_socket:
            flags["console-socket"] = console_socket
        if no_pivot:
            flags["no-pivot"] = True
        stdio = {i: key for i, key in enumerate(stdio_descriptors(image_path)) if key.startswith("pipe:")}
        # High numbers: below them runc's own files land in CRIU's child (fd 3 is its socket).
        conf = os.path.join(work_path, "criu.conf")
        log = os.path.join(work_path, "runc.log")
        previous = bundle.annotations.get(CRIU_CONFIG)
        fds = {i: fcntl.fcntl(i, fcntl.F_DUPFD, 100) for i in stdio}
        try:
            lines = [f"inherit-fd fd[{fds[i]}]:{key}" for i, key in stdio.items()] + list(criu_options)
            with open(conf, "w") as f:
                f.write("".join(line + "\n" for line in lines))
            bundle.spec.setdefault("annotations", {})[CRIU_CONFIG] = conf
            bundle.save()
            argv = self._argv("restore", flags, [container_id], log=log)
            if cgroup:
                argv = ["/bin/sh", "-c", _IN_CGROUP, os.path.join(cgroup, "cgroup.procs"), *argv]
            with open(os.path.join(work_path, "runc.stderr"), "wb") as err:
                proc = self._run(argv, timeout=timeout, stdio=(subprocess.DEVNULL, subprocess.DEVNULL, err),
                                 pass_fds=tuple(fds.values()))
        finally:
            for fd in fds.values():
                os.close(fd)
            # runc keeps the annotation in its own copy of the spec: a later `runc checkpoint` of
            # this container would hand CRIU this restore's options. CRIU ignores a missing file.
            if os.path.exists(conf):
                os.unlink(conf)
            annotations = bundle.spec.setdefault("annotations", {})
            if annotations.get(CRIU_CONFIG) == conf:
                if previous is None:
                    annotations.pop(CRIU_CONFIG, None)
                else:
                    annotations[CRIU_CONFIG] = previous
                bundle.save()
        if proc.returncode != 0:
            detail = _last_errors(log, os.path.join(work_path, "restore.log"), os.path.join(work_path, "runc.stderr"))
            raise RuncError(f"runc restore exited {proc.returncode}: {detail or 'no error logged'}")

    @contextlib.contextmanager
    def resumed_if_we_die(self, container_id: str) -> Iterator[None]:
        """While CRIU dumps a container it keeps it frozen; if this process (and CRIU with it) is
        killed meanwhile, the container would stay frozen for good. A small guard process of its
        own session waits on a pipe: if the pipe closes without "done", it resumes the container
        if runc says it is paused. No thaw code runs in it: only Python's standard library."""
        r, w = os.pipe()
        argv = [self.binary, *runc_args.render(self.global_flags, "state", {}, [container_id])]
        guard = subprocess.Popen([sys.executable, "-I", "-S", "-c", _GUARD, json.dumps(argv)],
                                 stdin=r, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                 start_new_session=True, close_fds=True, env=_env())
        os.close(r)
        try:
            yield
        finally:
            os.write(w, b"done")
            os.close(w)
            guard.wait()

    def checkpoint(self, container_id: str, image_path: str, work_path: str,
                   leave_running: bool = True, criu_options: tuple[str, ...] = (), timeout: float = 900) -> None:
        """`runc checkpoint`; criu_options: lines of a CRIU config file for this dump, handed to
        CRIU through CRIU_CONFIG_FILE in runc's environment (runc's own way, the org.criu.config
        annotation, is read from the container's create-time spec, which thaw does not rewrite)."""
        flags: dict[str, str | bool] = {"image-path": image_path, "work-path": work_path}
        if leave_running:
            flags["leave-running"] = True
        env = None
        if criu_options:
            conf = os.path.join(work_path, "criu-dump.conf")
            with open(conf, "w") as f:
                f.write("".join(line + "\n" for line in criu_options))
            env = {"CRIU_CONFIG_FILE": conf}
        log = os.path.join(work_path, "runc.log")
        proc = self._run(self._argv("checkpoint", flags, [container_id], log=log), timeout=timeout, env=env)
        if proc.returncode != 0:
            detail = _last_errors(log, os.path.join(work_path, "dump.log"))
            stderr = proc.stderr.decode(errors="replace").strip()[-400:]
            raise RuncError(f"runc checkpoint exited {proc.returncode}: {detail or stderr or 'no error logged'}")

    def state(self, container_id: str) -> dict[str, Any] | None:
        """`runc state` as a dict, or None if the container does not exist."""
        proc = self._run(self._argv("state", {}, [container_id]))
        if proc.returncode != 0:
            return None
        try:
            state: dict[str, Any] = json.loads(proc.stdout)
        except ValueError as exc:
            raise RuncError(f"runc state {container_id}: unreadable output") from exc
        return state

    def delete_force(self, container_id: str) -> None:
        """Remove a container whatever its state; quiet if it does not exist."""
        self._run(self._argv("delete", {"force": True}, [container_id]), timeout=30)

    def version(self) -> str:
        proc = self._run([self.binary, "--version"], timeout=10)
        first = proc.stdout.decode(errors="replace").splitlines()
        return first[0].split()[-1] if first and proc.returncode == 0 else "unknown"
