"""CRIU itself: version and `criu check` (what the fingerprint and `thaw doctor` need).
Checkpoint and restore go through runc (shim/runc.py), which runs CRIU in RPC mode."""

from __future__ import annotations

import re
import subprocess


def version(criu: str) -> str | None:
    """CRIU's version string (e.g. "4.1.1"), or None if it cannot be run."""
    try:
        out = subprocess.run([criu, "--version"], capture_output=True, timeout=10).stdout.decode()
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"^Version:\s*(\S+)", out, re.M)
    return m.group(1) if m else None


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
