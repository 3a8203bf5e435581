"""thaw through the real containerd, driven over CRI exactly as kubelet drives it: restore of a
captured snapshot, auto-capture (first pod cold, second restored), fallback on a missing or
corrupt snapshot, clean teardown; and the `ctr run --runc-binary` path."""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

_PKG = "tests.cri" if __name__.startswith("tests.") else "cri"
if os.environ.get("THAW_TEST_STRICT") != "1":
    pytest.importorskip("grpc", reason="needs grpcio")
    pytest.importorskip("grpc_tools", reason="needs grpcio-tools")
pytest_plugins = [f"{_PKG}.fixtures", "registry_fixture.fixtures"]
_client = importlib.import_module(f"{_PKG}.client")
_images = importlib.import_module(f"{_PKG}.images")

pytestmark = [pytest.mark.containerd, pytest.mark.root, pytest.mark.criu]

from helpers import wait_for  # noqa: E402

BUSYBOX = _images.BUSYBOX_IMAGE
# Counts (tick on stdout, tock on stderr), publishes the count over HTTP; ready (GET /ready -> 200) after 10 ticks.
# /www/count is replaced by rename: httpd never serves it half-written (empty).
APP = ["sh", "-c", "mkdir -p /www; i=0; while true; do echo tick $i; echo tock $i >&2; echo $i > /www/n; mv /www/n /www/count; "
       "[ $i = 10 ] && echo ok > /www/ready; i=$((i+1)); sleep 0.1; done & exec httpd -f -p 8080 -h /www"]


def ticks_in_log(cri, pod_id, name="app") -> list[int]:
    path = Path(cri.pod_configs[pod_id].log_directory) / name / "0.log"
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    return [int(m) for m in re.findall(r" stdout [FP] tick (\d+)$", text, re.M)]


def http_get(ip: str, path: str) -> str:
    import urllib.request
    with urllib.request.urlopen(f"http://{ip}:8080{path}", timeout=5) as r:
        return r.read().decode()


def thaw(node, *args, check=True):
    p = subprocess.run(["thaw", *args], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "THAW_CONFIG": node["config"]})
    if check and p.returncode != 0:
        raise AssertionError(f"thaw {args}: {p.stdout}\n{p.stderr}")
    return p


def records(node) -> dict:
    d = Path(node["state"]) / "containers"
    return {p.stem: json.loads(p.read_text()) for p in d.glob("*.json")} if d.is_dir() else {}


def start_app(cri, name, annotations=None, namespace="team-a"):
    pod = cri.run_pod(name, namespace, annotations=annotations or {}, runtime_handler="thaw")
    cid = cri.create_container(pod, cri.pod_configs[pod], "app", BUSYBOX, APP, log_path="app/0.log")
    cri.start_container(cid)
    cri.wait_container_state(cid, _client.CONTAINER_RUNNING, timeout=30)
    return pod, cid


def teardown_clean(containerd, cri, node, pod):
    cids = [c.id for c in cri.list_containers(pod_id=pod)]
    cri.remove_pod_fully(pod)
    wait_for(lambda: not containerd.shim_pids(pod), 15, "shim exit")
    assert not ({pod, *cids} & {c["id"] for c in containerd.runc_list()})
    assert not [m for m in containerd.mounts() if any(x in m for x in (pod, *cids))]
    wait_for(lambda: not (set(cids) & set(records(node))), 10, "thaw state cleared")


@pytest.fixture
def thaw_cri(containerd, cri, thaw_node):
    if not containerd.thaw_is_real:
        pytest.fail("the thaw handler must run thaw-runtime for these tests")
    yield containerd, cri, thaw_node
    for snap in json.loads(thaw(thaw_node, "ls", "--json").stdout):
        thaw(thaw_node, "rm", snap["ref"], "-n", snap["namespace"], check=False)


def test_restore_through_cri(thaw_cri):
    containerd, cri, node = thaw_cri
    pod1, cid1 = start_app(cri, "source")
    wait_for(lambda: len(ticks_in_log(cri, pod1)) > 15, 30, "source ticks")
    before = max(ticks_in_log(cri, pod1))             # logged before the capture began
    thaw(node, "capture", cid1, "--name", "cri-app:1", "--root", str(containerd.runc_root))
    info = json.loads(thaw(node, "inspect", "cri-app:1", "-n", "team-a").stdout)
    assert info["namespace"] == info["config"]["namespace"] == "team-a"
    assert info["config"]["fingerprint"]["container"]["image"] == BUSYBOX
    log1 = Path(cri.pod_configs[pod1].log_directory) / "app" / "0.log"
    teardown_clean(containerd, cri, node, pod1)
    after = max(int(t) for t in re.findall(r" stdout [FP] tick (\d+)$", log1.read_text(), re.M))   # all it logged

    pod2, cid2 = start_app(cri, "restored", {"thaw.dev/snapshot": "cri-app:1"})
    rec = records(node)[cid2]
    assert rec["phase"] == "running" and rec["snapshot"] == "cri-app:1", rec
    got = wait_for(lambda: len(ticks_in_log(cri, pod2)) > 5 and ticks_in_log(cri, pod2), 30, "restored ticks")
    assert before < got[0] <= after + 1, (before, after, got[:5])   # continued from the capture, not from 0
    assert got == list(range(got[0], got[0] + len(got)))
    # Each stream of the restored processes reaches the shim's own fifo, as for a runc container.
    log2 = (Path(cri.pod_configs[pod2].log_directory) / "app" / "0.log").read_text()
    tocks = [int(t) for t in re.findall(r" stderr [FP] tock (\d+)$", log2, re.M)]
    assert tocks and before <= tocks[0] <= after + 1, (before, after, tocks[:5])
    assert not re.search(r" stdout [FP] tock| stderr [FP] tick", log2), log2[:2000]
    ip = cri.pod_ip(pod2)
    n1 = int(wait_for(lambda: http_get(ip, "/count"), 10, "server on the new pod IP"))
    assert n1 >= got[0]
    wait_for(lambda: int(http_get(ip, "/count")) > n1, 10, "the restored count to go on")
    st = cri.container_status(cid2)
    assert st.state == _client.CONTAINER_RUNNING
    # The pod's UTS namespace is joined by path: CRIU was handed the pod's own hostname, not the
    # source pod's (issue 16)
    assert cri.exec_sync(cid2, ["cat", "/proc/sys/kernel/hostname"]).stdout.decode().strip() == "restored"
    teardown_clean(containerd, cri, node, pod2)
    assert not records(node)
    ends = [json.loads(line) for line in open(Path(node["state"]) / "events.log")]
    assert any(e["kind"] == "finished" and e["container"] == cid2 and e["restored"] for e in ends)


def test_auto_capture_first_cold_second_restored(thaw_cri):
    containerd, cri, node = thaw_cri
    ann = {"thaw.dev/snapshot": "cri-auto:1", "thaw.dev/capture": "on-ready",
           "thaw.dev/ready": "http://127.0.0.1:8080/ready"}
    pod1, cid1 = start_app(cri, "first", ann)
    assert records(node)[cid1]["phase"] == "cold"
    wait_for(lambda: "cri-auto:1" in thaw(node, "ls").stdout, 60, "auto-capture of the first pod")
    assert records(node)[cid1].get("captured") == "cri-auto:1"
    assert cri.container_status(cid1).state == _client.CONTAINER_RUNNING   # left running

    # A replica of the same template: containerd gives it another HOSTNAME (its pod's name), which
    # the node config lets differ (env_may_differ), so it restores.
    pod2, cid2 = start_app(cri, "second", ann)
    assert records(node)[cid2]["phase"] == "running", (records(node)[cid2], thaw(node, "events").stdout[-3000:])
    env1, env2 = (json.loads(containerd.bundle_dir(c).joinpath("config.json").read_text())["process"]["env"]
                  for c in (cid1, cid2))
    assert "HOSTNAME=first" in env1 and "HOSTNAME=second" in env2
    got = wait_for(lambda: ticks_in_log(cri, pod2), 30, "second pod's ticks")
    assert got[0] >= 10                                    # restored from the ready state
    assert int(http_get(cri.pod_ip(pod2), "/count")) >= 10
    assert http_get(cri.pod_ip(pod2), "/ready").strip() == "ok"
    teardown_clean(containerd, cri, node, pod1)
    teardown_clean(containerd, cri, node, pod2)


def test_snapshots_belong_to_the_namespace_that_captured_them(thaw_cri):
    """team-b's pod auto-captures NAME first; team-a's pods neither restore it nor are kept from
    capturing their own; team-a's next pod restores team-a's."""
    containerd, cri, node = thaw_cri
    ann = {"thaw.dev/snapshot": "cri-ns:1", "thaw.dev/capture": "on-ready",
           "thaw.dev/ready": "http://127.0.0.1:8080/ready"}

    def published(ns):
        return {(s["namespace"], s["ref"]): s["digest"] for s in json.loads(thaw(node, "ls", "--json").stdout)}.get((ns, "cri-ns:1"))

    def events_tail() -> str:
        path = Path(node["state"]) / "events.log"
        return path.read_text()[-3000:] if path.exists() else ""
    pod_b, _cid_b = start_app(cri, "b-first", ann, namespace="team-b")
    digest_b = wait_for(lambda: published("team-b"), 120, "team-b's capture")
    pod_a, cid_a = start_app(cri, "a-first", ann, namespace="team-a")
    rec = records(node)[cid_a]
    assert rec["phase"] == "cold" and "not found in namespace team-a" in rec["cold_reason"]
    try:
        digest_a = wait_for(lambda: published("team-a"), 120, "team-a's own capture")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; events: {events_tail()}") from None
    assert digest_a != digest_b
    pod_a2, cid_a2 = start_app(cri, "a-second", ann, namespace="team-a")
    assert records(node)[cid_a2]["phase"] == "running" and records(node)[cid_a2]["manifest"] == digest_a
    events = [json.loads(line) for line in open(Path(node["state"]) / "events.log")]
    assert not [e for e in events if e["kind"] == "auto_capture" and e["outcome"] == "exists"]
    for pod in (pod_b, pod_a, pod_a2):
        teardown_clean(containerd, cri, node, pod)


@pytest.mark.registry
def test_a_registry_snapshot_the_node_lacks_is_pulled_for_the_next_pod(thaw_cri, tls_registry):
    """A pod asks for a registry reference this node does not have: the pull starts from its
    sandbox's create; the pod cold-starts unless that pull finished before its container's create
    (a small snapshot can win the race); the next pod restores."""
    import uuid
    containerd, cri, node = thaw_cri
    config = Path(node["config"])
    original = config.read_text()
    target = f"{tls_registry.host}/thaw/team-a/cri-{uuid.uuid4().hex[:8]}:v1"
    registry = {"auth_file": tls_registry.auth_config, "ca_file": tls_registry.ca.ca,
                "pull": {"team-a": [f"{tls_registry.host}/thaw/team-a"]}}
    keys = config.parent / f"keys-{uuid.uuid4().hex[:8]}"
    keys.mkdir()
    thaw(node, "key", "generate", str(keys))          # signed in, verified on the pull on demand
    trust = {"signing_key": str(keys / "thaw.key"), "keys": {f"{tls_registry.host}/thaw/team-a": [str(keys / "thaw.pub")]}}
    config.write_text(original + "registry: " + json.dumps(registry) + "\ntrust: " + json.dumps(trust) + "\n")   # JSON is YAML
    try:
        pod, cid = start_app(cri, "to-push")
        wait_for(lambda: len(ticks_in_log(cri, pod)) > 5, 30, "ticks")
        thaw(node, "capture", cid, "--name", "cri-reg:1", "--root", str(containerd.runc_root))
        teardown_clean(containerd, cri, node, pod)
        thaw(node, "push", "--sign", "cri-reg:1", target, "-n", "team-a")
        thaw(node, "rm", "cri-reg:1", "-n", "team-a")

        lacks, cid2 = start_app(cri, "lacks", {"thaw.dev/snapshot": target})
        rec = records(node)[cid2]
        pulls = [json.loads(line) for line in open(Path(node["state"]) / "events.log")]
        pulls = [e for e in pulls if e["kind"] == "pull" and e.get("snapshot") == target]
        assert pulls and pulls[0]["outcome"] == "started", pulls        # by the sandbox's create
        if rec["phase"] == "cold":
            assert "not found" in rec["cold_reason"], rec
            assert wait_for(lambda: ticks_in_log(cri, lacks), 30, "cold ticks")[0] == 0
        else:
            # The sandbox's pull (a small snapshot) finished before the container's create came.
            assert rec["phase"] == "running" and any(e["outcome"] == "pulled" for e in pulls), (rec, pulls)
        wait_for(lambda: target in thaw(node, "ls", "-n", "team-a").stdout, 120, "the pull on demand")
        (row,) = [r for r in json.loads(thaw(node, "ls", "--json").stdout) if r["ref"] == target]
        assert row["origin"] == f"pulled:{target}" and row["namespace"] == "team-a"

        restored, cid3 = start_app(cri, "restores", {"thaw.dev/snapshot": target})
        assert records(node)[cid3]["phase"] == "running", (records(node)[cid3], thaw(node, "events").stdout[-3000:])
        assert wait_for(lambda: ticks_in_log(cri, restored), 30, "restored ticks")[0] > 5
        teardown_clean(containerd, cri, node, lacks)
        teardown_clean(containerd, cri, node, restored)
    finally:
        config.write_text(original)


@pytest.mark.parametrize("damage", ["missing", "corrupt"])
def test_bad_snapshot_still_runs_cold(thaw_cri, damage):
    containerd, cri, node = thaw_cri
    if damage == "corrupt":
        pod, cid = start_app(cri, "to-capture")
        wait_for(lambda: len(ticks_in_log(cri, pod)) > 3, 30, "ticks")
        thaw(node, "capture", cid, "--name", "cri-bad:1", "--root", str(containerd.runc_root))
        teardown_clean(containerd, cri, node, pod)
        info = json.loads(thaw(node, "inspect", "cri-bad:1", "-n", "team-a").stdout)
        shutil.rmtree(Path(node["store"]) / "images" / info["manifest"].split(":")[1])
    pod, cid = start_app(cri, f"cold-{damage}", {"thaw.dev/snapshot": "cri-bad:1"})
    rec = records(node)[cid]
    assert rec["phase"] == "cold"
    # A damaged snapshot is unpublished by whoever finds it first: the pod sandbox's prefetch
    # (then this create finds no snapshot) or this create's restore.
    assert "not found" in rec["cold_reason"] if damage == "missing" else \
        any(why in rec["cold_reason"] for why in ("removed", "not found")), rec["cold_reason"]
    got = wait_for(lambda: ticks_in_log(cri, pod), 30, "cold ticks")
    assert got[0] == 0                                     # a genuine cold start
    log = json.loads(containerd.bundle_dir(cid).joinpath("log.json").read_text().splitlines()[0])
    assert log["level"] == "warning" and "cold start" in log["msg"]
    teardown_clean(containerd, cri, node, pod)


def test_ctr_run_with_runc_binary(thaw_cri, tmp_path):
    containerd, _cri, node = thaw_cri
    thaw_bin = shutil.which("thaw-runtime")
    root = "/run/containerd/runc/k8s.io"          # the runc v2 shim's default root for ctr
    ids = [f"thaw-ctr-{os.getpid()}-{i}" for i in range(2)]
    logs = [tmp_path / f"{i}.log" for i in ids]

    def run(cid, log, *annotations):
        args = ["run", "-d", "--runc-binary", thaw_bin, "--log-uri", f"file://{log}"]
        for a in annotations:
            args += ["--annotation", a]
        containerd.ctr(*args, BUSYBOX, cid, *APP)

    try:
        run(ids[0], logs[0])
        wait_for(lambda: logs[0].exists() and "tick 15" in logs[0].read_text(), 30, "ctr ticks")
        thaw(node, "capture", ids[0], "--name", "ctr-app:1", "--root", root)
        run(ids[1], logs[1], "thaw.dev/snapshot=ctr-app:1")
        text = wait_for(lambda: logs[1].exists() and "tick" in logs[1].read_text() and logs[1].read_text(),
                        30, "restored ctr ticks")
        tick = re.search(r"tick (\d+)", text)
        assert tick, text[:200]
        first = int(tick.group(1))
        assert first > 10, text[:200]
        assert records(node)[ids[1]]["phase"] == "running"
    finally:
        for cid in ids:
            containerd.ctr("task", "kill", "-s", "KILL", cid, check=False)
            time.sleep(0.3)
            containerd.ctr("task", "delete", cid, check=False)
            containerd.ctr("container", "delete", cid, check=False)
    wait_for(lambda: not records(node), 10, "thaw state cleared")
