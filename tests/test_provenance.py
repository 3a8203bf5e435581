"""Provenance: snapshots from outside are restored only when signed by a key the node trusts, and
the node, not the snapshot, says who owns them. Every attack is performed against a real registry
(Debian's docker-registry, TLS + htpasswd) and refused with a reason and an event, leaving
nothing behind; interop is proven with the real cosign (trixie's 2.5, unpacked by
install/node.sh --dev under $THAW_BUILD_CACHE/cosign)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml

_TESTS = os.path.dirname(os.path.abspath(__file__))
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

from registry_fixture.server import PASSWORD, USER, new_repo  # noqa: E402
from test_distribution import COUNTER, Node, events_of, json_lines, published  # noqa: E402

from helpers import make_bundle  # noqa: E402
from thaw.oci import cosign  # noqa: E402
from thaw.oci.annotations import SnapshotRef  # noqa: E402
from thaw.shim.lifecycle import distribution, prefetch  # noqa: E402
from thaw.shim.node import provenance  # noqa: E402
from thaw.shim.node.events import read as read_events  # noqa: E402
from thaw.shim.node.store import PROVENANCE  # noqa: E402

pytest_plugins = ["registry_fixture.fixtures"]
pytestmark = pytest.mark.registry

MiB = 1 << 20
COSIGN = os.path.join(os.environ.get("THAW_BUILD_CACHE", "/var/cache/thaw"), "cosign", "usr", "bin", "cosign")


def cosign_bin() -> str:
    if not os.access(COSIGN, os.X_OK):
        if os.environ.get("THAW_TEST_STRICT") == "1":
            pytest.fail(f"{COSIGN} missing (install/node.sh --dev unpacks trixie's cosign there)")
        pytest.skip("needs cosign (install/node.sh --dev)")
    return COSIGN


def run_cosign(site, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """cosign against the test registry: its CA, alice's credentials, no transparency log."""
    return subprocess.run([cosign_bin(), *args, "--registry-cacert", site.ca.ca, "--registry-username", USER,
                           "--registry-password", PASSWORD], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HOME": os.path.dirname(site.auth_config), **(env or {})})


class Keys:
    def __init__(self, node: Node, tmp_path, name: str):
        d = tmp_path / f"keys-{name}"
        d.mkdir()
        node.thaw("key", "generate", str(d), "--name", name)
        self.private, self.public = str(d / f"{name}.key"), str(d / f"{name}.pub")
        self.id = provenance.key_id(open(self.public, "rb").read())


def configure(node: Node, **trust) -> None:
    """Replace the node's trust section (the rest of its config stays)."""
    with open(node.config) as f:
        cfg = yaml.safe_load(f)
    cfg["trust"] = trust
    with open(node.config, "w") as f:
        yaml.safe_dump(cfg, f)


def untrusted_events(node: Node) -> list[dict]:
    return [e for e in read_events(str(node.dir / "state")) if e["kind"] == "untrusted"]


def assert_nothing_left(node: Node) -> None:
    """No snapshot, no image directory, no pull area, no blob."""
    assert node.ls() == []
    store = node.store.init()
    assert os.listdir(store.images_dir) == []
    pulls = os.path.join(node.store_dir, "pulls")
    assert not os.path.isdir(pulls) or all(n.endswith(".lock") for n in os.listdir(pulls))
    assert list(store.layout.all_blobs()) == []


@pytest.fixture
def signer(tmp_path, tls_registry):
    """Node a: captures and pushes with --sign (its signing key, `thaw key generate`)."""
    a = Node(tmp_path, "a", tls_registry)
    keys = Keys(a, tmp_path, "ci")
    configure(a, signing_key=keys.private)
    return a, keys


def signed_push(node: Node, name: str, target: str, namespace: str = "team-a") -> str:
    out = json_lines(node.thaw("push", "--sign", name, target, "-n", namespace, "--json").stdout)[-1]
    assert out["signed"] is True
    return out["digest"]


def pulling_node(tmp_path, site, name: str, **trust) -> Node:
    """A node requiring signatures (the default): trust as given, nothing unsigned."""
    return Node(tmp_path, name, site, trust=trust)


# --- positive controls ---------------------------------------------------------------------------

def test_thaw_signs_and_cosign_verifies(signer, tls_registry, tmp_path):
    a, keys = signer
    published(a, "w:1", 1 * MiB)
    repo = new_repo("thaw/team-a/w")
    digest = signed_push(a, "w:1", f"{tls_registry.host}/{repo}:v1")
    ref = f"{tls_registry.host}/{repo}@{digest}"
    ok = run_cosign(tls_registry, "verify", "--key", keys.public, "--insecure-ignore-tlog", ref)
    assert ok.returncode == 0, ok.stderr
    [claim] = json.loads(ok.stdout)
    assert claim["critical"]["image"]["docker-manifest-digest"] == digest
    assert claim["critical"]["identity"]["docker-reference"] == f"{tls_registry.host}/{repo}"
    other = Keys(a, tmp_path, "other")                     # the check can fail: another key
    bad = run_cosign(tls_registry, "verify", "--key", other.public, "--insecure-ignore-tlog", ref)
    assert bad.returncode != 0

    b = pulling_node(tmp_path, tls_registry, "b", keys={f"{tls_registry.host}/thaw/team-a": [keys.public]})
    pulled = json_lines(b.thaw("pull", "-n", "team-a", f"{tls_registry.host}/{repo}:v1", "--json").stdout)[-1]
    assert pulled["provenance"]["kind"] == "signed" and pulled["provenance"]["key"] == keys.id
    [row] = b.ls()
    assert row["restorable"] and row["provenance"]["source"] == f"{tls_registry.host}/{repo}"
    assert f" signed {keys.id[7:19]} " in b.thaw("ls").stdout


def test_cosign_signs_and_thaw_verifies(tmp_path, tls_registry):
    a = Node(tmp_path, "a", tls_registry)
    published(a, "w:1", 1 * MiB)
    repo = new_repo("thaw/team-a/w")
    out = json_lines(a.thaw("push", "w:1", f"{tls_registry.host}/{repo}:v1", "-n", "team-a", "--json").stdout)[-1]
    keydir = tmp_path / "cosign-keys"
    keydir.mkdir()
    gen = subprocess.run([cosign_bin(), "generate-key-pair"], cwd=keydir, capture_output=True, text=True,
                         timeout=60, env={**os.environ, "COSIGN_PASSWORD": "pw"})
    assert gen.returncode == 0, gen.stderr
    signed = run_cosign(tls_registry, "sign", "--key", str(keydir / "cosign.key"), "--tlog-upload=false", "-y",
                        f"{tls_registry.host}/{repo}@{out['digest']}", env={"COSIGN_PASSWORD": "pw"})
    assert signed.returncode == 0, signed.stderr

    b = pulling_node(tmp_path, tls_registry, "b",
                     keys={f"{tls_registry.host}/thaw/team-a": [str(keydir / "cosign.pub")]})
    remote = SnapshotRef.parse(f"{tls_registry.host}/{repo}:v1").remote
    assert remote is not None
    snap = distribution.pull(b.cfg, b.store, remote, owner="team-a")
    prov = b.store.provenance(snap)
    assert prov.kind == "signed" and prov.key == provenance.key_id(open(keydir / "cosign.pub", "rb").read())

    # thaw signing the same manifest adds its signature beside cosign's, which stays valid
    ours = Keys(a, tmp_path, "ours")
    configure(a, signing_key=ours.private)
    a.thaw("push", "--sign", "w:1", f"{tls_registry.host}/{repo}:v1", "-n", "team-a")
    ref = f"{tls_registry.host}/{repo}@{out['digest']}"
    for key in (str(keydir / "cosign.pub"), ours.public):
        ok = run_cosign(tls_registry, "verify", "--key", key, "--insecure-ignore-tlog", ref)
        assert ok.returncode == 0, ok.stderr


# --- attacks on pull -----------------------------------------------------------------------------

def copy_signature(site, from_repo: str, from_digest: str, to_repo: str, to_digest: str) -> None:
    """Put the .sig manifest (and its blobs) of from_repo's manifest under to_repo's .sig tag of
    to_digest: what an attacker with write access to a repository can do."""
    with site.client() as client:
        sig = client.get_manifest(from_repo, cosign.tag_for(from_digest), (cosign.MANIFEST_MEDIA_TYPE,))
        body = json.loads(sig.data)
        for d in [body["config"], *body["layers"]]:
            client.push_bytes(to_repo, client.fetch_bytes(from_repo, d["digest"]), d["digest"])
        client.put_manifest(to_repo, cosign.tag_for(to_digest), sig.data, cosign.MANIFEST_MEDIA_TYPE)


@pytest.mark.parametrize("attack", ["unsigned", "untrusted-key", "other-digest", "other-repository"])
def test_attacks_on_pull_are_refused_before_anything_is_fetched(attack, signer, tmp_path, tls_registry):
    a, keys = signer
    published(a, "w:1", 1 * MiB)
    repo = new_repo("thaw/team-a/w")
    target = f"{tls_registry.host}/{repo}:v1"
    if attack == "unsigned":
        a.thaw("push", "w:1", target, "-n", "team-a")
        expect = "carries no signature"
    elif attack == "untrusted-key":
        mallory = Keys(a, tmp_path, "mallory")
        configure(a, signing_key=mallory.private)
        signed_push(a, "w:1", target)
        expect = "verifies with none of the 1 key(s)"
    elif attack == "other-digest":
        published(a, "x:1", 1 * MiB)                          # a snapshot the key really signed
        signed_x = signed_push(a, "x:1", f"{tls_registry.host}/{repo}:x")
        digest = json_lines(a.thaw("push", "w:1", target, "-n", "team-a", "--json").stdout)[-1]["digest"]
        copy_signature(tls_registry, repo, signed_x, repo, digest)
        expect = f"a signature is for {signed_x}, not {digest}"
    else:
        signed_elsewhere = new_repo("thaw/team-a/signed")
        digest = signed_push(a, "w:1", f"{tls_registry.host}/{signed_elsewhere}:v1")
        a.thaw("push", "w:1", target, "-n", "team-a")
        copy_signature(tls_registry, signed_elsewhere, digest, repo, digest)
        expect = f"names repository {tls_registry.host}/{signed_elsewhere}, not {tls_registry.host}/{repo}"
    b = Node(tmp_path, "b", tls_registry, trust={"keys": {f"{tls_registry.host}/thaw/team-a": [keys.public]}},
             pull={"team-a": [f"{tls_registry.host}/thaw/team-a"]})
    err = b.thaw("pull", "-n", "team-a", target, check=False)
    assert err.returncode == 1 and expect in err.stderr, err.stderr
    [event] = untrusted_events(b)
    assert expect in event["reason"] and event["source"] == target
    assert_nothing_left(b)
    # and for a pod (pull on demand, what thaw-hook prepare runs): refused the same way
    result = prefetch.warm(b.cfg, SnapshotRef.parse(target), "team-a", pull=True)
    assert result["outcome"] == "pull_failed"
    assert any(expect in e.get("reason", "") for e in read_events(str(b.dir / "state")) if e["kind"] == "pull")
    assert_nothing_left(b)


# --- ownership: the node decides -----------------------------------------------------------------

def test_a_snapshot_claiming_another_owner_belongs_to_the_namespace_the_node_pulled_it_for(
        signer, tmp_path, tls_registry):
    a, keys = signer
    claims_b = published(a, "w:1", 1 * MiB, namespace="team-b")          # its config says team-b
    assert claims_b.config.namespace == "team-b"
    repo = new_repo("thaw/team-a/w")                                   # team-a's repository
    target = f"{tls_registry.host}/{repo}:v1"
    signed_push(a, "w:1", target, namespace="team-b")
    trust = {"keys": {f"{tls_registry.host}/thaw/team-a": [keys.public]}}
    b = Node(tmp_path, "b", tls_registry, trust=trust, pull={"team-a": [f"{tls_registry.host}/thaw/team-a"]})
    ref = SnapshotRef.parse(target)
    assert ref.remote is not None

    # pull on demand, for a team-a pod: owned by team-a; team-b cannot find it
    assert prefetch.warm(b.cfg, ref, "team-a", pull=True)["outcome"] in ("warm", "stopped")
    [row] = b.ls()
    assert row["namespace"] == "team-a" and row["charged_to"] == "team-a"
    with pytest.raises(Exception, match="not found in namespace team-b"):
        b.store.resolve(ref, "team-b", b.cfg.policy.readable_from("team-b"))
    # a team-b pod may not pull from team-a's repository at all
    with pytest.raises(distribution.PullRefused, match="may not pull"):
        distribution.pull(b.cfg, b.store, ref.remote, for_namespace="team-b")

    # an operator's pull without -n: the one namespace registry.pull grants the repository
    b.thaw("rm", target, "-n", "team-a")
    pulled = json_lines(b.thaw("pull", target, "--json").stdout)[-1]
    assert pulled["namespace"] == "team-a"
    c = Node(tmp_path, "c", tls_registry, trust=trust)                 # no registry.pull: must be named
    err = c.thaw("pull", target, check=False)
    assert err.returncode == 1 and "name the namespace" in err.stderr

    # import: the namespace the operator names, whatever the archive says
    archive = str(tmp_path / "w.tar")
    a.thaw("export", "w:1", archive, "-n", "team-b")
    out = c.thaw("import", archive, "-n", "team-a").stdout
    assert "into team-a (captured in team-b)" in out
    [row] = c.ls()
    assert row["namespace"] == "team-a" and row["provenance"]["kind"] == "signed"


# --- export and import carry signatures ----------------------------------------------------------

def test_export_and_import_carry_signatures(signer, tmp_path, tls_registry):
    a, keys = signer
    published(a, "w:1", 1 * MiB)
    repo = new_repo("thaw/team-a/w")
    digest = signed_push(a, "w:1", f"{tls_registry.host}/{repo}:v1")
    archive = str(tmp_path / "w.tar")
    a.thaw("export", "w:1", archive, "-n", "team-a")

    untrusting = pulling_node(tmp_path, tls_registry, "untrusting")
    err = untrusting.thaw("import", archive, "-n", "team-a", check=False)
    assert err.returncode == 1 and "no key is trusted for" in err.stderr, err.stderr
    assert untrusting_events_named(untrusting, "no key is trusted")
    assert_nothing_left(untrusting)

    b = pulling_node(tmp_path, tls_registry, "b", keys={f"{tls_registry.host}/thaw/team-a": [keys.public]})
    b.thaw("import", archive, "-n", "team-a")
    [row] = b.ls()
    assert row["digest"] == digest and row["provenance"] == {
        "kind": "signed", "source": f"{tls_registry.host}/{repo}", "key": keys.id, "time": row["provenance"]["time"]}
    inspected = json.loads(b.thaw("inspect", "w:1", "-n", "team-a").stdout)
    assert inspected["restorable"] and len(inspected["signatures"]) == 1
    # re-exported from b, the signature still travels
    again = str(tmp_path / "again.tar")
    b.thaw("export", "w:1", again, "-n", "team-a")
    c = pulling_node(tmp_path, tls_registry, "c", keys={f"{tls_registry.host}/thaw/team-a": [keys.public]})
    c.thaw("import", again, "-n", "team-a")
    assert c.ls()[0]["provenance"]["kind"] == "signed"


def untrusting_events_named(node: Node, text: str) -> bool:
    return any(text in e["reason"] for e in untrusted_events(node))


# --- keys: rotation and revocation ---------------------------------------------------------------

def test_key_rotation_then_revocation(signer, tmp_path, tls_registry):
    a, old = signer
    new = Keys(a, tmp_path, "ci-2")
    prefix = f"{tls_registry.host}/thaw/team-a"
    published(a, "old:1", 1 * MiB)
    published(a, "new:1", 1 * MiB)
    old_ref = f"{tls_registry.host}/{new_repo('thaw/team-a/old')}:v1"
    new_ref = f"{tls_registry.host}/{new_repo('thaw/team-a/new')}:v1"
    signed_push(a, "old:1", old_ref)
    configure(a, signing_key=new.private)
    signed_push(a, "new:1", new_ref)

    b = pulling_node(tmp_path, tls_registry, "b", keys={prefix: [old.public, new.public]})   # rotation
    for ref in (old_ref, new_ref):
        b.thaw("pull", "-n", "team-a", ref)
    assert {r["ref"]: (r["provenance"]["key"], r["restorable"]) for r in b.ls()} == {
        old_ref: (old.id, True), new_ref: (new.id, True)}

    configure(b, keys={prefix: [new.public]})                                        # old revoked
    rows = {r["ref"]: r for r in b.ls()}
    assert rows[new_ref]["restorable"] and not rows[old_ref]["restorable"]
    assert "no longer trusts" in rows[old_ref]["refused"]
    with pytest.raises(provenance.Untrusted, match="no longer trusts"):
        snap = b.store.resolve(SnapshotRef.parse(old_ref), "team-a")
        provenance.check_restorable(b.cfg, b.store.provenance(snap), old_ref)
    b.thaw("rm", old_ref, "-n", "team-a")
    err = b.thaw("pull", "-n", "team-a", old_ref, check=False)                     # and no new pull of it
    assert err.returncode == 1 and "verifies with none" in err.stderr


# --- restores: the check, with real runc and CRIU --------------------------------------------------

def strip_provenance(store_dir: str, ref: str, origin: str) -> None:
    """What a store from before provenance holds for `ref`: its origin, no provenance record."""
    path = os.path.join(store_dir, "layout", "index.json")
    index = json.load(open(path))
    for m in index["manifests"]:
        if m["annotations"]["org.opencontainers.image.ref.name"] == ref:
            m["annotations"].pop(PROVENANCE, None)
            m["annotations"]["dev.thaw.origin"] = origin
    with open(path, "w") as f:
        json.dump(index, f)


@pytest.mark.root
@pytest.mark.runc
@pytest.mark.criu
def test_captured_here_restores_an_unsigned_one_from_before_the_upgrade_cold_starts(thaw_env, tmp_path):
    src = thaw_env.container(make_bundle(str(tmp_path / "src"), COUNTER))
    assert src.create() == 0
    src.start()
    src.wait_output(lambda t: "tick 5" in t, timeout=30)
    thaw_env.thaw("capture", src.id, "--name", "counter:1", "--root", thaw_env.root)
    src.destroy()
    ann = {"thaw.dev/snapshot": "counter:1"}

    mine = thaw_env.container(make_bundle(str(tmp_path / "mine"), COUNTER, annotations=ann))
    assert mine.create() == 0 and "restored" in mine.log_text(), mine.log_text()     # captured here
    mine.destroy()

    strip_provenance(thaw_env.store, "counter:1", "captured")        # upgraded: its origin decides
    again = thaw_env.container(make_bundle(str(tmp_path / "again"), COUNTER, annotations=ann))
    assert again.create() == 0 and "restored" in again.log_text(), again.log_text()
    again.destroy()

    strip_provenance(thaw_env.store, "counter:1", "pulled:registry.example/thaw/counter:1")
    pulled = thaw_env.container(make_bundle(str(tmp_path / "pulled"), COUNTER, annotations=ann))
    assert pulled.create() == 0
    assert any("cold start" in e["msg"] and "unsigned, from registry.example/thaw/counter" in e["msg"]
               for e in pulled.log_entries()), pulled.log_text()
    [cold] = [e for e in events_of(thaw_env, "cold_start") if e["container"] == pulled.id]
    assert cold["code"] == "untrusted"
    assert thaw_env.runc_ids() == [pulled.id]             # a cold start: runc's own container, nothing else
    pulled.destroy()

    thaw_env.write_config(trust={"unsigned": ["registry.example/thaw"]})   # the explicit acceptance
    accepted = thaw_env.container(make_bundle(str(tmp_path / "accepted"), COUNTER, annotations=ann))
    assert accepted.create() == 0 and "restored" in accepted.log_text(), accepted.log_text()
    accepted.destroy()


def test_config_validates_trust(tmp_path):
    from thaw.shim.node.config import load
    from thaw.shim.node.config_schema import ConfigError
    for bad in ({"keys": {"no-slash": ["/k.pub"]}}, {"keys": {"r.example/x": ["relative.pub"]}},
                {"unsigned": ["anything"]}, {"signing_key": "relative.key"}):
        p = tmp_path / "c.yaml"
        p.write_text(yaml.safe_dump({"trust": bad}))
        with pytest.raises(ConfigError, match=r"trust\."):
            load(str(p))
    p = tmp_path / "ok.yaml"
    p.write_text(yaml.safe_dump({"trust": {"keys": {"r.example/team-a": ["/k.pub"]}, "unsigned": ["import"]}}))
    cfg = load(str(p))
    assert cfg.trust.keys_for("r.example/team-a/w") == ("/k.pub",) and cfg.trust.keys_for("r.example/team-ab") == ()
    assert cfg.trust.accepts_unsigned("import") and not cfg.trust.accepts_unsigned("r.example/team-a")


def test_signing_needs_a_key(tmp_path, tls_registry):
    a = Node(tmp_path, "a", tls_registry)
    published(a, "w:1", 1 * MiB)
    err = a.thaw("push", "--sign", "w:1", f"{tls_registry.host}/{new_repo()}:v1", "-n", "team-a", check=False)
    assert err.returncode == 1 and "trust.signing_key" in err.stderr and shutil.which("thaw")


def test_doctor_reports_unusable_keys(tmp_path, tls_registry):
    a = Node(tmp_path, "a", tls_registry)
    good = Keys(a, tmp_path, "good")
    bad = tmp_path / "bad.pub"
    bad.write_text("not a key\n")
    os.chmod(good.private, 0o644)
    configure(a, keys={"r.example/team-a": [good.public, str(bad)]}, signing_key=good.private)
    out = a.thaw("doctor", "--skip-containerd", check=False).stdout.splitlines()
    assert f"[  ok] trusted key: {good.public}: {good.id}" in out
    assert any(line.startswith("[FAIL] trusted key:") and "bad.pub" in line for line in out), out
    assert any(line.startswith("[FAIL] signing key:") and "chmod 600" in line for line in out), out


def test_entries_from_before_provenance_are_read_from_their_origin(tmp_path):
    """The upgrade's migration, for every origin a store recorded: only "captured" is trusted."""
    from helpers import fake_snapshot
    from thaw.shim.node.config import Config, Trust
    from thaw.shim.node.store import Store
    store = Store(str(tmp_path / "store")).init()
    origins = {"cap:1": "captured", "imp:1": "imported", "mig:1": "migrated",
               "pul:1": "pulled:registry.example/thaw/team-a/app:1"}
    for ref, origin in origins.items():
        fake_snapshot(store, ref, payload=ref.encode() * 100, origin=origin)
        strip_provenance(store.root, ref, origin)
    got = {s.ref: store.provenance(s) for s in store.snapshots()}
    assert {ref: (p.kind, p.source) for ref, p in got.items()} == {
        "cap:1": ("captured", ""), "imp:1": ("unsigned", "import"), "mig:1": ("unsigned", "thaw-0.1"),
        "pul:1": ("unsigned", "registry.example/thaw/team-a/app")}
    strict = Config()
    provenance.check_restorable(strict, got["cap:1"], "cap:1")
    for ref in ("imp:1", "mig:1", "pul:1"):
        with pytest.raises(provenance.Untrusted, match="unsigned, from"):
            provenance.check_restorable(strict, got[ref], ref)
    accepting = Config(trust=Trust(unsigned=("import", "thaw-0.1", "registry.example/thaw/team-a")))
    for ref in ("imp:1", "mig:1", "pul:1"):
        provenance.check_restorable(accepting, got[ref], ref)
    with pytest.raises(provenance.Untrusted):       # a prefix is matched on whole path components
        provenance.check_restorable(Config(trust=Trust(unsigned=("registry.example/thaw/team",))), got["pul:1"], "p")
