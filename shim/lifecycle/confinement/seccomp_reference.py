"""The seccomp filter a profile compiles to on this node: which filter that is is known only from a
container of the same profile here — recorded at capture (the oldest filter of the captured
init, read from the kernel by CRIU's dump), or learnt once from a probe container that runs
nothing — and kept in state_dir/seccomp/. Without it, no restore of a spec with a profile."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from typing import Any

from thaw.oci.digest import sha256_hex
from thaw.oci.files import atomic_write, make_private_dir

from ...drivers.criu_images import SECCOMP_FILTER, SECCOMP_FILTER_FLAG_TSYNC
from .kernel_check import oldest_filter

# --- the seccomp reference of a profile on this node --------------------------------------------------

def profile_key(seccomp: dict[str, Any], runtime: str) -> str:
    """What decides the BPF a profile compiles to here: the profile, the machine, the kernel
    (libseccomp probes its API level) and the runtime binary (its libseccomp)."""
    path = shutil.which(runtime) or runtime
    try:
        st = os.stat(path)
        who = f"{os.path.realpath(path)}:{st.st_size}:{st.st_mtime_ns}"
    except OSError:
        who = path
    u = os.uname()
    blob = json.dumps({"profile": seccomp, "arch": u.machine, "kernel": u.release, "runtime": who},
                      sort_keys=True, separators=(",", ":"))
    return sha256_hex(blob.encode())


def _reference_path(state_dir: str, key: str) -> str:
    return os.path.join(state_dir, "seccomp", key + ".json")


def reference(state_dir: str, key: str) -> tuple[bytes, int] | None:
    try:
        with open(_reference_path(state_dir, key)) as f:
            obj = json.load(f)
        return bytes.fromhex(obj["filter"]), int(obj["flags"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def record_reference(state_dir: str, key: str, program: bytes, flags: int, source: str) -> None:
    """Remember the filter a container of this profile got from the runtime on this node."""
    make_private_dir(os.path.join(state_dir, "seccomp"))
    atomic_write(_reference_path(state_dir, key), json.dumps(
        {"filter": program.hex(), "flags": flags, "source": source, "recorded": time.time()}).encode())


def record_from_capture(state_dir: str, image_dir: str, spec: dict[str, Any], runtime: str, source: str) -> None:
    """At capture: the captured init's oldest filter is the one the runtime installed for the
    spec's profile before any of the container's code ran (a process can only add filters),
    read from the kernel by CRIU's dump into images nothing else has touched yet."""
    seccomp = (spec.get("linux") or {}).get("seccomp")
    if not seccomp:
        return
    from ...drivers import criu_decode  # noqa: PLC0415 - at capture only: protobuf stays off a restore
    images = criu_decode.read(image_dir)
    init = images.tasks[0].threads[0]
    if init.seccomp_mode == SECCOMP_FILTER and init.seccomp_chain:
        program, flags = init.seccomp_chain[0]
        # TSYNC is CRIU's way of restoring a chain all threads share (criu_images._synced), not a
        # property of the filter.
        record_reference(state_dir, profile_key(seccomp, runtime), program, flags & ~SECCOMP_FILTER_FLAG_TSYNC,
                         source)


def probe_reference(state_dir: str, seccomp: dict[str, Any], runtime: str) -> tuple[bytes, int] | None:
    """The filter this node's runtime installs for `seccomp`, learnt from a container that runs
    nothing: `runtime create` of an empty rootfs under a runc root of its own, without
    no-new-privs (then runc installs the filter before it waits to be started; with it, only
    after), its init's filter read with ptrace (PTRACE_SECCOMP_GET_FILTER), the container deleted.
    The BPF does not depend on no-new-privs, the user or the capabilities. Recorded like one from
    a capture; None if it cannot be learnt (the restore then cold-starts)."""
    key = profile_key(seccomp, runtime)
    work = tempfile.mkdtemp(prefix="probe-", dir=make_private_dir(os.path.join(state_dir, "seccomp")))
    root, cid = os.path.join(work, "runc"), f"thaw-seccomp-probe-{os.getpid()}-{key[:12]}"
    argv = [runtime, "--root", root]
    try:
        os.makedirs(os.path.join(work, "rootfs", "proc"))          # runc's init needs a /proc
        fd = os.open(os.path.join(work, "rootfs", "probe"), os.O_CREAT | os.O_WRONLY, 0o755)
        os.close(fd)
        spec = {"ociVersion": "1.0.2",
                "process": {"args": ["/probe"], "cwd": "/", "user": {"uid": 0, "gid": 0}, "env": [],
                            "noNewPrivileges": False},
                "root": {"path": "rootfs", "readonly": True},
                "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"}],
                "linux": {"namespaces": [{"type": t} for t in ("pid", "mount", "ipc", "uts", "network")],
                          "seccomp": seccomp}}
        with open(os.path.join(work, "config.json"), "w") as f:
            json.dump(spec, f)
        pid_file = os.path.join(work, "pid")
        proc = subprocess.run([*argv, "create", "--bundle", work, "--pid-file", pid_file, cid],
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              timeout=30)
        if proc.returncode != 0:
            return None
        with open(pid_file) as f:
            pid = int(f.read())
        found = oldest_filter(pid)
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return None
    finally:
        subprocess.run([*argv, "delete", "--force", cid], stdin=subprocess.DEVNULL, capture_output=True, timeout=30)
        shutil.rmtree(work, ignore_errors=True)
    if found is None:
        return None
    program, flags = found
    record_reference(state_dir, key, program, flags & ~SECCOMP_FILTER_FLAG_TSYNC, "probe container")
    return program, flags & ~SECCOMP_FILTER_FLAG_TSYNC


