"""The node bundle (install/bundle.sh): built twice from this tree (versions N and N+1), installed
on a Debian 11 root (glibc 2.31, the oldest supported) with networking unshared. There
tests/bundle/smoke.sh checks `thaw doctor`, `criu check`, a capture -> restore through
thaw-runtime, an upgrade N -> N+1 over a running container and a snapshot, rollback, and
uninstall (with a version still in use, then --purge); tests/bundle/containerd_smoke.sh restores
through the root's own containerd. The root (mmdebstrap, ~30 s) is cached in
$THAW_BUILD_CACHE/roots; each bundle build takes ~1 min. Also: the bundle is reproducible."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess

import pytest

from conftest import prerequisite_missing

pytestmark = [pytest.mark.root, pytest.mark.runc, pytest.mark.criu]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.environ.get("THAW_BUILD_CACHE", "/var/cache/thaw")


def _mirror() -> str:
    for line in subprocess.run("grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources; grep -hs '^deb ' /etc/apt/sources.list",
                               shell=True, capture_output=True, text=True).stdout.split("\n"):
        url = line.split()[1] if len(line.split()) > 1 else ""
        if url.rstrip("/").endswith("/debian"):
            return url
    return "http://deb.debian.org/debian"


@pytest.fixture(scope="module")
def bullseye_root() -> str:
    if not shutil.which("mmdebstrap"):
        prerequisite_missing("mmdebstrap missing (install/node.sh --dev installs it)")
    # With Debian 11's own containerd (1.4): the restore through it (containerd_smoke.sh).
    path = os.path.join(CACHE, "roots", "bullseye-containerd.tar")
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        subprocess.run(["mmdebstrap", "--quiet", "--variant=minbase", "--include=busybox-static,containerd", "bullseye",
                        path + ".tmp.tar", _mirror()], check=True, timeout=900)   # format from the name
        os.rename(path + ".tmp.tar", path)
    return path


def _build(out: str, version: str | None) -> str:
    env = {**os.environ, "THAW_BUNDLE_WORK": out + ".work"}
    if version:
        env["THAW_BUNDLE_VERSION"] = version
    proc = subprocess.run(["bash", os.path.join(REPO, "install", "bundle.sh"), "build", out],
                          capture_output=True, text=True, env=env, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> tuple[str, str]:
    if not shutil.which("patchelf"):
        prerequisite_missing("patchelf missing (install/node.sh --dev installs it)")
    d = tmp_path_factory.mktemp("bundles")
    return _build(str(d / "n"), "0.0.0-n"), _build(str(d / "n1"), None)


def test_bundle_on_debian_11_without_network(bullseye_root, bundles, tmp_path):
    n, n1 = bundles
    proc = subprocess.run(["bash", os.path.join(REPO, "tests", "bundle", "in_root.sh"), bullseye_root,
                           str(tmp_path / "w"), n, n1], capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "[smoke] PASS" in out, out[-5000:]
    assert "Debian GNU/Linux 11" in out and "no network" in out
    for step in ("capture -> restore: ok", "the running container kept running", "restored the snapshot",
                 "rollback to 0.0.0-n: ok", "uninstall: commands gone"):
        assert step in out, (step, out[-3000:])


def test_restore_through_debian_11s_containerd(bullseye_root, bundles, tmp_path):
    """Debian 11's containerd 1.4 and its runc shim, with thaw-runtime (the C front) as the runtime
    binary: a container it started is captured and restored into one it creates."""
    _, n1 = bundles
    proc = subprocess.run(["bash", os.path.join(REPO, "tests", "bundle", "in_root.sh"), bullseye_root,
                           str(tmp_path / "w"), n1], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "SMOKE_SCRIPT": "containerd_smoke.sh"})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "[containerd-smoke] PASS: capture -> restore through containerd 1.4" in out, \
        out[-5000:]


def test_bundle_is_reproducible(bundles, tmp_path):
    """Building again gives the same bytes (the version N+1 build is repeated)."""
    _, n1 = bundles
    again = _build(str(tmp_path / "again"), None)
    digest = [hashlib.sha256(open(p, "rb").read()).hexdigest() for p in (n1, again)]
    assert digest[0] == digest[1]
