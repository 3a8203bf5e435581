"""Every way a restore can be wrong ends in a cold start with the reason in runc's log file, or,
with thaw.dev/required, in a failed create that leaves nothing behind."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from helpers import make_bundle, unique

pytestmark = [pytest.mark.root, pytest.mark.runc, pytest.mark.criu]

COUNTER = ["sh", "-c", "i=0; while true; do echo tick $i; i=$((i+1)); sleep 0.05; done"]
COLD = ["sh", "-c", "echo cold start; exec sleep 1000"]


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    """One captured snapshot per module; each test works on its own copy of the store."""
    from conftest import ThawEnv
    d = tmp_path_factory.mktemp("golden")
    env = ThawEnv(dir=str(d), config=str(d / "config.yaml"), store=str(d / "store"),
                  state=str(d / "state"), root=str(d / "runc-root"))
    env.write_config()
    ann = {"io.kubernetes.cri.sandbox-namespace": "team-a"}
    bundle = make_bundle(str(d / "src"), COUNTER, annotations=ann)
    src = env.container(bundle)
    assert src.create() == 0
    src.start()
    src.wait_output(lambda t: "tick 10" in t)
    env.thaw("capture", src.id, "--name", "snap:1", "--root", env.root)
    src.destroy()
    return env


@pytest.fixture
def env(thaw_env, golden):
    shutil.copytree(golden.store, thaw_env.store, symlinks=True)
    return thaw_env


def events(env) -> list[dict]:
    return [json.loads(line) for line in open(os.path.join(env.state, "events.log"))]


def snapshot_info(env) -> dict:
    return json.loads(env.thaw("inspect", "snap:1").stdout)


def rootfs_listing(bundle: str) -> list[str]:
    out = []
    for d, dirs, files in os.walk(os.path.join(bundle, "rootfs")):
        out += [os.path.relpath(os.path.join(d, n), bundle) for n in dirs + files]
    return sorted(out)


def attempt(env, tmp_path, annotations, required=False, bundle_kw=None):
    ann = {"io.kubernetes.cri.sandbox-namespace": "team-a", **annotations}
    if required:
        ann["thaw.dev/required"] = "true"
    bundle = make_bundle(str(tmp_path / unique("b")), COLD, annotations=ann, **(bundle_kw or {}))
    before = rootfs_listing(bundle)
    c = env.container(bundle)
    rc = c.create()
    return c, rc, before


def assert_cold_start(env, c, rc, reason_words):
    assert rc == 0, c.log_text()
    warnings = [e for e in c.log_entries() if e.get("level") == "warning"]
    assert warnings, c.log_text()
    msg = warnings[-1]["msg"]
    assert "cold start" in msg and all(w in msg for w in reason_words), msg
    assert warnings[-1]["time"].endswith("Z")
    c.start()
    out = c.wait_output(lambda t: "cold start" in t)
    assert "tick" not in out
    assert env.runc_ids() == [c.id]                 # no half-restored container left
    record = json.load(open(os.path.join(env.state, "containers", c.id + ".json")))
    assert record["phase"] == "cold" and record["cold_reason"]
    c.destroy()
    assert env.state_entries() == []                # delete cleared thaw's state
    ends = [e for e in events(env) if e["kind"] == "finished"]
    assert ends[-1]["container"] == c.id and ends[-1]["restored"] is False


def assert_clean_failure(env, c, rc, before, reason_words):
    assert rc != 0
    errors = [e for e in c.log_entries() if e.get("level") == "error"]
    assert errors and "required" in errors[-1]["msg"], c.log_text()
    assert all(w in errors[-1]["msg"] for w in reason_words), errors[-1]["msg"]
    assert c.id not in env.runc_ids() and env.state_entries() == []
    assert rootfs_listing(c.bundle) == before       # the rootfs diff was undone
    spec = json.load(open(os.path.join(c.bundle, "config.json")))
    assert "hooks" not in spec                      # config.json as containerd wrote it


def corrupt_unknown(env):
    return {"thaw.dev/snapshot": "nope:1"}, ["nope:1", "not found"]


def corrupt_malformed(env):
    return {"thaw.dev/snapshot": "Not A Valid Name!"}, ["invalid snapshot name"]


def corrupt_flipped_cache(env):
    info = snapshot_info(env)
    criu = next(l for l in info["layers"] if "criu" in l["mediaType"])
    layer = os.path.join(env.store, "layers", criu["digest"].split(":")[1])
    pages = max((os.path.join(layer, n) for n in os.listdir(layer)), key=os.path.getsize)
    with open(pages, "r+b") as f:
        f.seek(os.path.getsize(pages) // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0xFF]))
    return {"thaw.dev/snapshot": "snap:1"}, ["modified after it was sealed"]


def corrupt_flipped_rootfs_blob(env):
    info = snapshot_info(env)
    rootfs = next(l for l in info["layers"] if "rootfs.diff" in l["mediaType"])
    blob = os.path.join(env.store, "layout", "blobs", "sha256", rootfs["digest"].split(":")[1])
    os.chmod(blob, 0o600)
    data = bytearray(open(blob, "rb").read())
    data[len(data) // 3] ^= 0x01
    open(blob, "wb").write(bytes(data))
    return {"thaw.dev/snapshot": "snap:1"}, ["rootfs layer", "corrupt"]


def corrupt_truncated(env):
    info = snapshot_info(env)
    criu = next(l for l in info["layers"] if "criu" in l["mediaType"])
    layer = os.path.join(env.store, "layers", criu["digest"].split(":")[1])
    pages = max((os.path.join(layer, n) for n in os.listdir(layer)), key=os.path.getsize)
    os.truncate(pages, os.path.getsize(pages) // 2)
    return {"thaw.dev/snapshot": "snap:1"}, ["truncated"]


def corrupt_flipped_criu_blob_uncached(env):
    """The cached layer is gone and the blob it would be rebuilt from is damaged."""
    info = snapshot_info(env)
    criu = next(l for l in info["layers"] if "criu" in l["mediaType"])
    hexd = criu["digest"].split(":")[1]
    shutil.rmtree(os.path.join(env.store, "layers", hexd))
    blob = os.path.join(env.store, "layout", "blobs", "sha256", hexd)
    os.chmod(blob, 0o600)
    with open(blob, "r+b") as f:
        f.seek(os.path.getsize(blob) // 2)
        f.write(b"\xde\xad")
    return {"thaw.dev/snapshot": "snap:1"}, ["does not match its digest"]


def corrupt_image_mismatch(env):
    return {"thaw.dev/snapshot": "snap:1", "io.kubernetes.cri.image-name": "other/image:2"}, ["image"]


def corrupt_criu_image_content(env):
    """A snapshot whose CRIU images are structurally broken but whose seal is intact: CRIU itself
    fails, and the runc container it began is removed."""
    info = snapshot_info(env)
    criu = next(l for l in info["layers"] if "criu" in l["mediaType"])
    hexd = criu["digest"].split(":")[1]
    layer = os.path.join(env.store, "layers", hexd)
    inv = os.path.join(layer, "inventory.img")
    st = os.stat(inv)
    with open(inv, "r+b") as f:
        f.write(b"\0" * 8)                  # wreck the magic
    os.utime(inv, ns=(st.st_atime_ns, st.st_mtime_ns))   # as if the seal could not see it
    return {"thaw.dev/snapshot": "snap:1"}, ["runc restore"]


CASES = {
    "unknown": corrupt_unknown,
    "malformed": corrupt_malformed,
    "flipped-cached-layer": corrupt_flipped_cache,
    "flipped-rootfs-blob": corrupt_flipped_rootfs_blob,
    "truncated-image": corrupt_truncated,
    "flipped-criu-blob": corrupt_flipped_criu_blob_uncached,
    "fingerprint-image": corrupt_image_mismatch,
    "criu-fails": corrupt_criu_image_content,
}


@pytest.mark.parametrize("case", CASES)
def test_cold_start(env, tmp_path, case):
    annotations, words = CASES[case](env)
    c, rc, _ = attempt(env, tmp_path, annotations)
    assert_cold_start(env, c, rc, words)


@pytest.mark.parametrize("case", CASES)
def test_required_fails_cleanly(env, tmp_path, case):
    annotations, words = CASES[case](env)
    c, rc, before = attempt(env, tmp_path, annotations, required=True)
    assert_clean_failure(env, c, rc, before, words)


def test_mount_mismatch_cold_starts(env, tmp_path):
    extra = {"python": True}      # adds a /usr bind mount the snapshot did not have
    c, rc, _ = attempt(env, tmp_path, {"thaw.dev/snapshot": "snap:1"}, bundle_kw=extra)
    assert rc == 0
    msg = [e for e in c.log_entries() if e.get("level") == "warning"][-1]["msg"]
    assert "mounts" in msg and "/usr" in msg
    c.destroy()


def test_other_namespace_cold_starts_unless_policy_allows(env, tmp_path):
    c, rc, _ = attempt(env, tmp_path, {"thaw.dev/snapshot": "snap:1",
                                       "io.kubernetes.cri.sandbox-namespace": "team-b"})
    assert_cold_start(env, c, rc, ["namespace", "team-a", "team-b"])

    env.write_config(policy={"allow_cross_namespace": True})
    c, rc, _ = attempt(env, tmp_path, {"thaw.dev/snapshot": "snap:1",
                                       "io.kubernetes.cri.sandbox-namespace": "team-b"})
    assert rc == 0
    c.start()
    assert "tick" in c.wait_output(lambda t: "tick" in t)
    c.destroy()


def test_same_snapshot_still_restores_after_all_that(env, tmp_path):
    """Sanity check of the fixture: the untouched copy restores."""
    c, rc, _ = attempt(env, tmp_path, {"thaw.dev/snapshot": "snap:1"})
    assert rc == 0, c.log_text()
    c.start()
    assert "cold start" not in c.wait_output(lambda t: "tick" in t)
    c.destroy()
    assert env.state_entries() == []
