"""Faults injected for real (runc, CRIU, overlay rootfs): thaw-runtime and `thaw capture` killed
with SIGKILL at each phase, a pod deleted mid auto-capture, full disks, concurrency. After each:
no runc container, record, mount, process, cgroup, applied diff or temp blob is left, nothing is
half-published, and the same id works again. Faults are placed by test-only points
(shim/faults.py) where timing alone would be flaky."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import threading
import time

import pytest

from helpers import make_bundle, overlay_bundle, tree_digest, umount_overlay, unique, wait_for

pytestmark = [pytest.mark.root, pytest.mark.runc, pytest.mark.criu]

# The captured program changes its rootfs: adds /data/state.txt, deletes the image's /etc/motd and
# /etc/conf.d (a directory), replaces /etc/app.conf. A restore applies that diff; undo reverses it.
SOURCE = ["sh", "-c", "mkdir -p /data; echo restored-state > /data/state.txt; rm -f /etc/motd; "
          "rm -rf /etc/conf.d; echo changed > /etc/app.conf; i=0; "
          "while true; do echo tick $i; i=$((i+1)); sleep 0.05; done"]


def ticks(text: str) -> list[int]:
    return [int(x) for x in re.findall(r"tick (\d+)", text)]


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> str:
    """The image's (lower, read-only) layer."""
    d = tmp_path_factory.mktemp("image")
    rootfs = os.path.join(make_bundle(str(d / "b"), ["true"]), "rootfs")
    with open(os.path.join(rootfs, "etc", "motd"), "w") as f:
        f.write("welcome\n")
    with open(os.path.join(rootfs, "etc", "app.conf"), "w") as f:
        f.write("original\n")
    os.makedirs(os.path.join(rootfs, "etc", "conf.d"))
    for i in range(3):
        p = os.path.join(rootfs, "etc", "conf.d", f"{i}.conf")
        with open(p, "w") as f:
            f.write(f"conf {i}\n")
        os.chown(p, 1000 + i, 1000)
        os.chmod(p, 0o640)
    return rootfs


@pytest.fixture(scope="module")
def golden(tmp_path_factory, image):
    """One snapshot of SOURCE; each test works on its own copy of the store."""
    from conftest import ThawEnv
    d = tmp_path_factory.mktemp("golden")
    env = ThawEnv(dir=str(d), config=str(d / "config.yaml"), store=str(d / "store"),
                  state=str(d / "state"), root=str(d / "runc-root"))
    env.write_config()
    b = overlay_bundle(str(d / "src"), image, SOURCE)
    try:
        src = env.container(b)
        assert src.create() == 0
        src.start()
        src.wait_output(lambda t: len(ticks(t)) > 15)
        env.thaw("capture", src.id, "--name", "golden:1", "--root", env.root)
        src.destroy()
    finally:
        umount_overlay(b)
    info = json.loads(env.thaw("inspect", "golden:1").stdout)
    assert info["config"]["sizes"]["rootfs_deleted"] == 2, info["config"]["sizes"]   # etc/motd, etc/conf.d
    return env


@pytest.fixture
def env(thaw_env, golden):
    shutil.copytree(golden.store, thaw_env.store, symlinks=True)
    return thaw_env


@pytest.fixture
def target(tmp_path, image):
    """A fresh overlay bundle asking for the snapshot, and what its rootfs looks like before."""
    b = overlay_bundle(str(tmp_path / unique("dst")), image, SOURCE, annotations={"thaw.dev/snapshot": "golden:1"})
    yield b, tree_digest(os.path.join(b, "rootfs"))
    umount_overlay(b)


def mounts() -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f]


def assert_nothing_left(env, bundle: str, cid: str, before: dict) -> None:
    rootfs = os.path.realpath(os.path.join(bundle, "rootfs"))
    assert cid not in env.runc_ids()
    left = [e for e in env.state_entries() if e.startswith(cid)]
    assert not left, (left, [os.listdir(os.path.join(env.state, "containers", e)) for e in left if e.endswith(".d")])
    work = os.path.join(env.state, "containers", cid + ".d")
    assert not [m for m in mounts() if m.startswith((rootfs + "/", os.path.join(env.root, cid), work))]
    from thaw.shim.runc import cgroup_dirs
    spec = json.load(open(os.path.join(bundle, "config.json")))
    assert not [d for d in cgroup_dirs(spec, systemd=False) if os.path.exists(d)]     # every hierarchy
    after = tree_digest(rootfs)
    assert after == before, ([m for m in mounts() if rootfs in m], os.listdir(rootfs),
                             sorted(set(after) ^ set(before))[:10])          # the image's rootfs, exactly
    assert not [n for n in os.listdir(bundle) if n.startswith(".thaw-undo")]
    assert not os.path.exists(os.path.join(env.root, cid))


def runc_and_criu_done(cid: str) -> bool:
    procs = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    return not [p for p in procs.splitlines() if cid in p and ("runc" in p or "criu" in p)]


def restored_and_counting(c) -> None:
    c.start()
    got = ticks(c.wait_output(lambda t: len(ticks(t)) > 3))
    assert got[0] > 10, got[:5]                            # the captured count goes on
    assert os.path.exists(os.path.join(c.bundle, "rootfs", "data", "state.txt"))
    assert not os.path.exists(os.path.join(c.bundle, "rootfs", "etc", "motd"))   # deleted paths are deleted


@pytest.mark.parametrize("fault", ["restore_recorded=kill", "rootfs_applied=kill", "runc_restore=kill@0.1",
                                   "runc_restore=killgroup@0.1", "runc_restored=kill", "resumed=kill"])
@pytest.mark.parametrize("then", ["delete", "create", "doctor"])
def test_thaw_runtime_killed_mid_restore(env, target, fault, then):
    bundle, before = target
    c = env.container(bundle)
    rc = c.create(env={"THAW_TEST_FAULTS": fault}, session=True)
    assert rc == -9, c.log_text()
    wait_for(lambda: runc_and_criu_done(c.id), 60, "runc and CRIU to finish or die")
    if then == "delete":               # what the shim does after a failed create
        c.run("delete", "--force", c.id, check=False)
    elif then == "doctor":
        out = env.thaw("doctor", "--fix", "--skip-containerd", check=False).stdout
        assert f"{c.id}: dead restore cleaned up" in out, out
    if then != "create":
        assert_nothing_left(env, bundle, c.id, before)
    assert c.create() == 0, c.log_text()                   # the id works again: restored
    assert not [e for e in c.log_entries() if e.get("level") == "warning"], (
        c.log_text(), open(os.path.join(env.state, "events.log")).read()[-1500:])
    restored_and_counting(c)
    c.destroy()


def test_a_failure_after_runc_restore_leaves_nothing_and_cold_starts(env, target):
    """The resume call fails after runc restore succeeded: the restored container is deleted,
    the rootfs is back as the image made it, the original create runs. (The restored process ran
    between runc restore and the failure: what it printed then stays in the log, before the cold
    start's own output.)"""
    bundle, before = target
    c = env.container(bundle)
    assert c.create(env={"THAW_TEST_FAULTS": "resumed=fail"}) == 0
    assert "fault injected at resumed" in [e for e in c.log_entries() if e.get("level") == "warning"][-1]["msg"]
    rootfs = os.path.join(bundle, "rootfs")
    assert tree_digest(rootfs) == before                   # undone before the cold create ran
    c.start()
    out = c.wait_output(lambda t: "tick 0\n" in t and len(ticks(t.split("tick 0\n", 1)[1])) > 5)
    cold = ticks("tick 0\n" + out.split("tick 0\n", 1)[1])
    assert cold == list(range(len(cold)))                  # one counter from 0: the cold start, alone
    c.destroy()
    assert env.runc_ids() == []


def test_a_second_create_with_a_running_containers_id_harms_nothing(env, target, tmp_path, image):
    bundle, _ = target
    first = env.container(bundle)
    assert first.create() == 0
    first.start()
    first.wait_output(lambda t: len(ticks(t)) > 3)
    other = overlay_bundle(str(tmp_path / "other"), image, SOURCE, annotations={"thaw.dev/snapshot": "golden:1"})
    try:
        second = env.container(other, cid=first.id)
        assert second.create() != 0                        # runc's answer: the id exists
        assert "exist" in second.log_text()
        n = len(ticks(first.output()))
        wait_for(lambda: len(ticks(first.output())) > n + 5, 10, "the first container to go on")
        assert first.state()["status"] == "running"
        record = json.load(open(os.path.join(env.state, "containers", first.id + ".json")))
        assert record["phase"] == "running" and record["bundle"] == bundle
        first.destroy()
    finally:
        umount_overlay(other)


@pytest.mark.parametrize("fault", ["checkpoint=killgroup@0.08", "checkpointed=kill", "package=kill", "publish=kill"])
def test_capture_killed_leaves_the_source_running_and_no_litter(thaw_env, tmp_path, image, fault):
    b = overlay_bundle(str(tmp_path / "src"), image, SOURCE)
    try:
        src = thaw_env.container(b)
        assert src.create() == 0
        src.start()
        src.wait_output(lambda t: len(ticks(t)) > 5)
        p = subprocess.run(["thaw", "capture", src.id, "--name", "cap:1", "--root", thaw_env.root],
                           env={**os.environ, "THAW_CONFIG": thaw_env.config, "THAW_TEST_FAULTS": fault},
                           capture_output=True, start_new_session=True, timeout=120)
        assert p.returncode == -9
        wait_for(lambda: runc_and_criu_done(src.id), 30, "runc and CRIU to finish or die")
        wait_for(lambda: src.state()["status"] == "running", 10, "the source to be running (not frozen)")
        n = len(ticks(src.output()))
        wait_for(lambda: len(ticks(src.output())) > n + 5, 10, "the source to go on counting")
        assert "cap:1" not in thaw_env.thaw("ls").stdout   # nothing half-published
        out = thaw_env.thaw("doctor", "--fix", "--skip-containerd", check=False).stdout
        store = thaw_env.store
        assert os.listdir(os.path.join(store, "staging")) == [], out
        assert os.listdir(os.path.join(store, "layout", "blobs", "sha256")) == []
        assert os.listdir(os.path.join(store, "images")) == []
        thaw_env.thaw("capture", src.id, "--name", "cap:1", "--root", thaw_env.root)   # and works again
        assert "cap:1" in thaw_env.thaw("ls").stdout
        src.destroy()
    finally:
        umount_overlay(b)


def test_pod_deleted_mid_auto_capture(thaw_env, tmp_path, image):
    ann = {"thaw.dev/snapshot": "auto:1", "thaw.dev/capture": "on-ready", "thaw.dev/ready": "file:/data/state.txt"}
    b = overlay_bundle(str(tmp_path / "c"), image, SOURCE, annotations=ann)
    try:
        c = thaw_env.container(b)
        assert c.create(env={"THAW_TEST_FAULTS": "package=sleep:30"}) == 0
        c.start()
        staging = os.path.join(thaw_env.store, "staging")
        wait_for(lambda: os.path.isdir(staging) and os.listdir(staging), 60, "the capture to be under way")
        time.sleep(1)                                       # inside the packaging pause
        c.destroy()                                         # delete -> the watcher gets SIGTERM
        wait_for(lambda: not os.listdir(staging), 15, "the capture's staging area to go")
        assert "auto:1" not in thaw_env.thaw("ls").stdout
        assert os.listdir(os.path.join(thaw_env.store, "images")) == []
        thaw_env.thaw("doctor", "--fix", "--skip-containerd", check=False)
        assert os.listdir(os.path.join(thaw_env.store, "layout", "blobs", "sha256")) == []
    finally:
        umount_overlay(b)


def _tmpfs(path: str, size: str) -> None:
    os.makedirs(path, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", path], check=True)


def test_store_disk_full_during_capture(thaw_env, tmp_path, image):
    _tmpfs(thaw_env.store, "300k")
    b = overlay_bundle(str(tmp_path / "src"), image, SOURCE)
    try:
        src = thaw_env.container(b)
        assert src.create() == 0
        src.start()
        src.wait_output(lambda t: len(ticks(t)) > 5)
        p = thaw_env.thaw("capture", src.id, "--name", "full:1", "--root", thaw_env.root, check=False)
        assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
        assert "No space left" in p.stderr or "checkpoint" in p.stderr, p.stderr
        assert src.state()["status"] == "running"
        assert "full:1" not in thaw_env.thaw("ls").stdout
        assert os.listdir(os.path.join(thaw_env.store, "staging")) == []
        src.destroy()
    finally:
        umount_overlay(b)
        subprocess.run(["umount", "-l", thaw_env.store], capture_output=True)


def test_state_dir_full_still_starts_the_container(env, target):
    bundle, _ = target
    _tmpfs(env.state, "64k")
    try:
        with open(os.path.join(env.state, "filler"), "wb") as f:
            try:
                f.write(b"\0" * (1 << 20))
            except OSError:
                pass
        c = env.container(bundle)
        assert c.create() == 0, c.log_text()
        c.start()
        assert ticks(c.wait_output(lambda t: len(ticks(t)) > 3))           # it runs (cold or not)
        c.destroy()
        assert c.id not in env.runc_ids()
    finally:
        subprocess.run(["umount", "-l", env.state], capture_output=True)


def test_concurrent_restores_repair_a_touched_image_once(env, tmp_path, image):
    """8 restores at once of a snapshot whose image failed its seal (an mtime touched): one
    checks and reseals it, all restore, and later restores still do."""
    manifest = json.loads(env.thaw("inspect", "golden:1").stdout)["manifest"]
    images = os.path.join(env.store, "images", manifest.split(":")[1])
    for name in os.listdir(images):
        os.utime(os.path.join(images, name), (1, 1))
    bundles = [overlay_bundle(str(tmp_path / f"d{i}"), image, SOURCE, annotations={"thaw.dev/snapshot": "golden:1"})
               for i in range(8)]
    try:
        cs = [env.container(b) for b in bundles]
        rcs: list[int | None] = [None] * 8
        threads = [threading.Thread(target=lambda i=i: rcs.__setitem__(i, cs[i].create())) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert rcs == [0] * 8
        for c in cs:
            assert not [e for e in c.log_entries() if e.get("level") == "warning"], c.log_text()
            c.start()
            assert ticks(c.wait_output(lambda t: len(ticks(t)) > 2))[0] > 10
            c.destroy()
        events = [json.loads(line) for line in open(os.path.join(env.state, "events.log"))]
        assert len([e for e in events if e["kind"] == "store" and "sealed again" in e["msg"]]) == 1
    finally:
        for b in bundles:
            umount_overlay(b)


def test_concurrent_captures_of_one_name(thaw_env, tmp_path, image):
    srcs, bundles = [], []
    try:
        for i in range(2):
            b = overlay_bundle(str(tmp_path / f"s{i}"), image, SOURCE)
            bundles.append(b)
            c = thaw_env.container(b)
            assert c.create() == 0
            c.start()
            srcs.append(c)
        for c in srcs:
            c.wait_output(lambda t: len(ticks(t)) > 5)
        procs = [subprocess.Popen(["thaw", "capture", c.id, "--name", "same:1", "--root", thaw_env.root],
                                  env={**os.environ, "THAW_CONFIG": thaw_env.config},
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE) for c in srcs]
        assert [p.wait(timeout=120) for p in procs] == [0, 0]
        snaps = json.loads(thaw_env.thaw("ls", "--json").stdout)
        assert [s["ref"] for s in snaps] == ["same:1"]
        thaw_env.thaw("doctor", "--fix", "--skip-containerd", check=False)
        images = [n for n in os.listdir(os.path.join(thaw_env.store, "images")) if "." not in n]
        assert images == [snaps[0]["digest"].split(":")[1]]                 # the loser's files are gone
        for c in srcs:
            c.destroy()
    finally:
        for b in bundles:
            umount_overlay(b)


def test_criu_killed_while_caching_its_kernel_probe(thaw_env):
    """CRIU writes /run/criu.kdat through criu.kdat.tmp (O_EXCL): one killed in between leaves the
    file, and no CRIU caches its kernel probe again. doctor names it, --fix removes it. Run in a
    mount namespace of its own with a fresh tmpfs /run (CRIU caches only on a tmpfs)."""
    script = ("set -e; mount -t tmpfs tmpfs /run; "
              ": > /run/criu.kdat.tmp; touch -d '-5 min' /run/criu.kdat.tmp; "   # what the killed CRIU left
              "criu check >/dev/null 2>&1; ls /run; echo ---; "
              "thaw doctor --skip-containerd || true; echo ---; thaw doctor --fix --skip-containerd; echo ---; "
              "criu check >/dev/null 2>&1; ls /run")
    proc = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "THAW_CONFIG": thaw_env.config})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    stuck, doctor, fixed, after = proc.stdout.split("---\n")
    assert stuck.split() == ["criu.kdat.tmp"]                  # the probe is not cached while it is there
    assert "criu kdat cache" in doctor and "warning: /run/criu.kdat.tmp left by a CRIU that died" in doctor
    assert "/run/criu.kdat.tmp: removed" in fixed
    assert "criu.kdat" in after.split() and "criu.kdat.tmp" not in after.split()   # cached again
