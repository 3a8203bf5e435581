"""Shared fixtures. Tests marked root/runc/criu drive the real runc and CRIU; they skip with a
reason when those are missing, except under THAW_TEST_STRICT=1 (set by .ci/run), where a missing
prerequisite is a failure: CI must run them for real."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from helpers import ShimContainer, unique  # noqa: E402

STRICT = os.environ.get("THAW_TEST_STRICT") == "1"


def _missing(item: pytest.Item) -> str | None:
    marks = {m.name for m in item.iter_markers()}
    if marks & {"root", "runc", "criu", "containerd"} and os.geteuid() != 0:
        return "needs root"
    if "runc" in marks and not shutil.which("runc"):
        return "needs runc on PATH"
    if "criu" in marks and not (os.access("/usr/local/sbin/criu", os.X_OK) or shutil.which("criu")):
        return "needs criu (install/node.sh builds it)"
    if marks & {"runc", "criu"} and not shutil.which("thaw-runtime"):
        return "needs thaw-runtime on PATH (install/node.sh --dev)"
    return None


def pytest_runtest_setup(item: pytest.Item) -> None:
    reason = _missing(item)
    if reason:
        if STRICT:
            pytest.fail(f"prerequisite missing under THAW_TEST_STRICT: {reason}")
        pytest.skip(reason)


@dataclass
class ThawEnv:
    """An isolated thaw installation for one test: own config, store, state and runc root."""
    dir: str
    config: str
    store: str
    state: str
    root: str

    def write_config(self, **extra) -> None:
        import yaml
        config = {"store_dir": self.store, "state_dir": self.state, **extra}
        if "hook" not in extra and shutil.which("thaw-hook"):
            # The hook of the installation under test (a private one has its own bin dir).
            config["hook"] = shutil.which("thaw-hook")
        with open(self.config, "w") as f:
            yaml.safe_dump(config, f)

    def thaw(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
        proc = subprocess.run(["thaw", *args], capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "THAW_CONFIG": self.config})
        if check and proc.returncode != 0:
            raise AssertionError(f"thaw {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc

    def container(self, bundle: str, cid: str | None = None, runtime: str = "thaw-runtime") -> ShimContainer:
        return ShimContainer(runtime, self.root, bundle, cid or unique("c"))

    def runc_ids(self) -> list[str]:
        proc = subprocess.run(["runc", "--root", self.root, "list", "-q"], capture_output=True, text=True)
        return proc.stdout.split()

    def state_entries(self) -> list[str]:
        d = os.path.join(self.state, "containers")
        return sorted(os.listdir(d)) if os.path.isdir(d) else []


@pytest.fixture
def thaw_env(tmp_path, monkeypatch) -> ThawEnv:
    env = ThawEnv(dir=str(tmp_path), config=str(tmp_path / "config.yaml"), store=str(tmp_path / "store"),
                  state=str(tmp_path / "state"), root=str(tmp_path / "runc-root"))
    env.write_config()
    monkeypatch.setenv("THAW_CONFIG", env.config)
    yield env
    # Leave nothing running: kill and delete whatever the test left under its runc root.
    for cid in env.runc_ids():
        subprocess.run(["runc", "--root", env.root, "kill", cid, "KILL"], capture_output=True)
        subprocess.run(["runc", "--root", env.root, "delete", "--force", cid], capture_output=True)


@pytest.fixture
def netns_pair():
    from helpers import netns, netns_delete
    names = [unique("thawns"), unique("thawns")]
    paths = [netns(n) for n in names]
    yield paths
    for n in names:
        netns_delete(n)
