"""Pins of the registry client and the store as a pull and push use them, against the real registry
(Debian's docker-registry with TLS and htpasswd, from the registry fixtures): what a resume record
may be used for, a changed credentials file, no cross-registry mount, a layer checked by digest,
file name and size, a half-finished unpack, the pushed mark, `registry.pull_timeout`. Each is a
break that bench/mutations.py applies; test_registry_pins.py plays the misbehaving registries."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import time

import pytest
import yaml

_TESTS = os.path.dirname(os.path.abspath(__file__))
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

from registry_fixture.server import PASSWORD, USER, new_repo  # noqa: E402

from helpers import fake_snapshot, make_bundle  # noqa: E402
from thaw.oci import snapshot as fmt  # noqa: E402
from thaw.oci.annotations import SnapshotRef  # noqa: E402
from thaw.shim.lifecycle import distribution  # noqa: E402
from thaw.shim.node.config import load  # noqa: E402
from thaw.shim.node.store import Store  # noqa: E402
from thaw.shim.registry import transfer  # noqa: E402
from thaw.shim.registry.blobs import BlobRange  # noqa: E402
from thaw.shim.registry.errors import DigestMismatchError  # noqa: E402

pytest_plugins = ["registry_fixture.fixtures"]
pytestmark = pytest.mark.registry
NS = "team-a"


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def auth_file(path, *hosts: str, password: str = PASSWORD) -> str:
    token = base64.b64encode(f"{USER}:{password}".encode()).decode()
    with open(path, "w") as f:
        json.dump({"auths": {h: {"auth": token} for h in hosts}}, f)
    return str(path)


class Node:
    """A node's thaw: config (store, state, registry settings) and CLI."""

    def __init__(self, tmp_path, name: str, site, auth: str | None = None):
        self.dir = tmp_path / name
        self.dir.mkdir()
        self.config = str(self.dir / "config.yaml")
        with open(self.config, "w") as f:
            yaml.safe_dump({"store_dir": str(self.dir / "store"), "state_dir": str(self.dir / "state"),
                            "registry": {"auth_file": auth or site.auth_config, "ca_file": site.ca.ca},
                            "trust": {"unsigned": [f"{site.host}/"]}}, f)

    @property
    def store(self) -> Store:
        return Store.for_config(load(self.config))

    def thaw(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        p = subprocess.run(["thaw", *args], capture_output=True, text=True, timeout=300,
                           env={**os.environ, "THAW_CONFIG": self.config})
        if check and p.returncode != 0:
            raise AssertionError(f"thaw {' '.join(args)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
        return p


# --- registry client -------------------------------------------------------------------------------

def test_a_resume_record_is_used_only_for_the_blob_path_and_offset_it_was_written_for(tls_registry, tmp_path):
    """Two blobs share their first half. A record of that half, written for one (blob, file,
    offset), resumes that one (the control) and nothing else: another blob at the same place,
    the same blob in another file, or at another offset of the same file, is fetched whole, even
    though the bytes there would hash to the recorded prefix."""
    head = os.urandom(150_000)
    one, two = head + os.urandom(150_000), head + os.urandom(150_000)
    repo = new_repo()
    with tls_registry.client() as c:
        d1, d2 = c.push_bytes(repo, one), c.push_bytes(repo, two)
        size = len(two)

        def pull(recorded: BlobRange, wanted: BlobRange) -> int:
            for b in (recorded, wanted):                  # the shared half, where each range starts
                with open(b.path, "ab") as f:
                    pass
                with open(b.path, "r+b") as f:
                    f.seek(b.offset)
                    f.write(head)
            journal = str(tmp_path / f"journal-{time.monotonic_ns()}")
            transfer.Journal(journal).record(recorded, len(head), sha256(head))
            progress = transfer.pull_blobs(c, repo, [wanted], journal=journal)
            with open(wanted.path, "rb") as f:
                f.seek(wanted.offset)
                assert f.read(size) == two
            return progress.blobs[transfer.Journal.key(wanted)].reused

        a, b = str(tmp_path / "a"), str(tmp_path / "b")
        assert pull(BlobRange(d2, a, 0, size), BlobRange(d2, a, 0, size)) == len(head)       # its own
        assert pull(BlobRange(d1, a, 0, size), BlobRange(d2, a, 0, size)) == 0               # another blob
        assert pull(BlobRange(d2, a, 0, size), BlobRange(d2, b, 0, size)) == 0               # another file
        assert pull(BlobRange(d2, a, 0, size), BlobRange(d2, a, 1 << 20, size)) == 0         # another offset


def test_a_layer_is_checked_by_its_size_before_any_byte_is_written(tls_registry, tmp_path):
    """A descriptor's size that is not the blob's: refused on the registry's Content-Length,
    before a byte lands in the range (a byte more or less would otherwise be read, or waited for)."""
    data = os.urandom(100_000)
    repo = new_repo()
    with tls_registry.client() as c:
        digest = c.push_bytes(repo, data)
        for size in (len(data) - 1, len(data) + 1):
            out = tmp_path / f"out-{size}"
            with pytest.raises(DigestMismatchError, match=f"but the blob has {size}"):
                c.download_blob(repo, BlobRange(digest, str(out), 0, size))
            assert out.stat().st_size == 0
        c.download_blob(repo, BlobRange(digest, str(tmp_path / "good"), 0, len(data)))     # the control
        assert (tmp_path / "good").read_bytes() == data


def test_a_part_layer_with_a_bad_file_name_is_refused_before_any_fetch(tls_registry, tmp_path):
    """A manifest whose file part names a path out of the image directory: the pull refuses it
    and nothing is written anywhere (the name is checked, as are its digest and size)."""
    a, b = Node(tmp_path, "a", tls_registry), Node(tmp_path, "b", tls_registry)
    fake_snapshot(a.store.init(), "app:1")
    repo = new_repo()
    a.thaw("push", "app:1", f"{tls_registry.host}/{repo}:v1")
    part = os.urandom(4096)
    with tls_registry.client() as c:
        manifest = json.loads(c.get_manifest(repo, "v1").data)
        manifest["layers"].insert(1, {"mediaType": fmt.CRIU_PART_LAYER, "digest": c.push_bytes(repo, part),
                                      "size": len(part), "annotations": {fmt.PART_FILE: "../../escape.img",
                                                                         fmt.PART_OFFSET: "0"}})
        c.put_manifest(repo, "evil", json.dumps(manifest).encode())
    p = b.thaw("pull", f"{tls_registry.host}/{repo}:evil", "-n", NS, check=False)
    assert p.returncode != 0 and "bad file name" in p.stderr, p.stderr
    assert [f for _, _, fs in os.walk(b.dir) for f in fs if "escape" in f] == []
    assert b.store.snapshots() == []


def test_a_changed_credentials_file_is_read_again(tls_registry, tmp_path):
    """One process (thaw-runtime's background pull, a daemon) pulling again after the operator
    fixed, or revoked, the credentials file: each pull reads the file as it is now."""
    a = Node(tmp_path, "a", tls_registry)
    fake_snapshot(a.store.init(), "app:1")
    source = f"{tls_registry.host}/{new_repo()}:v1"
    a.thaw("push", "app:1", source)
    creds = tmp_path / "auth.json"
    b = Node(tmp_path, "b", tls_registry, auth=str(creds))
    cfg, remote = load(b.config), SnapshotRef.registry(source).remote
    assert remote is not None

    def pull():
        return distribution.pull(cfg, Store.for_config(cfg), remote, owner=NS)
    auth_file(creds, tls_registry.host, password="wrong")
    with pytest.raises(distribution.DistributionError, match=r"refused|401"):
        pull()
    auth_file(creds, tls_registry.host)
    assert pull().manifest.digest
    auth_file(creds, tls_registry.host, password="revoked")
    with pytest.raises(distribution.DistributionError, match=r"refused|401"):
        pull()


def test_a_cross_registry_mount_is_never_attempted(tls_registry, fresh_registry, tmp_path):
    """A snapshot pulled from registry A, pushed to registry B: B is never asked to mount from
    A's repository (B would look up that name in its own storage: another owner's repository, or
    none). Pushed to another repository of A, the mount is asked for (the control)."""
    creds = auth_file(tmp_path / "auth.json", tls_registry.host, fresh_registry.host)
    a, b = Node(tmp_path, "a", tls_registry, creds), Node(tmp_path, "b", tls_registry, creds)
    fake_snapshot(a.store.init(), "app:1")
    repo_a = new_repo()
    a.thaw("push", "app:1", f"{tls_registry.host}/{repo_a}:v1")
    b.thaw("pull", f"{tls_registry.host}/{repo_a}:v1", "-n", NS)
    pulled = f"{tls_registry.host}/{repo_a}:v1"
    b.thaw("push", pulled, f"{fresh_registry.host}/{new_repo()}:v1", "-n", NS)
    assert fresh_registry.log_lines("mount=") == []
    assert tls_registry.log_lines(f"from={repo_a.replace('/', '%2F')}") == []
    b.thaw("push", pulled, f"{tls_registry.host}/{new_repo()}:v1", "-n", NS)
    assert tls_registry.log_lines(f"from={repo_a.replace('/', '%2F')}")


# --- store ---------------------------------------------------------------------------------------------

def test_the_pushed_mark_is_set_only_after_the_upload_completed(tls_registry, tmp_path):
    """A push the registry refuses leaves the snapshot unpushed (and so never evicted as if the
    registry held it); the same push with credentials that work marks it."""
    creds = tmp_path / "auth.json"
    a = Node(tmp_path, "a", tls_registry, auth=str(creds))
    store = a.store.init()
    fake_snapshot(store, "app:1")
    target = f"{tls_registry.host}/{new_repo()}:v1"
    auth_file(creds, tls_registry.host, password="wrong")
    assert a.thaw("push", "app:1", target, check=False).returncode != 0
    [snap] = store.snapshots()
    assert store.pushed(snap) == "" and store.evict(1) == []
    auth_file(creds, tls_registry.host)
    a.thaw("push", "app:1", target)
    assert store.pushed(store.snapshots()[0]) == target


def test_a_half_finished_unpack_is_never_used(tls_registry, tmp_path):
    """A pull killed while it unpacked the CRIU files into its pull area leaves a file cut short
    (here: half the real one, then garbage) and one the tar does not hold; the pull run again
    unpacks afresh, and what it publishes is byte for byte the snapshot."""
    a, b = Node(tmp_path, "a", tls_registry), Node(tmp_path, "b", tls_registry)
    snap = fake_snapshot(a.store.init(), "app:1", payload=os.urandom(300_000))
    source = f"{tls_registry.host}/{new_repo()}:v1"
    a.thaw("push", "app:1", source)
    env = {**os.environ, "THAW_CONFIG": b.config, "THAW_TEST_FAULTS": "unpack=kill"}
    p = subprocess.run(["thaw", "pull", source, "-n", NS], env=env, capture_output=True, timeout=120)
    assert p.returncode == -9, p.stderr
    [area] = [os.path.join(r, "images") for r, ds, _ in os.walk(b.dir / "store") if "images" in ds and "journal.json"
              in os.listdir(r)]
    with a.store.image_dir(snap) as src:
        original = {n: open(os.path.join(src, n), "rb").read() for n in os.listdir(src)}
    whole = sorted(n for n in original if n not in snap.files())
    with open(os.path.join(area, whole[0]), "wb") as f:
        f.write(original[whole[0]][:len(original[whole[0]]) // 2] + b"\0garbage" * 1000)
    with open(os.path.join(area, "stray.img"), "wb") as f:
        f.write(b"not in the snapshot")
    b.thaw("pull", source, "-n", NS)
    [pulled] = b.store.snapshots()
    with b.store.image_dir(pulled, verify="digest") as dst:
        assert {n: open(os.path.join(dst, n), "rb").read() for n in os.listdir(dst)} == original


def test_a_pull_killed_between_moving_its_image_directory_and_sealing_it_is_redone(tls_registry, tmp_path):
    """The image directory is in place but has no seal yet (and no index entry names it): the
    pull run again must not take it for the snapshot being here already."""
    a, b = Node(tmp_path, "a", tls_registry), Node(tmp_path, "b", tls_registry)
    snap = fake_snapshot(a.store.init(), "app:1", payload=os.urandom(300_000))
    source = f"{tls_registry.host}/{new_repo()}:v1"
    a.thaw("push", "app:1", source)
    env = {**os.environ, "THAW_CONFIG": b.config, "THAW_TEST_FAULTS": "image_dir_moved=kill"}
    p = subprocess.run(["thaw", "pull", source, "-n", NS], env=env, capture_output=True, timeout=120)
    assert p.returncode == -9, p.stderr
    b.thaw("pull", source, "-n", NS)
    [pulled] = b.store.snapshots()
    with a.store.image_dir(snap) as src, b.store.image_dir(pulled, verify="digest") as dst:
        assert {n: open(os.path.join(dst, n), "rb").read() for n in os.listdir(dst)} == \
            {n: open(os.path.join(src, n), "rb").read() for n in os.listdir(src)}


# --- thaw-runtime: thaw.dev/pull: wait -----------------------------------------------------------------

@pytest.mark.root
@pytest.mark.runc
def test_a_create_waits_for_a_pull_at_most_pull_timeout(thaw_env, tmp_path, tls_registry):
    """`thaw.dev/pull: wait` for a snapshot that never arrives (the registry has no such tag): the
    create waits registry.pull_timeout (2 s), not the pull's deadline (300 s), then cold-starts."""
    target = f"{tls_registry.host}/{new_repo('thaw/local/r')}:v1"
    thaw_env.write_config(registry={"auth_file": tls_registry.auth_config, "ca_file": tls_registry.ca.ca,
                                    "pull": {"_local": [f"{tls_registry.host}/thaw/local"]},
                                    "pull_timeout": 2, "pull_deadline": 300})
    c = thaw_env.container(make_bundle(str(tmp_path / "c"), ["sleep", "100"],
                                       annotations={"thaw.dev/snapshot": target, "thaw.dev/pull": "wait"}))
    t = time.monotonic()
    assert c.create(timeout=60) == 0, c.log_text()
    took = time.monotonic() - t
    try:
        assert 2 <= took < 60, took
        assert "cold start" in c.log_text()
    finally:
        c.destroy()
