"""The containerd builds the containerd tests run against: the versions platform teams run.

  node     the node's own containerd (Debian 12: 1.6, the apt package) on PATH
  trixie   Debian 13's package (1.7)
  sid      Debian sid's package: whatever 2.x sid carries (config version 3)

`install/node.sh --dev` fetches the trixie and sid packages with `apt-get download` through a
private apt configuration and unpacks them (`dpkg -x`, never installed) under
$THAW_BUILD_CACHE/containerd/<suite>/ (default /var/cache/thaw/containerd). Each build brings its
own containerd, ctr and containerd-shim-runc-v2; all use the node's runc and CNI plugins.
No network here: a build that is not there is reported missing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

CACHE = Path(os.environ.get("THAW_BUILD_CACHE", "/var/cache/thaw")) / "containerd"
SUITES = ("trixie", "sid")
BINARIES = ("containerd", "ctr", "containerd-shim-runc-v2")


class Build:
    """One containerd package: `bin_dir` holds containerd, ctr and containerd-shim-runc-v2."""

    def __init__(self, source: str, bin_dir: str | None):
        self.source, self.bin_dir = source, bin_dir
        self.version_text = ""
        self.version: tuple[int, int, int] | None = None
        if bin_dir and os.access(self.bin("containerd"), os.X_OK):
            from thaw.shim.containerd.discovery import parse_version
            self.version_text = subprocess.run([self.bin("containerd"), "--version"], capture_output=True,
                                               text=True, timeout=30).stdout.strip()
            self.version = parse_version(self.version_text)

    def bin(self, name: str) -> str:
        return os.path.join(self.bin_dir or "", name)

    @property
    def major(self) -> int:
        return self.version[0] if self.version else 0

    @property
    def id(self) -> str:
        """containerd-1.6, containerd-1.7, containerd-2.1; containerd-<suite> when missing."""
        return f"containerd-{self.version[0]}.{self.version[1]}" if self.version else f"containerd-{self.source}"

    def missing(self) -> str | None:
        """Why this build cannot run, or None."""
        if self.version is None:
            where = "containerd on PATH" if self.source == "node" else f"{CACHE}/{self.source}"
            return f"no containerd build from {self.source} ({where}): install/node.sh --dev fetches it"
        for b in BINARIES:
            if not os.access(self.bin(b), os.X_OK):
                return f"{self.bin(b)} missing"
        return None

    def __repr__(self) -> str:
        return f"Build({self.id}, {self.bin_dir})"


def builds() -> list[Build]:
    """The node's containerd first, then trixie's and sid's from the cache."""
    node = shutil.which("containerd")
    return [Build("node", os.path.dirname(node) if node else None),
            *(Build(s, str(CACHE / s / "usr" / "bin")) for s in SUITES)]
