"""The node's containerd: its binary, version, built-in defaults, main config, and whether it runs."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import tomllib
from typing import Any

from .merge import dig

DEFAULT_CONFIG = "/etc/containerd/config.toml"
DEFAULT_SOCKET = "/run/containerd/containerd.sock"
# Where containerd usually is, for callers whose PATH lacks the sbin directories.
SEARCH_PATH = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")

Version = tuple[int, int, int]


def find_containerd() -> str | None:
    path = os.pathsep.join([os.environ.get("PATH", ""), *SEARCH_PATH])
    return shutil.which("containerd", path=path)


def parse_version(text: str) -> Version | None:
    """The version in `containerd --version` output:
    `containerd github.com/containerd/containerd v1.7.13 64b8a81...`,
    `containerd github.com/containerd/containerd/v2 v2.1.0 ...`,
    `containerd github.com/containerd/containerd 1.6.20~ds1 1.6.20~ds1-1+deb12u3` (Debian),
    `containerd github.com/containerd/containerd/v2 2.1.9+unknown` (Debian sid)."""
    for word in text.split()[1:]:
        if "/" in word:
            continue
        m = re.match(r"^v?(\d+)\.(\d+)(?:\.(\d+))?", word)
        if m:
            return int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)
    return None


def containerd_version(binary: str) -> Version | None:
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return parse_version(out)


def default_config(binary: str | None) -> dict[str, Any]:
    """`containerd config default`, parsed; {} when it cannot be had."""
    if not binary:
        return {}
    try:
        out = subprocess.run([binary, "config", "default"], capture_output=True, text=True, timeout=30).stdout
        return tomllib.loads(out)
    except (OSError, subprocess.SubprocessError, tomllib.TOMLDecodeError):
        return {}


def _running_config_paths() -> list[str]:
    """--config of containerd processes started by init (systemd units), from /proc."""
    found: list[str] = []
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return found
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                proc_stat = f.read()
            if proc_stat[proc_stat.index("(") + 1:proc_stat.rindex(")")] != "containerd":
                continue
            if proc_stat.rsplit(")", 1)[1].split()[1] != "1":
                continue
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
        except (OSError, ValueError, IndexError):
            continue
        for i, a in enumerate(args):
            if a in ("--config", "-c") and i + 1 < len(args):
                found.append(args[i + 1])
            elif a.startswith("--config="):
                found.append(a.split("=", 1)[1])
    return found


def find_config() -> str:
    """containerd's main config: $CONTAINERD_CONFIG, else the --config of a running containerd
    service, else /etc/containerd/config.toml."""
    env = os.environ.get("CONTAINERD_CONFIG")
    if env:
        return env
    running = _running_config_paths()
    return running[0] if running else DEFAULT_CONFIG


def socket_path(cfg: dict[str, Any]) -> str:
    """The grpc socket of a merged config."""
    return (dig(cfg, "plugins", "io.containerd.server.v1.grpc", "address")
            or dig(cfg, "grpc", "address") or DEFAULT_SOCKET)


def is_running(cfg: dict[str, Any]) -> bool:
    try:
        return stat.S_ISSOCK(os.stat(socket_path(cfg)).st_mode)
    except OSError:
        return False
