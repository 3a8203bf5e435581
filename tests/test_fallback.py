"""Every way a restore can be wrong ends in a cold start with the reason in runc's log file, or,
with thaw.dev/required, in a failed create that leaves nothing behind."""

from __future__ import annotations

import json
import os
import re
import shutil

import pytest

from helpers import make_bundle, tree_digest, unique

pytestmark = [pytest.mark.root, pytest.mark.runc, pytest.mark.criu]

# The captured program writes a file first, so the snapshot's rootfs diff is not empty: a restore
# applies it, and a failed one must take it back out.
COUNTER = ["sh", "-c", "echo written > /tmp/state; i=0; while true; do echo tick $i; i=$((i+1)); sleep 0.05; done"]


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    """One captured snapshot per module; each test works on its own copy of the store."""
    from conftest import ThawEnv
    d = tmp_path_factory.mktemp("golden")
    env = ThawEnv.in_dir(d)
    ann = {"io.kubernetes.cri.sandbox-namespace": "team-a"}
    bundle = make_bundle(str(d / "src"), COUNTER, annotations=ann)
    src = env.container(bundle)
    assert src.create() == 0
    src.start()
    src.wait_output(lambda t: "tick 10" in t)
    env.thaw("capture", src.id, "--name", "snap:1", "--root", env.root)
    src.destroy()
    assert snapshot_info(env)["config"]["sizes"]["rootfs_entries"] == 2       # tmp, tmp/state
    return env


@pytest.fixture
def env(thaw_env, golden):
    shutil.copytree(golden.store, thaw_env.store, symlinks=True)
    return thaw_env


def events(env) -> list[dict]:
    return [json.loads(line) for line in open(os.path.join(env.state, "events.log"))]


def snapshot_info(env) -> dict:
    return json.loads(env.thaw("inspect", "snap:1", "-n", "team-a").stdout)


def image_dir(env) -> str:
    return os.path.join(env.store, "images", snapshot_info(env)["manifest"].split(":")[1])


def writable(path: str) -> str:
    os.chmod(path, 0o600)
    return path


def attempt(env, tmp_path, annotations, required=False, bundle_kw=None):
    ann = {"io.kubernetes.cri.sandbox-namespace": "team-a", **annotations}
    if required:
        ann["thaw.dev/required"] = "true"
    # The snapshot's own command: a restore continues its count, a cold start counts from 0.
    bundle = make_bundle(str(tmp_path / unique("b")), COUNTER, annotations=ann, **(bundle_kw or {}))
    before = tree_digest(os.path.join(bundle, "rootfs"))
    c = env.container(bundle)
    rc = c.create()
    return c, rc, before


def first_tick(c) -> int:
    m = re.search(r"tick (\d+)", c.wait_output(lambda t: "tick" in t))
    assert m is not None
    return int(m.group(1))


def assert_cold_start(env, c, rc, before, reason_words):
    assert rc == 0, c.log_text()
    assert tree_digest(os.path.join(c.bundle, "rootfs")) == before   # the cold start sees the image's rootfs
    warnings = [e for e in c.log_entries() if e.get("level") == "warning" and e["msg"].startswith("thaw:")]
    assert warnings, c.log_text()
    msg = warnings[-1]["msg"]
    assert "cold start" in msg and all(w in msg for w in reason_words), msg
    assert warnings[-1]["time"].endswith("Z")
    c.start()
    assert first_tick(c) == 0                        # a genuine cold start
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
    assert tree_digest(os.path.join(c.bundle, "rootfs")) == before   # the rootfs diff was undone
    spec = json.load(open(os.path.join(c.bundle, "config.json")))
    assert "hooks" not in spec                      # config.json as containerd wrote it


def corrupt_unknown(env):
    return {"thaw.dev/snapshot": "nope:1"}, ["nope:1", "not found"]


def corrupt_malformed(env):
    return {"thaw.dev/snapshot": "Not A Valid Name!"}, ["invalid snapshot name"]


def corrupt_flipped_rootfs_blob(env):
    info = snapshot_info(env)
    rootfs = next(layer for layer in info["layers"] if "rootfs.diff" in layer["mediaType"])
    blob = writable(os.path.join(env.store, "layout", "blobs", "sha256", rootfs["digest"].split(":")[1]))
    data = bytearray(open(blob, "rb").read())
    data[len(data) // 3] ^= 0x01
    open(blob, "wb").write(bytes(data))
    return {"thaw.dev/snapshot": "snap:1"}, ["rootfs layer", "corrupt"]


def corrupt_image_gone(env):
    """The one copy of the CRIU files is gone: the snapshot is unpublished, the pod cold-starts."""
    shutil.rmtree(image_dir(env))
    return {"thaw.dev/snapshot": "snap:1"}, ["image directory is gone", "removed"]


def corrupt_file_and_its_tar(env):
    """A damaged CRIU file whose verified source (the whole-file tar) is damaged too."""
    info = snapshot_info(env)
    pages = writable(os.path.join(image_dir(env), "pages-1.img"))
    os.truncate(pages, os.path.getsize(pages) // 2)
    whole = next(layer for layer in info["layers"] if "criu.images" in layer["mediaType"])
    blob = writable(os.path.join(env.store, "layout", "blobs", "sha256", whole["digest"].split(":")[1]))
    with open(blob, "r+b") as f:
        f.seek(os.path.getsize(blob) // 2)
        f.write(b"\xde\xad")
    return {"thaw.dev/snapshot": "snap:1"}, ["CRIU layer", "corrupt"]


def corrupt_image_mismatch(env):
    return {"thaw.dev/snapshot": "snap:1", "io.kubernetes.cri.image-name": "other/image:2"}, ["image"]


def corrupt_criu_image_content(env):
    """A snapshot whose CRIU images are structurally broken but whose seal is intact: CRIU itself
    fails, and the runc container it began is removed."""
    mm = writable(os.path.join(image_dir(env), "mm-1.img"))
    st = os.stat(mm)
    with open(mm, "r+b") as f:
        f.seek(8)                           # past the header thaw's image check reads: CRIU's to fail on
        f.write(b"\xff" * 8)
    os.utime(mm, ns=(st.st_atime_ns, st.st_mtime_ns))   # as if the seal could not see it
    return {"thaw.dev/snapshot": "snap:1"}, ["runc restore"]


CASES = {
    "unknown": corrupt_unknown,
    "malformed": corrupt_malformed,
    "flipped-rootfs-blob": corrupt_flipped_rootfs_blob,
    "image-gone": corrupt_image_gone,
    "file-and-tar-damaged": corrupt_file_and_its_tar,
    "fingerprint-image": corrupt_image_mismatch,
    "criu-fails": corrupt_criu_image_content,
}


@pytest.mark.parametrize("case", CASES)
def test_cold_start(env, tmp_path, case):
    annotations, words = CASES[case](env)
    c, rc, before = attempt(env, tmp_path, annotations)
    assert_cold_start(env, c, rc, before, words)


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


def test_a_damaged_file_is_rebuilt_and_the_restore_goes_on(env, tmp_path):
    pages = writable(os.path.join(image_dir(env), "pages-1.img"))
    with open(pages, "r+b") as f:
        f.seek(os.path.getsize(pages) // 2)
        f.write(b"\xff\xfe")
    c, rc, _ = attempt(env, tmp_path, {"thaw.dev/snapshot": "snap:1"})
    assert rc == 0 and not [e for e in c.log_entries() if e.get("level") == "warning"], c.log_text()
    c.start()
    assert first_tick(c) > 10                        # restored: the count goes on
    assert any(e["kind"] == "store" and "rebuilt pages-1.img" in e["msg"] for e in events(env))
    c.destroy()


def test_other_namespace_cold_starts_unless_policy_shares(env, tmp_path):
    c, rc, before = attempt(env, tmp_path, {"thaw.dev/snapshot": "snap:1",
                                            "io.kubernetes.cri.sandbox-namespace": "team-b"})
    assert_cold_start(env, c, rc, before, ["not found", "team-b"])

    env.write_config(policy={"share": {"team-a": ["team-b"]}})
    c, rc, _ = attempt(env, tmp_path, {"thaw.dev/snapshot": "snap:1",
                                       "io.kubernetes.cri.sandbox-namespace": "team-b"})
    assert rc == 0
    c.start()
    assert first_tick(c) > 10
    c.destroy()


def test_a_container_of_no_namespace_does_not_get_a_namespace_s_snapshot(env, tmp_path):
    c, rc, before = attempt(env, tmp_path, {"thaw.dev/snapshot": "snap:1", "io.kubernetes.cri.sandbox-namespace": ""})
    assert_cold_start(env, c, rc, before, ["not found", "_local"])


def test_policy_required_in_the_node_config_refuses(env, tmp_path):
    env.write_config(policy={"required": True})
    c, rc, before = attempt(env, tmp_path, {"thaw.dev/snapshot": "nope:1"})
    assert_clean_failure(env, c, rc, before, ["nope:1", "not found"])


def flip_keeping_size_and_mtime(path: str) -> None:
    st = os.stat(path)
    writable(path)
    with open(path, "r+b") as f:
        f.seek(st.st_size // 2)
        byte = f.read(1)
        f.seek(st.st_size // 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_policy_verify_digest_checks_the_files_before_a_restore(env, tmp_path):
    """A changed byte that keeps size and mtime passes the stat seal (the default, a documented
    tradeoff); with `verify: digest` the file is found changed and rebuilt from its verified tar
    before CRIU reads it."""
    flip_keeping_size_and_mtime(os.path.join(image_dir(env), "pages-1.img"))
    env.write_config(policy={"verify": "digest"})
    c, rc, _ = attempt(env, tmp_path, {"thaw.dev/snapshot": "snap:1"})
    assert rc == 0 and not [e for e in c.log_entries() if e.get("level") == "warning"], c.log_text()
    assert [e["msg"] for e in events(env) if e["kind"] == "store"] == [
        "snapshot snap:1 (team-a): image directory failed its seal; rebuilt pages-1.img"]
    c.start()
    assert first_tick(c) > 10
    c.destroy()


def test_same_snapshot_still_restores_after_all_that(env, tmp_path):
    """Sanity check of the fixture: the untouched copy restores."""
    c, rc, _ = attempt(env, tmp_path, {"thaw.dev/snapshot": "snap:1"})
    assert rc == 0, c.log_text()
    c.start()
    assert first_tick(c) > 10
    c.destroy()
    assert env.state_entries() == []
