"""Shared fixtures, and the one place where a test may give up for want of a prerequisite.

Tests marked root/runc/criu/containerd drive the real runc, CRIU and containerd: without them a test
is skipped with the reason, except under THAW_TEST_STRICT=1 (set by .ci/run and install/test.sh),
where every skip is a failure: CI must run everything for real. The exceptions are the machine's GPU:
tests marked `gpu` skip on a machine without one, and tests marked `no_gpu` (a node without an
NVIDIA driver) skip on one, unless THAW_TEST_GPU=1 says the machine must have a GPU (then a missing
one fails). A test that needs anything else calls `prerequisite_missing(reason)`.

Tests marked `example` test an example application (examples/), tests marked `plain_runc` run runc
or containerd without thaw (the reference thaw is compared with): the summary counts them apart
from thaw's own tests.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NoReturn

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from helpers import ShimContainer, unique

STRICT = os.environ.get("THAW_TEST_STRICT") == "1"
GPU_EXPECTED = os.environ.get("THAW_TEST_GPU") == "1"
# Tests that strict mode lets skip: GPU tests on a machine that is not declared to have one, and
# vLLM tests on a machine without bench/vllm/install.sh's virtualenv (_vllm_skip).
_ALLOWED_SKIPS: dict[str, str] = {}


def has_nvidia_driver() -> bool:
    return os.path.exists("/dev/nvidiactl")


def prerequisite_missing(reason: str) -> NoReturn:
    """Give up on the running test: a skip, or under THAW_TEST_STRICT=1 a failure."""
    if STRICT:
        pytest.fail(f"prerequisite missing under THAW_TEST_STRICT: {reason}", pytrace=False)
    pytest.skip(reason)


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


def _gpu_skip(item: pytest.Item) -> str | None:
    marks = {m.name for m in item.iter_markers()}
    if "gpu" in marks and not has_nvidia_driver():
        return "no NVIDIA GPU on this machine (/dev/nvidiactl missing)"
    if "no_gpu" in marks and has_nvidia_driver():
        return "checks a node without an NVIDIA driver; this machine has one"
    return None


def pytest_runtest_setup(item: pytest.Item) -> None:
    reason = _missing(item)
    if reason:
        prerequisite_missing(reason)
    reason = _gpu_skip(item)
    if reason:
        gpu_skip(item, reason)
    reason = _vllm_skip(item)
    if reason:
        _ALLOWED_SKIPS[item.nodeid] = reason
        pytest.skip(reason)


def _vllm_skip(item: pytest.Item) -> str | None:
    """Tests marked `vllm` need vLLM's CPU build in its own virtualenv, which only
    bench/vllm/install.sh makes (gigabytes from PyPI; never the node install, so never CI's
    install). Where it is not on the machine they skip, also under THAW_TEST_STRICT: the one skip
    strict mode allows besides the GPU's, and only for that reason (anything else they need, root,
    runc, CRIU, fails as for every test)."""
    if "vllm" not in {m.name for m in item.iter_markers()}:
        return None
    from vllm_container import venv_missing, venv_path
    return venv_missing(venv_path())


def gpu_skip(item: pytest.Item, reason: str) -> None:
    """A GPU test that cannot run on this machine: skipped, also under THAW_TEST_STRICT=1 unless
    THAW_TEST_GPU=1 declares that the machine has a GPU (then it fails)."""
    if STRICT and ("gpu" in {m.name for m in item.iter_markers()}) == GPU_EXPECTED:
        pytest.fail(f"under THAW_TEST_STRICT{' and THAW_TEST_GPU' if GPU_EXPECTED else ''}: {reason}",
                    pytrace=False)
    _ALLOWED_SKIPS[item.nodeid] = reason
    pytest.skip(reason)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """Under THAW_TEST_STRICT=1 a skip from anywhere else (pytest.skip, skipif, importorskip in a
    test or fixture) is a failure: nothing may quietly not run in CI."""
    outcome = yield
    report = outcome.get_result()
    if STRICT and report.skipped and item.nodeid not in _ALLOWED_SKIPS and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.longrepr = f"skipped under THAW_TEST_STRICT=1, which runs everything: {reason}"


def pytest_terminal_summary(terminalreporter) -> None:
    """How many of the tests that ran are thaw's, and how many test an example or plain runc."""
    kinds: dict[str, dict[str, int]] = {}
    for outcome in ("passed", "failed", "error"):
        for report in terminalreporter.stats.get(outcome, []):
            if getattr(report, "when", "call") != "call" and outcome == "passed":
                continue
            keywords = getattr(report, "keywords", {})
            kind = "example" if "example" in keywords else "plain runc" if "plain_runc" in keywords else "thaw"
            kinds.setdefault(kind, {}).setdefault(outcome, 0)
            kinds[kind][outcome] += 1
    if kinds:
        terminalreporter.write_line("tests by subject: " + "; ".join(
            f"{kind}: " + ", ".join(f"{n} {o}" for o, n in sorted(counts.items()))
            for kind, counts in sorted(kinds.items(), key=lambda kv: kv[0] != "thaw")))


@dataclass
class ThawEnv:
    """An isolated thaw installation for one test: own config, store, state and runc root."""
    dir: str
    config: str
    store: str
    state: str
    root: str

    @classmethod
    def in_dir(cls, d) -> ThawEnv:
        """One under directory `d`, its config written."""
        env = cls(dir=str(d), config=os.path.join(d, "config.yaml"), store=os.path.join(d, "store"),
                  state=os.path.join(d, "state"), root=os.path.join(d, "runc-root"))
        env.write_config()
        return env

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
def thaw_env(tmp_path, monkeypatch) -> Iterator[ThawEnv]:
    env = ThawEnv.in_dir(tmp_path)
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
