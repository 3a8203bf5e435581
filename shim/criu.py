"""CRIU itself: version and `criu check` (what the fingerprint and `thaw doctor` need).
Checkpoint and restore go through runc (shim/runc.py), which runs CRIU in RPC mode."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess


def version(criu: str, cache_dir: str | None = None) -> str | None:
    """CRIU's version string (e.g. "4.1.1"), or None if it cannot be run.

    Every restore needs it for the fingerprint, and running `criu --version` costs 40-120 ms;
    with `cache_dir` the answer is kept there, keyed by the binary's path, size and mtime."""
    path = shutil.which(criu) or criu
    cache = key = None
    if cache_dir:
        try:
            st = os.stat(path)
            key = f"{os.path.realpath(path)}:{st.st_size}:{st.st_mtime_ns}"
            cache = os.path.join(cache_dir, "criu-version.json")
            with open(cache) as f:
                cached = json.load(f)
            if cached.get("key") == key:
                return cached.get("version")
        except (OSError, ValueError):
            pass
    try:
        out = subprocess.run([path, "--version"], capture_output=True, timeout=10).stdout.decode()
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"^Version:\s*(\S+)", out, re.M)
    found = m.group(1) if m else None
    if cache and key and found:
        try:
            tmp = f"{cache}.{os.getpid()}"
            with open(tmp, "w") as f:
                json.dump({"key": key, "version": found}, f)
            os.replace(tmp, cache)
        except OSError:
            pass
    return found


def check(criu: str) -> tuple[bool, str]:
    """Run `criu check`; (passed, its last output line)."""
    try:
        proc = subprocess.run([criu, "check"], capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, str(exc)
    text = (proc.stdout + proc.stderr).decode(errors="replace").strip().splitlines()
    return proc.returncode == 0, (text[-1] if text else f"exit {proc.returncode}")


def version_tuple(v: str | None) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v or "")[:3])
