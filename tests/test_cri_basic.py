"""containerd + CRI end to end, driven the way kubelet drives it.

A private containerd (tests/cri/containerd.py) runs pods with the `runc` handler and with the
`thaw` handler (BinaryName = thaw-runtime); each pod runs a ticking container and a busybox nc
server that the test reaches through the pod IP on the CNI bridge. Then the pod is torn down in
kubelet's order and nothing may be left: no shim, no mount, no runc state, no bundle.
"""

from __future__ import annotations

import importlib
import ipaddress
import os
import re
import time
from pathlib import Path

import pytest

# tests/ is on sys.path as a rootdir-less directory ("cri" package) unless tests/ is a package.
_PKG = "tests.cri" if __name__.startswith("tests.") else "cri"
if os.environ.get("THAW_TEST_STRICT") != "1":   # strict: a missing module is an error
    pytest.importorskip("grpc", reason="needs grpcio (pip install grpcio grpcio-tools protobuf)")
    pytest.importorskip("grpc_tools", reason="needs grpcio-tools to compile tests/cri/api.proto")
pytest_plugins = [f"{_PKG}.fixtures"]
_client = importlib.import_module(f"{_PKG}.client")
_images = importlib.import_module(f"{_PKG}.images")

# Not root: skipped by tests/conftest.py (marker) and by the `containerd` fixture, which also skips
# with the reason when containerd/ctr/runc/CNI plugins/busybox are missing (fails under
# THAW_TEST_STRICT=1 instead).
pytestmark = [pytest.mark.containerd, pytest.mark.root]

BUSYBOX = _images.BUSYBOX_IMAGE
TICKER = ["sh", "-c", "i=0; while true; do echo tick $i; i=$((i+1)); sleep 0.2; done"]
SERVER = ["nc", "-ll", "-p", "8080", "-e", "echo", "pong"]
# CRI log line: RFC3339Nano timestamp, stream, tag (F full / P partial), message
CRI_LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d) (stdout|stderr) [FP] (.*)$")


from conftest import prerequisite_missing  # noqa: E402
from helpers import wait_for as _wait_for  # noqa: E402


def _tick_lines(path: Path) -> list[str]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    return [line for line in text.splitlines() if " tick " in line]


def _pod_roundtrip(containerd, cri, handler: str) -> dict:
    t = {}
    t0 = time.monotonic()
    pod = cri.run_pod(f"basic-{handler}", "default", annotations={"thaw.dev/test": "basic"},
                      runtime_handler=handler)
    t["run_pod"] = time.monotonic() - t0
    pod_cfg = cri.pod_configs[pod]

    st = cri.pod_status(pod).status
    assert st.state == _client.SANDBOX_READY
    assert st.runtime_handler == handler
    ip = cri.pod_ip(pod)
    assert ipaddress.ip_address(ip) in containerd.subnet, ip
    assert ipaddress.ip_address(ip) in ipaddress.ip_network("10.233.0.0/16")
    netns = next(n.get("path") for n in cri.pod_info(pod)["runtimeSpec"]["linux"]["namespaces"]
             if n["type"] == "network")
    assert netns and netns.startswith(str(containerd.state)), netns

    t0 = time.monotonic()
    ticker = cri.create_container(pod, pod_cfg, "ticker", BUSYBOX, TICKER,
                                  annotations={"thaw.dev/test": "ticker"}, log_path="ticker/0.log")
    t["create"] = time.monotonic() - t0
    t0 = time.monotonic()
    cri.start_container(ticker)
    t["start"] = time.monotonic() - t0
    server = cri.run_container(pod, "server", BUSYBOX, SERVER)

    for cid in (ticker, server):
        s = cri.wait_container_state(cid, _client.CONTAINER_RUNNING, timeout=10)
        assert s.started_at > 0
    s = cri.container_status(ticker)
    log_file = Path(pod_cfg.log_directory) / "ticker" / "0.log"
    assert s.log_path == str(log_file)
    assert s.image.image.endswith("thaw-test/busybox:1") or s.image_ref.startswith("sha256:")
    assert cri.container_info(ticker)["pid"] > 0

    # CRI log file: containerd writes "<time> stdout F tick N" lines
    lines = _wait_for(lambda: len(_tick_lines(log_file)) >= 3 and _tick_lines(log_file), 10,
                      f"3 tick lines in {log_file}")
    for n, line in enumerate(lines[:3]):
        m = CRI_LOG_LINE.match(line)
        assert m, line
        assert m.group(3) == "stdout" and m.group(4) == f"tick {n}", line

    # the nc server inside the pod, reached from the host through the bridge
    t0 = time.monotonic()
    with containerd.wait_tcp(ip, 8080, timeout=10) as s:
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(100)
            if not chunk:
                break
            data += chunk
    assert data == b"pong\n"
    t["tcp"] = time.monotonic() - t0
    # ExecSync (kubelet probes) works too
    r = cri.exec_sync(ticker, ["cat", "/etc/hostname"])
    assert r.exit_code == 0 and r.stdout.decode().strip() == f"basic-{handler}"

    # the pod has one shim, and all containers are in the shim's runc root
    shims = containerd.shim_pids(pod)
    assert len(shims) == 1, shims
    ids = {c["id"] for c in containerd.runc_list()}
    assert {pod, ticker, server} <= ids

    # kubelet teardown: stop containers, remove them, stop and remove the sandbox
    t0 = time.monotonic()
    for cid in (ticker, server):
        cri.stop_container(cid, grace=0)
        st = cri.container_status(cid)
        assert st.state == _client.CONTAINER_EXITED
        assert st.exit_code == 137, (st.exit_code, st.reason)   # SIGKILL (sh as pid 1 ignores TERM)
        cri.remove_container(cid)
    cri.stop_pod(pod)
    cri.remove_pod(pod)
    t["teardown"] = time.monotonic() - t0

    assert not cri.list_containers(pod_id=pod)
    assert pod not in {p.id for p in cri.list_pods()}
    _wait_for(lambda: not containerd.shim_pids(pod), 10, f"shim of pod {pod[:12]} to exit")
    ids = {c["id"] for c in containerd.runc_list()}
    assert not ({pod, ticker, server} & ids), ids
    left = [m for m in containerd.mounts()
            if any(x in m for x in (pod, ticker, server)) or m == netns]
    assert not left, left
    for cid in (pod, ticker, server):
        assert not containerd.bundle_dir(cid).exists()
    return t


@pytest.mark.plain_runc
def test_pod_runc(containerd, cri):
    t = _pod_roundtrip(containerd, cri, "runc")
    print("timings runc:", {k: round(v, 3) for k, v in t.items()})


def test_pod_thaw(containerd, cri):
    if not containerd.thaw_is_real:
        prerequisite_missing("thaw-runtime not installed (the thaw handler would run plain runc)")
    t = _pod_roundtrip(containerd, cri, "thaw")
    print("timings thaw:", {k: round(v, 3) for k, v in t.items()})


@pytest.mark.plain_runc          # containerd and runc alone: what thaw relies on, not thaw
@pytest.mark.parametrize("handler", ["runc", "record"])
def test_handler_annotations_and_argv(containerd, cri, handler):
    """thaw.dev/* annotations reach config.json only through a handler that allows them, and the
    shim runs the handler's BinaryName with runc's command line (what thaw-runtime must parse)."""
    pod = cri.run_pod(f"ann-{handler}", annotations={"thaw.dev/snapshot": "demo:1", "other/x": "y"},
                      runtime_handler=handler)
    cid = cri.run_container(pod, "app", BUSYBOX, ["sleep", "3600"],
                            annotations={"thaw.dev/required": "true", "other/c": "z"})
    cri.wait_container_state(cid, _client.CONTAINER_RUNNING, timeout=10)

    sandbox_ann = containerd.bundle_config(pod)["annotations"]
    ann = containerd.bundle_config(cid)["annotations"]
    assert sandbox_ann["io.kubernetes.cri.container-type"] == "sandbox"
    assert ann["io.kubernetes.cri.container-type"] == "container"
    assert ann["io.kubernetes.cri.container-name"] == "app"
    assert ann["io.kubernetes.cri.sandbox-id"] == pod
    assert ann["io.kubernetes.cri.sandbox-namespace"] == "default"
    assert ann["io.kubernetes.cri.image-name"] == BUSYBOX
    assert "other/x" not in ann and "other/c" not in ann
    if handler == "runc":
        assert not [k for k in ann if k.startswith("thaw.dev/")]
        assert not [k for k in sandbox_ann if k.startswith("thaw.dev/")]
    else:
        # pod annotations land in both the sandbox and the app container; container ones only there
        assert sandbox_ann["thaw.dev/snapshot"] == "demo:1"
        assert "thaw.dev/required" not in sandbox_ann
        assert ann["thaw.dev/snapshot"] == "demo:1"
        assert ann["thaw.dev/required"] == "true"
        argv = containerd.record_lines()
        bundle = str(containerd.bundle_dir(cid))
        creates = [a for a in argv if f" create --bundle {bundle} " in f" {a} "]
        assert creates, argv
        assert creates[0].startswith(f"--root {containerd.runc_root} --log {bundle}/log.json "
                                     "--log-format json create"), creates[0]
        assert creates[0].endswith(f" {cid}")
        assert any(a.endswith(f"start {cid}") for a in argv), argv

    cri.remove_pod_fully(pod)
    _wait_for(lambda: not containerd.shim_pids(pod), 10, "shim exit")


def test_no_leftovers_after_tests(containerd, cri):
    """After the pod tests nothing of theirs is left in containerd, runc or the mount table."""
    assert not cri.list_pods()
    assert not containerd.shim_pids()
    assert not containerd.runc_list()
    assert not containerd.mounts()
