"""Snapshots through a registry at thaw's level: `thaw push` / `thaw pull` between two stores (two
nodes) through a real registry (Debian's docker-registry with TLS and htpasswd, started by the
registry fixtures), faults ending in a clear error and no visible snapshot, node policy for pulls
made for pods, pull on demand through thaw-runtime (cold start, background pull, the next create
restores; `thaw.dev/pull: wait`), and auto-capture pushing what it captured."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import yaml

_TESTS = os.path.dirname(os.path.abspath(__file__))
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

from registry_fixture.proxy import RegistryProxy  # noqa: E402
from registry_fixture.server import PASSWORD, USER, new_repo  # noqa: E402

from helpers import fake_snapshot, make_bundle, wait_for  # noqa: E402
from thaw.oci.annotations import SnapshotRef  # noqa: E402
from thaw.shim.lifecycle import distribution  # noqa: E402
from thaw.shim.node.config import load  # noqa: E402
from thaw.shim.node.store import Store  # noqa: E402

pytest_plugins = ["registry_fixture.fixtures"]
pytestmark = pytest.mark.registry

MiB = 1 << 20


class Node:
    """One node's thaw: its config (store, state, registry settings) and CLI."""

    def __init__(self, tmp_path, name: str, site, store_dir: str | None = None, trust: dict | None = None,
                 **registry):
        self.dir = tmp_path / name
        self.dir.mkdir()
        self.config = str(self.dir / "config.yaml")
        self.store_dir = store_dir or str(self.dir / "store")
        reg = {"auth_file": site.auth_config, "ca_file": site.ca.ca, **registry}
        # Transfers are these tests' subject: unsigned snapshots of the test registry are accepted
        # unless a test says otherwise (tests/test_provenance.py: signatures).
        trust = {"unsigned": [f"{site.host}/"]} if trust is None else trust
        with open(self.config, "w") as f:
            yaml.safe_dump({"store_dir": self.store_dir, "state_dir": str(self.dir / "state"), "registry": reg,
                            "trust": trust}, f)

    @property
    def cfg(self):
        return load(self.config)

    @property
    def store(self) -> Store:
        return Store.for_config(self.cfg)

    def thaw(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
        proc = subprocess.run(["thaw", *args], capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "THAW_CONFIG": self.config})
        if check and proc.returncode != 0:
            raise AssertionError(f"thaw {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc

    def ls(self) -> list[dict]:
        return json.loads(self.thaw("ls", "--json").stdout)


def contents(directory: str) -> dict[str, str]:
    import hashlib
    out = {}
    for name in sorted(os.listdir(directory)):
        with open(os.path.join(directory, name), "rb") as f:
            out[name] = hashlib.file_digest(f, "sha256").hexdigest()
    return out


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


@pytest.fixture
def nodes(tmp_path, tls_registry):
    return Node(tmp_path, "a", tls_registry), Node(tmp_path, "b", tls_registry)


def published(node: Node, name: str, size: int, namespace: str = "team-a"):
    """A stand-in snapshot whose pages file is `size` random bytes (file parts above 64 MiB)."""
    return fake_snapshot(node.store.init(), name, payload=os.urandom(size), namespace=namespace)


# --- push and pull -------------------------------------------------------------------------------

def test_push_then_pull_on_another_node(nodes, tls_registry, tmp_path):
    a, b = nodes
    snap = published(a, "worker:1", 80 * MiB)
    assert snap.parts, "the pages file must be pushed as file parts"
    target = f"{tls_registry.host}/{new_repo()}:v1"
    out = json_lines(a.thaw("push", "worker:1", target, "-n", "team-a", "--json").stdout)
    assert out[-1]["digest"] == snap.manifest.digest and out[-1]["skipped"] == 0
    again = json_lines(a.thaw("push", "worker:1", target, "-n", "team-a", "--json").stdout)[-1]
    assert again["skipped"] == again["blobs"]               # HEAD found every blob: nothing uploaded
    elsewhere = json_lines(a.thaw("push", "worker:1", f"{tls_registry.host}/{new_repo()}:v1", "-n", "team-a",
                                  "--json").stdout)
    assert {e["outcome"] for e in elsewhere if e.get("event") == "blob"} == {"mounted"}   # from where it was pushed

    pulled = json_lines(b.thaw("pull", "-n", "team-a", target, "--json").stdout)[-1]
    assert pulled["digest"] == snap.manifest.digest        # the same manifest bytes, the same digest
    assert pulled["namespace"] == "team-a" and pulled["snapshot"] == target
    (row,) = b.ls()
    assert row["ref"] == target and row["namespace"] == "team-a" and row["origin"] == f"pulled:{target}"
    got = b.store.resolve(SnapshotRef.parse(target), "team-a")
    with a.store.image_dir(snap, "digest") as src, b.store.image_dir(got, "digest") as dst:
        assert contents(src) == contents(dst)
    # another name for the same manifest takes no second copy
    b.thaw("pull", "-n", "team-a", target, "--name", "local-copy:1")
    assert sorted(r["ref"] for r in b.ls()) == sorted([target, "local-copy:1"])
    assert len([n for n in os.listdir(os.path.join(b.store_dir, "images")) if "." not in n]) == 1
    assert not os.listdir(os.path.join(b.store_dir, "pulls")) or all(
        n.endswith(".lock") for n in os.listdir(os.path.join(b.store_dir, "pulls")))


def test_standard_tools_read_what_thaw_pushed(nodes, tls_registry, tmp_path):
    if not shutil.which("skopeo"):
        pytest.fail("skopeo missing (install/node.sh --dev installs it)") if os.environ.get(
            "THAW_TEST_STRICT") == "1" else pytest.skip("needs skopeo")
    a, _ = nodes
    snap = published(a, "worker:2", 70 * MiB)
    target = f"{tls_registry.host}/{new_repo()}:v2"
    a.thaw("push", "worker:2", target, "-n", "team-a")
    certs = tmp_path / "certs"
    certs.mkdir()
    shutil.copy(tls_registry.ca.ca, certs / "ca.crt")
    raw = subprocess.run(["skopeo", "inspect", "--raw", "--cert-dir", str(certs), "--authfile",
                          tls_registry.auth_config, f"docker://{target}"], capture_output=True, timeout=60)
    assert raw.returncode == 0, raw.stderr
    assert raw.stdout == a.store.layout.read_blob(snap.manifest)
    man = json.loads(raw.stdout)
    assert man["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    assert man["artifactType"] == "application/vnd.thaw.snapshot.v1"
    assert man["annotations"]["org.opencontainers.image.created"] == snap.config.created
    assert {d["digest"] for d in man["layers"]} == {d.digest for d in snap.layers}


def test_push_names_where(nodes, tls_registry):
    a, _ = nodes
    published(a, "plain:1", 1 * MiB)
    err = a.thaw("push", "plain:1", "-n", "team-a", check=False)
    assert err.returncode == 1 and "not a registry reference" in err.stderr
    err = a.thaw("push", "plain:1", f"{tls_registry.host}/x/y@sha256:{'0' * 64}", "-n", "team-a", check=False)
    assert err.returncode == 1 and "push to a tag" in err.stderr


def journal_progress(node: Node, snap) -> bool:
    """Whether the pull of `snap` into `node` has recorded a resume point inside a blob."""
    path = os.path.join(node.store_dir, "pulls", snap.manifest.digest.split(":")[1], "journal.json")
    try:
        with open(path) as f:
            return any(json.loads(line)[1] > 0 for line in f if line.endswith("\n"))
    except (OSError, ValueError):
        return False


# --- faults: a clear error, nothing visible, and a later pull that succeeds ------------------------

def test_pull_killed_with_sigkill_resumes(nodes, tls_registry):
    a, b = nodes
    snap = published(a, "big:1", 200 * MiB)
    target = f"{tls_registry.host}/{new_repo()}:v1"
    a.thaw("push", "big:1", target, "-n", "team-a")
    area = os.path.join(b.store_dir, "pulls", snap.manifest.digest.split(":")[1])
    proc = subprocess.Popen(["thaw", "pull", "-n", "team-a", target], env={**os.environ, "THAW_CONFIG": b.config},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: journal_progress(b, snap), 60, "the pull's first resume point", 0.005)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert b.ls() == []                                     # nothing half-pulled is visible
    assert os.path.exists(os.path.join(area, "journal.json"))   # run again before a gc: it resumes
    out = json_lines(b.thaw("pull", "-n", "team-a", target, "--json").stdout)
    reused = sum(e.get("reused") or 0 for e in out if e.get("event") == "blob")
    assert reused > 0, out
    assert [r["ref"] for r in b.ls()] == [target]
    with b.store.image_dir(b.store.resolve(SnapshotRef.parse(target), "team-a"), "digest"):
        pass                                                # every file checks out by digest
    assert not os.path.exists(area)


def test_corrupted_blob_is_refused_then_a_clean_pull_works(nodes, tls_registry, tmp_path):
    a, b = nodes
    published(a, "c:1", 70 * MiB)
    repo = new_repo()
    a.thaw("push", "c:1", f"{tls_registry.host}/{repo}:v1", "-n", "team-a")
    with RegistryProxy(tls_registry.server.url, ca=tls_registry.ca.ca, corrupt_at=MiB + 5) as proxy:
        creds = tls_registry.server.auth_config(str(tmp_path / "proxy.json"), USER, PASSWORD, host=proxy.host)
        via = Node(tmp_path, "via-proxy", tls_registry, store_dir=b.store_dir, auth_file=creds, insecure=[proxy.host],
                   trust={"unsigned": [f"{proxy.host}/"]})
        err = via.thaw("pull", "-n", "team-a", f"{proxy.host}/{repo}:v1", check=False)
    assert err.returncode == 1 and "sha256:" in err.stderr and ("digest" in err.stderr or "hash" in err.stderr)
    assert b.ls() == []
    b.thaw("pull", "-n", "team-a", f"{tls_registry.host}/{repo}:v1")
    assert [r["ref"] for r in b.ls()] == [f"{tls_registry.host}/{repo}:v1"]


def test_wrong_credentials_are_a_clear_error(nodes, tls_registry, tmp_path):
    a, _ = nodes
    published(a, "w:1", 1 * MiB)
    target = f"{tls_registry.host}/{new_repo()}:v1"
    a.thaw("push", "w:1", target, "-n", "team-a")
    bad = tls_registry.server.auth_config(str(tmp_path / "bad.json"), USER, "not-the-password")
    c = Node(tmp_path, "c", tls_registry, auth_file=bad)
    err = c.thaw("pull", "-n", "team-a", target, check=False)
    assert err.returncode == 1 and tls_registry.host in err.stderr
    assert any(w in err.stderr.lower() for w in ("auth", "401", "unauthorized", "credentials")), err.stderr
    assert c.ls() == []


def test_registry_stopped_mid_pull_then_pull_again(tmp_path, fresh_registry):
    a, b = Node(tmp_path, "a", fresh_registry), Node(tmp_path, "b", fresh_registry)
    snap = published(a, "s:1", 200 * MiB)
    target = f"{fresh_registry.host}/{new_repo()}:v1"
    a.thaw("push", "s:1", target, "-n", "team-a")
    proc = subprocess.Popen(["thaw", "pull", "-n", "team-a", target], env={**os.environ, "THAW_CONFIG": b.config},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: journal_progress(b, snap), 60, "the pull's first resume point", 0.005)
    fresh_registry.server.stop(signal.SIGKILL)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1 and fresh_registry.host in stderr, stderr
    assert b.ls() == [] and not os.path.exists(os.path.join(b.store_dir, "pulls", snap.manifest.digest[7:]))
    fresh_registry.server.start()
    b.thaw("pull", "-n", "team-a", target)
    assert [r["ref"] for r in b.ls()] == [target]


@pytest.mark.root
def test_disk_full_is_refused_before_anything_is_written(nodes, tls_registry, tmp_path):
    a, _ = nodes
    published(a, "f:1", 90 * MiB)
    target = f"{tls_registry.host}/{new_repo()}:v1"
    a.thaw("push", "f:1", target, "-n", "team-a")
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(small)], check=True)
    try:
        c = Node(tmp_path, "c", tls_registry, store_dir=str(small / "store"))
        err = c.thaw("pull", "-n", "team-a", target, check=False)
        assert err.returncode == 1 and "not enough space" in err.stderr, err.stderr
        assert c.ls() == []
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)


# --- pulls made for pods: node policy and the owner namespace --------------------------------------

def test_pulls_for_pods_follow_node_policy_and_the_owner_namespace(nodes, tls_registry, tmp_path):
    a, _ = nodes
    published(a, "p:1", 1 * MiB, namespace="team-a")
    repo = new_repo("thaw/team-a/p")
    target = f"{tls_registry.host}/{repo}:v1"
    a.thaw("push", "p:1", target, "-n", "team-a")
    source = SnapshotRef.parse(target).remote
    assert source is not None

    default = Node(tmp_path, "default", tls_registry)
    with pytest.raises(distribution.PullRefused, match="may not pull"):
        distribution.pull(default.cfg, default.store, source, for_namespace="team-a")
    assert default.ls() == []

    allowed = {"team-a": [f"{tls_registry.host}/thaw/team-a"], "team-c": [f"{tls_registry.host}/thaw/team-c"]}
    node = Node(tmp_path, "policy", tls_registry, pull=allowed)
    with pytest.raises(distribution.PullRefused, match="may not pull"):
        distribution.pull(node.cfg, node.store, source, for_namespace="team-c")
    assert node.ls() == []
    snap = distribution.pull(node.cfg, node.store, source, for_namespace="team-a")
    assert snap.namespace == "team-a" and [r["namespace"] for r in node.ls()] == ["team-a"]


def test_gc_drops_every_pull_area_whose_pull_is_gone_and_keeps_a_running_one(nodes):
    _, b = nodes
    store = b.store.init()
    pulls = os.path.join(b.store_dir, "pulls")
    os.makedirs(os.path.join(pulls, "a" * 64))           # recent, but no process holds it
    with store.pull_area("sha256:" + "c" * 64) as live:
        store.gc()
        assert os.path.isdir(live)                       # a pull holds it
    assert os.listdir(pulls) == ["c" * 64 + ".lock"]


# --- pull on demand, through thaw-runtime --------------------------------------------------------

COUNTER = ["sh", "-c", "i=0; while true; do echo tick $i; i=$((i+1)); sleep 0.05; done"]


def events_of(env, kind: str) -> list[dict]:
    path = os.path.join(env.state, "events.log")
    return [e for e in map(json.loads, open(path)) if e.get("kind") == kind] if os.path.exists(path) else []


@pytest.mark.root
@pytest.mark.runc
@pytest.mark.criu
def test_a_pod_asking_for_a_registry_snapshot_the_node_lacks_cold_starts_and_the_next_restores(
        thaw_env, tmp_path, tls_registry):
    repo = new_repo("thaw/local/r")
    target = f"{tls_registry.host}/{repo}:v1"
    registry = {"auth_file": tls_registry.auth_config, "ca_file": tls_registry.ca.ca,
                "pull": {"_local": [f"{tls_registry.host}/thaw/local"]}, "pull_timeout": 60}
    # Signed by a key the node trusts for the repository (the positive control of provenance).
    thaw_env.thaw("key", "generate", str(tmp_path))
    thaw_env.write_config(registry=registry, trust={"signing_key": str(tmp_path / "thaw.key"), "keys": {
        f"{tls_registry.host}/thaw/local": [str(tmp_path / "thaw.pub")]}})
    src = thaw_env.container(make_bundle(str(tmp_path / "src"), COUNTER))
    assert src.create() == 0
    src.start()
    src.wait_output(lambda t: "tick 5" in t, timeout=30)
    thaw_env.thaw("capture", src.id, "--name", "counter:1", "--root", thaw_env.root)
    src.destroy()
    thaw_env.thaw("push", "--sign", "counter:1", target)
    thaw_env.thaw("rm", "counter:1")

    ann = {"thaw.dev/snapshot": target}
    first = thaw_env.container(make_bundle(str(tmp_path / "first"), COUNTER, annotations=ann))
    assert first.create() == 0
    assert any("cold start" in e["msg"] and "not found" in e["msg"] for e in first.log_entries()), first.log_text()
    first.start()
    wait_for(lambda: any(e.get("outcome") == "pulled" for e in events_of(thaw_env, "pull")), 120,
             "the background pull")
    first.destroy()

    second = thaw_env.container(make_bundle(str(tmp_path / "second"), COUNTER, annotations=ann))
    assert second.create() == 0 and "restored" in second.log_text(), second.log_text()
    second.start()
    assert int(second.wait_output(lambda t: "tick" in t, timeout=30).split("tick ")[1].split()[0]) > 5
    second.destroy()

    # thaw.dev/pull: wait — the create waits for the pull and restores at once
    thaw_env.thaw("rm", target)
    waited = thaw_env.container(make_bundle(str(tmp_path / "waited"), COUNTER,
                                            annotations={**ann, "thaw.dev/pull": "wait"}))
    assert waited.create() == 0 and "restored" in waited.log_text(), waited.log_text()
    waited.destroy()


@pytest.mark.root
@pytest.mark.runc
@pytest.mark.criu
def test_pull_on_demand_is_refused_by_default_policy(thaw_env, tmp_path, tls_registry):
    target = f"{tls_registry.host}/{new_repo()}:v1"
    thaw_env.write_config(registry={"auth_file": tls_registry.auth_config, "ca_file": tls_registry.ca.ca})
    c = thaw_env.container(make_bundle(str(tmp_path / "c"), COUNTER, annotations={"thaw.dev/snapshot": target}))
    assert c.create() == 0 and "cold start" in c.log_text()
    wait_for(lambda: any(e.get("outcome") == "failed" for e in events_of(thaw_env, "pull")), 60,
             "the refused pull's event")
    (failed,) = [e for e in events_of(thaw_env, "pull") if e.get("outcome") == "failed"]
    assert "may not pull" in failed["msg"]
    c.destroy()


@pytest.mark.root
@pytest.mark.runc
@pytest.mark.criu
def test_auto_capture_pushes_what_it_captured(thaw_env, tmp_path, tls_registry):
    repo = new_repo("thaw/local/r")
    target = f"{tls_registry.host}/{repo}:v1"
    thaw_env.write_config(registry={"auth_file": tls_registry.auth_config, "ca_file": tls_registry.ca.ca,
                                    "push": {"_local": [f"{tls_registry.host}/thaw/local"]}})
    ready = ["sh", "-c", "i=0; while true; do echo tick $i; i=$((i+1)); [ $i = 20 ] && touch /ready; sleep 0.05; done"]
    ann = {"thaw.dev/snapshot": target, "thaw.dev/capture": "on-ready", "thaw.dev/ready": "file:/ready",
           "thaw.dev/push": "true"}
    c = thaw_env.container(make_bundle(str(tmp_path / "c"), ready, annotations=ann))
    assert c.create() == 0
    c.start()
    wait_for(lambda: any("pushed to" in e["msg"] for e in events_of(thaw_env, "auto_capture")), 120,
             "the auto-capture's push")
    c.destroy()
    snap = json.loads(thaw_env.thaw("inspect", target).stdout)
    with tls_registry.client() as client:
        assert client.get_manifest(repo, "v1").digest == snap["manifest"]
