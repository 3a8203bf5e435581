"""Limits, performed for real as a hostile tenant would (issue 22): a malicious registry written
here (tests/registry_fixture/malicious.py, plain HTTP on 127.0.0.1 only) and small file systems
this test mounts and removes itself. Each test is one break: a pull that would reserve what the
manifest claims, namespaces without quotas, pulls without a deadline or outliving their sandbox,
manifests of many blobs, remote text that forges event lines or leaks credentials, a malformed
snapshot pulled on demand, a disk filling mid-pull."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

_TESTS = os.path.dirname(os.path.abspath(__file__))
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

from registry_fixture.malicious import MaliciousRegistry, basic_auth_file  # noqa: E402

from helpers import fake_snapshot, wait_for  # noqa: E402
from thaw.oci.annotations import SnapshotRef  # noqa: E402
from thaw.shim.node.config import load  # noqa: E402
from thaw.shim.node.store import QuotaExceeded, Store  # noqa: E402

MiB = 1 << 20


@pytest.fixture
def evil():
    with MaliciousRegistry() as reg:
        yield reg
        reg.release.set()


class Node:
    def __init__(self, d, evil: MaliciousRegistry, store_dir: str | None = None, **extra):
        os.makedirs(d, exist_ok=True)
        self.dir = str(d)
        self.config = os.path.join(self.dir, "config.yaml")
        self.store_dir = store_dir or os.path.join(self.dir, "store")
        self.state = os.path.join(self.dir, "state")
        reg = {"insecure": [evil.host], **extra.pop("registry", {})}
        # Limits are these tests' subject: the malicious registry's unsigned snapshots are accepted
        # (tests/test_provenance.py refuses them).
        extra.setdefault("trust", {"unsigned": [f"{evil.host}/"]})
        with open(self.config, "w") as f:
            yaml.safe_dump({"store_dir": self.store_dir, "state_dir": self.state, "registry": reg, **extra}, f)

    @property
    def cfg(self):
        return load(self.config)

    @property
    def store(self) -> Store:
        return Store.for_config(self.cfg).init()

    def run(self, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "THAW_CONFIG": self.config})

    def thaw(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return self.run("thaw", *args, timeout=timeout)

    def events(self, kind: str | None = None) -> list[dict]:
        path = os.path.join(self.state, "events.log")
        if not os.path.exists(path):
            return []
        return [e for e in map(json.loads, open(path)) if kind is None or e["kind"] == kind]

    def pull_areas(self) -> list[str]:
        pulls = os.path.join(self.store_dir, "pulls")
        return [n for n in os.listdir(pulls) if not n.endswith(".lock")] if os.path.isdir(pulls) else []


def allocated(path: str) -> int:
    """Disk blocks taken under `path` (what a reservation takes, unlike apparent sizes)."""
    return sum(os.lstat(os.path.join(d, n)).st_blocks * 512 for d, _, ns in os.walk(path) for n in ns)


def failed_pulls(node: Node) -> list[dict]:
    return [e for e in node.events("pull") if e.get("outcome") == "failed"]


# --- 1. no reservation before data; a failed or abandoned pull gives its space back ------------------

def test_a_blob_declared_large_reserves_nothing_and_its_space_comes_back(evil, tmp_path):
    node = Node(tmp_path / "n", evil)
    snap = evil.put_snapshot("evil/big", "v1", parts=[os.urandom(404)], declared={0: 943 * MiB})
    big = snap.parts[0].desc.digest
    evil.hold_after(big, 404, length=943 * MiB)
    pull = subprocess.Popen(["thaw", "pull", "-n", "team-a", f"{evil.host}/evil/big:v1"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "THAW_CONFIG": node.config})
    try:
        assert evil.held.wait(60), "the pull never asked for the large blob"
        wait_for(lambda: node.pull_areas(), 10, "the pull area")
        assert allocated(node.store_dir) < 4 * MiB         # 404 bytes arrived: that is what is taken
        # the abandoned pull: its process is gone, gc gives the space back at once
        pull.send_signal(signal.SIGKILL)
        pull.wait(10)
        assert node.pull_areas()
        gc = node.thaw("gc")
        assert gc.returncode == 0, gc.stderr
        assert node.pull_areas() == []
    finally:
        if pull.poll() is None:
            pull.kill()
        pull.communicate()
    # a pull that fails (the registry drops the connection) removes what it wrote itself
    evil.release.set()
    proc = node.thaw("pull", "-n", "team-a", f"{evil.host}/evil/big:v1")
    assert proc.returncode == 1 and "evil/big" in proc.stderr, proc.stderr
    assert node.pull_areas() == [] and allocated(os.path.join(node.store_dir, "pulls")) == 0
    assert failed_pulls(node) and json.loads(node.thaw("ls", "--json").stdout) == []


# --- 2. quotas per namespace; eviction only within the namespace, never what is in use --------------

def test_a_pull_past_its_namespace_quota_is_refused_before_writing(evil, tmp_path):
    node = Node(tmp_path / "n", evil, store={"quota": {"team-a": 2 * MiB}})
    snap = evil.put_snapshot("a/app", "v1", namespace="team-a", parts=[os.urandom(3 * MiB)])
    proc = node.thaw("pull", "-n", "team-a", f"{evil.host}/a/app:v1")
    assert proc.returncode == 1, proc.stderr
    assert "quota" in proc.stderr and "team-a" in proc.stderr and "thaw rm" in proc.stderr, proc.stderr
    assert not any(snap.parts[0].desc.digest in p for p in evil.blob_requests())   # never asked for
    assert node.pull_areas() == [] and failed_pulls(node)


def test_eviction_stays_in_the_namespace_and_spares_what_is_in_use(evil, tmp_path):
    # each stand-in snapshot holds ~4.2 MiB (its 2 MiB pages sit in its whole-file tar and image dir)
    node = Node(tmp_path / "n", evil, store={"quota": {"team-a": 10 * MiB, "team-b": 50 * MiB}})
    store = node.store
    pulled = "pulled:elsewhere/x:1"
    b1 = fake_snapshot(store, "b1:1", os.urandom(2 * MiB), namespace="team-b", origin=pulled)
    a1 = fake_snapshot(store, "a1:1", os.urandom(2 * MiB), namespace="team-a", origin=pulled)
    a2 = fake_snapshot(store, "a2:1", os.urandom(2 * MiB), namespace="team-a", origin=pulled)
    now = time.time()
    for snap, age in ((b1, 300), (a1, 200), (a2, 100)):
        os.utime(store.image_path(snap) + ".seal", (now - age, now - age))
    evil.put_snapshot("a/new", "v1", namespace="team-a", parts=[os.urandom(2 * MiB)])
    # a1 (team-a's least recently used) is being restored: not evicted; a2 goes instead
    with store.image_dir(a1):
        proc = node.thaw("pull", "-n", "team-a", f"{evil.host}/a/new:v1")
    assert proc.returncode == 0, proc.stderr
    left = {(r["namespace"], r["ref"]) for r in json.loads(node.thaw("ls", "--json").stdout)}
    assert left == {("team-b", "b1:1"), ("team-a", "a1:1"), ("team-a", f"{evil.host}/a/new:v1")}
    assert store.usage("team-a") <= 10 * MiB
    # team-a cannot make room by taking team-b's snapshots, even when the store is full
    node2 = Node(tmp_path / "m", evil, store_dir=node.store_dir,
                 store={"quota": {"team-a": 50 * MiB}, "max_bytes": store.total_bytes() + MiB})
    evil.put_snapshot("a/more", "v1", namespace="team-a", parts=[os.urandom(3 * MiB)])
    with store.image_dir(a1), store.image_dir(store.resolve(SnapshotRef.parse(f"{evil.host}/a/new:v1"), "team-a")):
        proc = node2.thaw("pull", "-n", "team-a", f"{evil.host}/a/more:v1")
    assert proc.returncode == 1 and "max_bytes" in proc.stderr and "a restore reads it" in proc.stderr, proc.stderr
    assert ("team-b", "b1:1") in {(r["namespace"], r["ref"]) for r in json.loads(node2.thaw("ls", "--json").stdout)}


def test_a_capture_or_import_past_the_quota_fails_and_the_default_quota_is_a_share(tmp_path):
    from thaw.shim.node.config import Config, StoreLimits, Trust
    cfg = Config(store_dir=str(tmp_path / "s"), state_dir=str(tmp_path / "st"),
                 store=StoreLimits(max_bytes=8 * MiB, quota_share=0.5), trust=Trust(unsigned=("import",)))
    store = Store.for_config(cfg).init()
    assert store.quota_of("anyone") == 4 * MiB
    # a stand-in's pages sit in its whole-file tar and its image directory: ~2x their size
    fake_snapshot(store, "one:1", os.urandom(MiB + MiB // 2), namespace="team-a")
    with pytest.raises(QuotaExceeded, match=r"namespace team-a would hold .* over its quota"):
        fake_snapshot(store, "two:1", os.urandom(MiB), namespace="team-a")  # captured here: not evictable
    fake_snapshot(store, "other:1", os.urandom(MiB + MiB // 2), namespace="team-b")   # its own share
    assert {s.ref for s in store.snapshots()} == {"one:1", "other:1"}
    # an import is checked before its blobs are written
    from thaw.shim.lifecycle.importer import import_archive
    probe = Store(str(tmp_path / "probe")).init()
    fake_snapshot(probe, "three:1", os.urandom(2 * MiB), namespace="team-a")
    archive = str(tmp_path / "three.tar")
    probe.export(SnapshotRef.parse("three:1"), "team-a", archive)
    with pytest.raises(QuotaExceeded, match=r"importing three:1 .* over its quota"):
        import_archive(store, archive, cfg, "team-a")
    assert {s.ref for s in store.snapshots()} == {"one:1", "other:1"}
    assert not os.listdir(store.staging_dir)


def test_names_of_one_manifest_go_together_and_nothing_shared_with_a_kept_one_is_removed(tmp_path):
    import dataclasses

    from thaw.shim.node.config import Config, StoreLimits
    cfg = Config(store_dir=str(tmp_path / "s"), state_dir=str(tmp_path / "st"),
                 store=StoreLimits(quota={"team-a": 3 * MiB}))
    store = Store.for_config(cfg).init()
    pulled = "pulled:elsewhere/x:1"
    a = fake_snapshot(store, "a:1", os.urandom(MiB), namespace="team-a", origin=pulled)
    store.publish(dataclasses.replace(a, ref="alias:1"), "/nonexistent", pulled)   # a second name, one copy
    keep = fake_snapshot(store, "keep:1", os.urandom(MiB // 4), namespace="team-b", origin=pulled)
    assert {s.ref for s in store.snapshots("team-a")} == {"a:1", "alias:1"}
    fake_snapshot(store, "b:1", os.urandom(MiB), namespace="team-a", origin=pulled)
    assert {s.ref for s in store.snapshots("team-a")} == {"b:1"}      # both names of a, one image dir
    assert not os.path.exists(store.image_path(a))
    with store.image_dir(keep, "digest"):                              # team-b's files all intact
        pass
    assert store.usage("team-a") <= 3 * MiB


# --- 3. one deadline per pull; a pull for a sandbox ends with it ------------------------------------

def test_a_trickling_registry_cannot_hold_a_pull_past_its_deadline(evil, tmp_path):
    node = Node(tmp_path / "n", evil, registry={"pull_deadline": 3})
    snap = evil.put_snapshot("slow/app", "v1", parts=[os.urandom(64 << 10)])
    evil.trickle(snap.parts[0].desc.digest, 0.5)
    t = time.monotonic()
    proc = node.thaw("pull", "-n", "team-a", f"{evil.host}/slow/app:v1")
    took = time.monotonic() - t
    assert proc.returncode == 1 and "deadline" in proc.stderr and "registry.pull_deadline" in proc.stderr, proc.stderr
    assert took < 30, took
    assert node.pull_areas() == [] and "deadline" in failed_pulls(node)[-1]["msg"]


@pytest.mark.root
@pytest.mark.runc
def test_deleting_the_sandbox_cancels_its_pull(evil, tmp_path, thaw_env):
    from helpers import make_bundle
    snap = evil.put_snapshot("pod/app", "v1", namespace="_local", parts=[os.urandom(1 * MiB)])
    evil.hold_after(snap.parts[0].desc.digest, 1000)
    thaw_env.write_config(registry={"insecure": [evil.host], "pull": {"_local": [f"{evil.host}/pod"]}},
                          trust={"unsigned": [f"{evil.host}/pod"]})
    pod = {"io.kubernetes.cri.container-type": "sandbox", "io.kubernetes.cri.sandbox-namespace": "_local",
           "thaw.dev/snapshot": f"{evil.host}/pod/app:v1"}
    box = thaw_env.container(make_bundle(str(tmp_path / "box"), ["sleep", "1000"], annotations=pod))
    assert box.create() == 0, box.log_text()
    record = os.path.join(thaw_env.state, "prepare", box.id + ".json")
    assert os.path.exists(record)                      # written before the create returned
    prepare = json.load(open(record))["pid"]
    assert evil.held.wait(60), "the prepare never pulled"
    box.destroy()                                       # kill + delete through thaw-runtime
    wait_for(lambda: not os.path.exists(f"/proc/{prepare}"), 30, "the prepare to end")
    (failed,) = wait_for(lambda: [e for e in map(json.loads, open(os.path.join(thaw_env.state, "events.log")))
                                  if e["kind"] == "pull" and e.get("outcome") == "failed"], 10, "the event")
    assert "cancelled" in failed["msg"] and box.id in failed["msg"], failed
    pulls = os.path.join(thaw_env.store, "pulls")
    assert [n for n in os.listdir(pulls) if not n.endswith(".lock")] == [] and not os.path.exists(record)


# --- 4. many blobs cost linear time; caps with a clear error -------------------------------------

def test_manifests_past_the_caps_are_refused_before_any_blob(evil, tmp_path):
    node = Node(tmp_path / "n", evil, registry={"max_blobs": 50, "max_manifest_bytes": 64 << 10})
    evil.put_snapshot("many/app", "v1", parts=[os.urandom(8) for _ in range(60)], parts_per_file=60)
    proc = node.thaw("pull", "-n", "team-a", f"{evil.host}/many/app:v1")
    assert proc.returncode == 1 and "registry.max_blobs (50)" in proc.stderr, proc.stderr
    evil.put_snapshot("huge/app", "v1", parts=[os.urandom(8) for _ in range(45)], parts_per_file=1)
    evil.manifests[("huge/app", "v1")] += b" " * (70 << 10)   # valid JSON, too many bytes
    proc = node.thaw("pull", "-n", "team-a", f"{evil.host}/huge/app:v1")
    assert proc.returncode == 1 and "larger than 65536 bytes" in proc.stderr, proc.stderr
    assert evil.blob_requests() == [] and node.pull_areas() == []


def test_a_pull_of_thousands_of_blobs_costs_linear_time(evil, tmp_path):
    """CPU seconds of `thaw pull` for n and 4n blobs (each a one-blob file): linear cost is at
    most ~4x (less: start-up is fixed); the quadratic journal and file scans made it ~10x."""
    cpu = {}
    for n in (750, 3000):
        node = Node(tmp_path / f"n{n}", evil)
        evil.put_snapshot(f"many/n{n}", "v1", parts=[os.urandom(16) for _ in range(n)])
        before = os.times()
        proc = node.thaw("pull", "-n", "team-a", f"{evil.host}/many/n{n}:v1", timeout=600)
        after = os.times()
        assert proc.returncode == 0, proc.stderr
        cpu[n] = (after.children_user + after.children_system) - (before.children_user + before.children_system)
    print("cpu seconds", cpu)
    assert cpu[3000] < 6 * cpu[750], cpu


# --- 5. remote text: no control characters, bounded, never a credential -----------------------------

def test_registry_error_bodies_cannot_forge_event_lines_or_leak_credentials(evil, tmp_path):
    auth = basic_auth_file(str(tmp_path), evil.host, "alice", "s3cret-pw")
    node = Node(tmp_path / "n", evil, registry={"auth_file": auth})
    forged = "\x1b[2J\x1b[32m\n2026-01-01T00:00:00.000  info    restored       c-forged  restored from snapshot"

    def answer(h) -> bool:
        got = h.headers.get("Authorization")
        if not got:
            h.send_response(401)
            h.send_header("WWW-Authenticate", 'Basic realm="evil"')
            h.send_header("Content-Length", "0")
            h.end_headers()
            return True
        body = json.dumps({"errors": [{"code": "DENIED", "message": forged + " you sent Authorization: " + got
                                       + " " + "x" * 100_000}]}).encode()
        h.send_response(500)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)
        return True
    evil.answer_all = answer
    proc = node.thaw("pull", "-n", "team-a", f"{evil.host}/any/app:v1")
    assert proc.returncode == 1 and "HTTP 500" in proc.stderr, proc.stderr
    import base64
    secret = base64.b64encode(b"alice:s3cret-pw").decode()
    log = open(os.path.join(node.state, "events.log")).read()
    for text in (proc.stderr, log):
        assert secret not in text and "s3cret-pw" not in text and "\x1b" not in text
    assert len(proc.stderr) < 4000
    shown = node.thaw("events")
    assert shown.returncode == 0
    assert "\x1b" not in shown.stdout and "c-forged" not in "".join(
        line.split()[3] for line in shown.stdout.splitlines() if len(line.split()) > 3)
    assert len(shown.stdout.splitlines()) == len(node.events())   # one line per event, none forged
    # a line written into events.log by another writer is shown safely too
    with open(os.path.join(node.state, "events.log"), "a") as f:
        f.write(json.dumps({"time": "t", "level": "info", "kind": "x\x1b[1m", "container": "c\nforged",
                            "msg": "a\rb\x07"}) + "\n")
    shown = node.thaw("events")
    assert "\x1b" not in shown.stdout and "\r" not in shown.stdout and "\x07" not in shown.stdout
    assert len(shown.stdout.splitlines()) == len(node.events())


# --- 6. a malformed snapshot pulled on demand: an event and a clean pull area ------------------------

def test_a_malformed_snapshot_pulled_on_demand_is_an_event_not_a_traceback(evil, tmp_path):
    node = Node(tmp_path / "n", evil, registry={"pull": {"team-a": [f"{evil.host}/bad"]}})
    evil.put_snapshot("bad/app", "v1", namespace="team-a", whole=b"this is not a tar" * 100)
    proc = node.run("thaw-hook", "prepare", "team-a", f"{evil.host}/bad/app:v1")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    (failed,) = failed_pulls(node)
    assert "not a valid tar" in failed["msg"] and "malformed" in failed["msg"], failed
    assert node.pull_areas() == [] and not os.listdir(os.path.join(node.store_dir, "staging"))
    assert json.loads(node.thaw("ls", "--json").stdout) == []


# --- 7. disk full mid-pull: what thaw was doing, where, what to do ------------------------------------

@pytest.mark.root
def test_disk_full_mid_pull_names_what_where_and_what_to_do(evil, tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(small)], check=True)
    try:
        node = Node(tmp_path / "n", evil, store_dir=str(small / "store"), store={"quota_share": 1.0})
        snap = evil.put_snapshot("full/app", "v1", parts=[os.urandom(8 * MiB)])
        evil.hold_after(snap.parts[0].desc.digest, 1 * MiB)
        pull = subprocess.Popen(["thaw", "pull", "-n", "team-a", f"{evil.host}/full/app:v1"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env={**os.environ, "THAW_CONFIG": node.config})
        assert evil.held.wait(60)
        filler = small / "filler"
        subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=1M"], capture_output=True)   # until ENOSPC
        evil.blob_behaviour.clear()                 # the resumed request streams the rest
        evil.release.set()
        _, err = pull.communicate(timeout=120)
        assert pull.returncode == 1, err
        assert "No space left" in err and str(small / "store") in err and "free space" in err, err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert failed_pulls(node) and node.pull_areas() == []
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)
