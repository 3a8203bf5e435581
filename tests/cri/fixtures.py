"""pytest fixtures for the containerd/CRI tests.

Load with `pytest_plugins = ["cri.fixtures"]` (tests/ on sys.path, pytest's default "prepend"
import mode when tests/ has no __init__.py) or `["tests.cri.fixtures"]` when tests/ is a package.

  containerd_build     (session, parametrized) each build of cri.builds: the node's containerd
                       (Debian 12: 1.6), trixie's (1.7), sid's (2.x); ids containerd-1.6 ...
                       Skips when the build or another prerequisite (root, runc, CNI plugins,
                       busybox) is missing; fails instead under THAW_TEST_STRICT=1. pytest runs
                       all tests of one build before it starts the next.
  thaw_runtime_binary  (session) path for the `thaw` handler's BinaryName: $THAW_RUNTIME_BINARY,
                       else `thaw-runtime` on PATH, else None (containerd then uses runc for it).
                       Override this fixture to point the handler somewhere else.
  thaw_node            (session, per build) thaw's own config, store and state for the CRI tests.
  containerd_options   (session) {} : extra Containerd(...) keywords (env, extra_handlers, ...).
  containerd           (session, per build) a started cri.containerd.Containerd of that build.
                       Stopped and purged when its build's tests are done.
  cri                  (function) a CriClient on it; pods it created and the test left behind are
                       stopped and removed after the test.
"""

from __future__ import annotations

import os
import shutil

import pytest

from .builds import builds
from .containerd import Containerd, skip_reason


@pytest.fixture(scope="session", params=builds(), ids=lambda b: b.id)
def containerd_build(request):
    reason = skip_reason(request.param)
    if reason:
        if os.environ.get("THAW_TEST_STRICT") == "1":
            pytest.fail(f"prerequisite missing under THAW_TEST_STRICT: {reason}")
        pytest.skip(reason)
    return request.param


@pytest.fixture(scope="session")
def thaw_runtime_binary() -> str | None:
    return os.environ.get("THAW_RUNTIME_BINARY") or shutil.which("thaw-runtime")


@pytest.fixture(scope="session")
def thaw_node(containerd_build, tmp_path_factory) -> dict:
    """thaw's own config, store and state for the CRI tests (never the node's /etc/thaw): containerd
    passes THAW_CONFIG to the shims, so thaw-runtime, thaw-hook and capture watchers use it.
    One per build, so that one build's leftovers cannot fail another's tests."""
    d = tmp_path_factory.mktemp(f"thaw-node-{containerd_build.id}")
    node = {"config": str(d / "config.yaml"), "store": str(d / "store"), "state": str(d / "state")}
    with open(node["config"], "w") as f:
        f.write(f"store_dir: {node['store']}\nstate_dir: {node['state']}\n")
        if shutil.which("thaw-hook"):   # the hook of the installation under test, not the node's
            f.write(f"hook: {shutil.which('thaw-hook')}\n")
    return node


@pytest.fixture(scope="session")
def containerd_options(thaw_node) -> dict:
    """Extra keyword arguments for Containerd(...); override to add handlers or environment,
    e.g. {"env": {...}, "extra_handlers": {"thaw2": {...}}}."""
    return {"env": {"THAW_CONFIG": thaw_node["config"]}}


@pytest.fixture(scope="session")
def containerd(containerd_build, thaw_runtime_binary, containerd_options):
    cd = Containerd(containerd_build, thaw_binary=thaw_runtime_binary, **containerd_options)
    cd.start()
    try:
        yield cd
    finally:
        problems = cd.stop()
        if problems:
            print(f"containerd fixture cleanup problems: {problems}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, f"_cri_rep_{rep.when}", rep)


@pytest.fixture
def cri(containerd, request):
    client = containerd.client()
    try:
        yield client
    finally:
        rep = getattr(request.node, "_cri_rep_call", None)
        if rep is not None and rep.failed:
            print(containerd.log_tail(80))
        for pod_id in list(client.pod_configs):
            try:
                client.remove_pod_fully(pod_id)
            except Exception as e:  # noqa: BLE001
                print(f"cleanup of pod {pod_id[:12]} failed: {e}")
        client.close()
