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
import sys
import threading

import pytest

from helpers import (
    PYTHON,
    etc_image,
    make_bundle,
    netns,
    netns_delete,
    overlay_bundle,
    tree_digest,
    umount_overlay,
    unique,
    wait_for,
    wait_http_ready,
)

pytestmark = [pytest.mark.root, pytest.mark.runc, pytest.mark.criu]

# The captured program changes its rootfs: adds /data/state.txt, deletes the image's /etc/motd and
# /etc/conf.d (a directory), replaces /etc/app.conf. A restore applies that diff; undo reverses it.
SOURCE = ["sh", "-c", "mkdir -p /data; echo restored-state > /data/state.txt; rm -f /etc/motd; "
          "rm -rf /etc/conf.d; echo changed > /etc/app.conf; i=0; "
          "while true; do echo tick $i; i=$((i+1)); sleep 0.05; done"]


COUNTER = ["sh", "-c", "i=0; while true; do echo tick $i; i=$((i+1)); sleep 0.05; done"]


def ticks(text: str) -> list[int]:
    return [int(x) for x in re.findall(r"tick (\d+)", text)]


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> str:
    """The image's (lower, read-only) layer."""
    return etc_image(str(tmp_path_factory.mktemp("image") / "b"), owners=True)


@pytest.fixture(scope="module")
def golden(tmp_path_factory, image):
    """One snapshot of SOURCE; each test works on its own copy of the store."""
    from conftest import ThawEnv
    d = tmp_path_factory.mktemp("golden")
    env = ThawEnv.in_dir(d)
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


def processes_of(env) -> list[str]:
    """Every process whose command line or working directory is in this test's directory: runc
    (--root), CRIU (its title names the store's image directory, its cwd the work dir), hooks."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            cwd = os.readlink(f"/proc/{pid}/cwd")
            with open(f"/proc/{pid}/stat") as f:
                zombie = f.read().rsplit(")", 1)[1].split()[0] == "Z"
        except OSError:
            continue
        if not zombie and (env.dir in cmd or cwd.startswith(env.dir)):
            found.append(f"{pid}: {cmd[:120]}")
    return found


def assert_nothing_left(env, bundle: str, cid: str, before: dict | None, thaw_pid: int | None = None) -> None:
    """No runc container, record, mount, process, cgroup, undo directory or pid temp file of `cid`
    is left, and (`before` given) the rootfs is exactly as it was before the create."""
    rootfs = os.path.realpath(os.path.join(bundle, "rootfs"))
    assert cid not in env.runc_ids()
    left = [e for e in env.state_entries() if e.startswith(cid)]
    assert not left, (left, [os.listdir(os.path.join(env.state, "containers", e)) for e in left if e.endswith(".d")])
    work = os.path.join(env.state, "containers", cid + ".d")
    assert not [m for m in mounts() if m.startswith((rootfs + "/", os.path.join(env.root, cid), work))]
    from thaw.shim.drivers.runc import cgroup_dirs
    spec = json.load(open(os.path.join(bundle, "config.json")))
    assert not [d for d in cgroup_dirs(spec, systemd=False) if os.path.exists(d)]     # every hierarchy
    if thaw_pid is not None:                                     # the restore's own cgroup
        from thaw.shim.node.cgroups import scratch_path
        assert not os.path.exists(scratch_path(f"thaw-restore-{thaw_pid}"))
    assert processes_of(env) == []
    if before is not None:
        after = tree_digest(rootfs)
        assert after == before, ([m for m in mounts() if rootfs in m], os.listdir(rootfs),
                                 sorted(set(after) ^ set(before))[:10])      # the image's rootfs, exactly
    assert not [n for n in os.listdir(bundle) if n.startswith(".thaw-undo")]
    assert not [n for n in os.listdir(bundle) if n.startswith(".init.pid")]   # runc's pid temp file
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


@pytest.fixture
def cpu_load():
    """Both cores busy (two shell loops this test starts and stops): recovery must not depend on
    a restore's processes dying or finishing quickly."""
    loops = [subprocess.Popen(["sh", "-c", "while :; do :; done"]) for _ in range(os.cpu_count() or 2)]
    yield
    for p in loops:
        p.kill()
        p.wait()


# Where a restore is killed: thaw's own points (thaw-runtime alone; runc and CRIU are not running
# there), and inside runc restore at each stage CRIU runs action scripts, killing thaw-runtime alone,
# its whole process group, runc alone or CRIU alone (shim/faults.py). Deterministic: no timers.
_THAW_POINTS = ["restore_recorded", "rootfs_deleted", "rootfs_applied", "runc_restore", "runc_restored",
                "resumed", "restored"]
_CRIU_STAGES = ["pre-restore", "setup-namespaces", "post-setup-namespaces", "post-restore", "pre-resume",
                "post-resume"]
_THENS = ["delete", "create", "doctor"]
KILLS = ([(f"{p}=kill", _THENS[i % 3]) for i, p in enumerate(_THAW_POINTS)]
         + [(f"criu.{s}={t}", _THENS[(i + j) % 3]) for i, s in enumerate(_CRIU_STAGES)
            for j, t in enumerate(["kill", "killgroup"])]
         + [("criu.pre-restore=stallrunc", "delete"), ("criu.post-restore=stallrunc", "create")])
SURVIVED = [f"criu.{s}={t}" for s in ("pre-restore", "post-restore", "post-resume") for t in ("killrunc", "killcriu")]


def kill_mid_restore(env, target, fault: str, then: str) -> None:
    bundle, before = target
    c = env.container(bundle)
    rc = c.create(env={"THAW_TEST_FAULTS": fault}, session=True)
    assert rc == -9, c.log_text()
    # No waiting for runc or CRIU: the shim's delete comes at once, while they may still run.
    if then == "delete":               # what the shim does after a failed create
        c.run("delete", "--force", c.id)
    elif then == "doctor":
        out = env.thaw("doctor", "--fix", "--skip-containerd", check=False).stdout
        assert f"{c.id}: dead restore cleaned up" in out, out
    if then != "create":
        assert_nothing_left(env, bundle, c.id, before, c.create_pid)
    assert c.create() == 0, c.log_text()                   # the id works again: restored
    assert not [e for e in c.log_entries() if e.get("level") == "warning"], (
        c.log_text(), open(os.path.join(env.state, "events.log")).read()[-1500:])
    restored_and_counting(c)
    c.destroy()
    assert_nothing_left(env, bundle, c.id, None, c.create_pid)
    # A restored container that started keeps its files after delete, as a runc container does.
    assert os.path.exists(os.path.join(bundle, "rootfs", "data", "state.txt"))


@pytest.mark.parametrize("fault,then", KILLS)
def test_thaw_runtime_killed_mid_restore(env, target, fault, then):
    kill_mid_restore(env, target, fault, then)


def test_a_create_killed_after_its_restore_is_undone_by_delete_without_hooks(env, target):
    """thaw-runtime killed after the restore was recorded done, before it exited 0: the shim never
    saw the create succeed, and its delete undoes all of it, rootfs diff included — by
    thaw-runtime's delete itself, not only through the poststop hook (a node may run without it)."""
    env.write_config(hook="")
    kill_mid_restore(env, target, "restored=kill", "delete")


@pytest.mark.parametrize("fault", [f"criu.{s}=killgroup" for s in ("setup-namespaces", "post-restore")]
                         + ["rootfs_deleted=killgroup"])
def test_process_group_killed_mid_restore_under_cpu_load(env, target, cpu_load, fault):
    kill_mid_restore(env, target, fault, "delete")


@pytest.mark.parametrize("fault", SURVIVED)
def test_runc_or_criu_killed_mid_restore_cold_starts_and_leaves_nothing(env, target, fault):
    """runc or CRIU killed under a live thaw-runtime: the restore fails, every process of it is
    killed (CRIU may outlive runc; it is in the restore's cgroup or the container's), the rootfs
    diff undone, and the create cold-starts; after delete nothing is left and the id restores."""
    bundle, _ = target
    with open(os.path.join(bundle, "config.json"), "rb") as f:
        as_written = f.read()                              # a cold start narrows its seccomp (io_uring)
    c = env.container(bundle)
    assert c.create(env={"THAW_TEST_FAULTS": fault}, session=True) == 0, c.log_text()
    [cold] = [e for e in c.log_entries() if e.get("level") == "warning"]
    assert "cold start" in cold["msg"] and "runc restore exited" in cold["msg"], cold
    c.start()
    out = c.wait_output(lambda t: "tick 0\n" in t and len(ticks(t.split("tick 0\n", 1)[1])) > 3)
    cold_ticks = ticks("tick 0\n" + out.split("tick 0\n", 1)[1])
    assert cold_ticks == list(range(len(cold_ticks)))      # one counter from 0: the cold start alone
    assert c.state()["status"] == "running"
    c.destroy()
    assert_nothing_left(env, bundle, c.id, None, c.create_pid)
    with open(os.path.join(bundle, "config.json"), "wb") as f:
        f.write(as_written)                                # a new create gets the spec as written
    c2 = env.container(bundle, c.id)
    logged = len(c2.log_entries())                         # the same bundle's log.json
    assert c2.create() == 0
    assert [e["msg"][:14] for e in c2.log_entries()[logged:]] == ["thaw: restored"], c2.log_text()
    c2.destroy()


def test_an_unreaped_thaw_runtime_counts_as_dead(env, target):
    """The issue's reproduction: thaw-runtime's group SIGKILLed mid-restore and the delete comes
    before its parent reaped it. A zombie is dead: the delete cleans up everything (CRIU, whose
    restore runs in a session of its own, survived the group kill) and the id restores again."""
    bundle, before = target
    c = env.container(bundle)
    with c.pipes() as (out_w, err_w):
        proc = subprocess.Popen([*c._global(), "create", "--bundle", bundle, "--pid-file", c.pid_file, c.id],
                                stdin=subprocess.DEVNULL, stdout=out_w, stderr=err_w, start_new_session=True,
                                env={**os.environ, "THAW_TEST_FAULTS": "criu.post-restore=killgroup"})

    def zombie() -> bool:
        with open(f"/proc/{proc.pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    wait_for(zombie, 60, "thaw-runtime to die (unreaped)")
    try:
        c.run("delete", "--force", c.id)
        assert_nothing_left(env, bundle, c.id, before, proc.pid)
    finally:
        assert proc.wait(timeout=10) == -9
    assert c.create() == 0, c.log_text()
    restored_and_counting(c)
    c.destroy()


DEAD_RESTORE = r"""
import sys
from thaw.shim.node.state import ContainerState
state, cid, bundle, root = sys.argv[1:5]
ContainerState(state, cid).begin_restore("golden:1", 0.0, bundle, root, False, bundle + "/.thaw-undo")
"""


def test_a_delete_that_cannot_clean_up_says_so_and_exits_non_zero(env, tmp_path):
    """A dead restore whose rootfs journal cannot be undone (it names a path outside the rootfs):
    delete exits 1 naming what is left, in runc's log; the record stays for the next try, and
    once the obstacle is gone the next delete cleans up and exits 0."""
    bundle = make_bundle(str(tmp_path / "b"), COUNTER)
    cid = unique("dead")
    subprocess.run([sys.executable, "-c", DEAD_RESTORE, env.state, cid, bundle, env.root], check=True)
    undo = bundle + "/.thaw-undo"
    os.makedirs(undo)
    with open(os.path.join(undo, "journal"), "w") as f:
        f.write(json.dumps({"op": "created", "path": "../outside", "backup": ""}) + "\n")
    c = env.container(bundle, cid)
    p = c.run("delete", "--force", cid, check=False)
    assert p.returncode == 1, p
    assert b"could not clean up" in p.stderr and b"rootfs diff not undone" in p.stderr, p.stderr
    assert "could not clean up" in c.log_text()
    assert env.state_entries() == [cid + ".json"]        # kept: the next delete tries again
    os.unlink(os.path.join(undo, "journal"))
    assert c.run("delete", "--force", cid, check=False).returncode == 0
    assert env.state_entries() == [] and not os.path.exists(undo)


def test_a_cold_create_killed_with_its_group_leaves_the_id_usable(env, target):
    """thaw-runtime hands a cold start to runc by exec; its process group killed while runc creates
    the container (from a createRuntime hook of runc's, a deterministic point inside runc create)
    leaves runc's half-made state, and a runc killed while writing the pid file leaves its O_EXCL
    temporary file (made here the way runc makes it: that window is too short to hit), which fails
    every later create of the bundle. Both the next delete and the next create clean them up."""
    bundle, _ = target
    spec = json.load(open(os.path.join(bundle, "config.json")))
    spec["annotations"]["thaw.dev/snapshot"] = "missing:1"            # a cold start
    killer = {"createRuntime": [{"path": "/bin/sh", "args": ["sh", "-c", "kill -9 0"]}]}   # its group
    spec["hooks"] = killer
    with open(os.path.join(bundle, "config.json"), "w") as f:
        json.dump(spec, f)
    for then in ("delete", "create"):
        c = env.container(bundle)
        assert c.create(session=True) == -9, c.log_text()
        with open(os.path.join(bundle, ".init.pid"), "x"):             # runc's createPidFile, cut short
            pass
        if then == "delete":
            c.run("delete", "--force", c.id)
            assert not os.path.exists(os.path.join(bundle, ".init.pid"))
            assert c.id not in env.runc_ids() and env.state_entries() == []
        spec["hooks"] = {}
        with open(os.path.join(bundle, "config.json"), "w") as f:
            json.dump(spec, f)
        assert c.create() == 0, c.log_text()                            # the id and bundle work again
        c.start()
        assert ticks(c.wait_output(lambda t: len(ticks(t)) > 2))
        c.destroy()
        spec["hooks"] = killer
        with open(os.path.join(bundle, "config.json"), "w") as f:
            json.dump(spec, f)
        assert env.state_entries() == []


def test_recovery_unmounts_the_rootfs_bind_before_runc_deletes(env, tmp_path):
    """What a runc restore killed half-way leaves: a runc container whose state directory holds the
    rootfs bind-mounted at criu-root, and thaw's RESTORING record of a dead thaw-runtime. `runc
    delete` removes its state directory recursively; the next call for the id (the shim's delete)
    must take the bind away first, or runc empties the container's rootfs through it."""
    bundle = make_bundle(str(tmp_path / "b"), COUNTER)
    rootfs = os.path.join(bundle, "rootfs")
    before = tree_digest(rootfs)
    cid = unique("dead")
    subprocess.run(["runc", "--root", env.root, "create", "--bundle", bundle, cid], check=True,
                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30)
    criu_root = os.path.join(env.root, cid, "criu-root")
    os.mkdir(criu_root)
    subprocess.run(["mount", "--bind", rootfs, criu_root], check=True)
    try:
        subprocess.run([sys.executable, "-c", DEAD_RESTORE, env.state, cid, bundle, env.root], check=True)
        c = env.container(bundle, cid)
        c.run("delete", "--force", cid)                    # as the shim does after a failed create
        assert cid not in env.runc_ids() and env.state_entries() == []
        assert not [m for m in mounts() if m.startswith(os.path.join(env.root, cid))]
        assert tree_digest(rootfs) == before               # nothing removed through the bind
        [recovered] = [json.loads(line) for line in open(os.path.join(env.state, "events.log"))
                       if '"recovered"' in line]
        assert recovered["container"] == cid and "1 mounts" in recovered["cleaned"], recovered
    finally:
        subprocess.run(["umount", "-l", criu_root], capture_output=True)
        subprocess.run(["runc", "--root", env.root, "delete", "--force", cid], capture_output=True)

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



# --- the resume call: made after runc restore, and a refusal undoes everything ----------------------

# A service that changes its rootfs as SOURCE does, then serves: POST /resume answers 200, any other
# POST 500; each answer is printed, so the container's output says who answered what.
SERVER = [PYTHON, "-c", r"""
import http.server, os, shutil
os.makedirs("/data", exist_ok=True)
with open("/data/state.txt", "w") as f:
    f.write("restored-state\n")
for gone in ("/etc/motd",):
    if os.path.exists(gone):
        os.unlink(gone)
shutil.rmtree("/etc/conf.d", ignore_errors=True)
with open("/etc/app.conf", "w") as f:
    f.write("changed\n")
print("cold start", flush=True)


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_POST(self):
        code = 200 if self.path == "/resume" else 500
        print(f"POST {self.path} answered {code}", flush=True)
        self.send_response(code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


http.server.HTTPServer(("127.0.0.1", 8080), Handler).serve_forever()
"""]


@pytest.fixture(scope="module")
def server_image(tmp_path_factory) -> str:
    """SERVER's image: the host's Python (through the /usr bind) and the files it changes."""
    d = tmp_path_factory.mktemp("server-image")
    rootfs = os.path.join(make_bundle(str(d / "b"), ["true"], python=True), "rootfs")
    with open(os.path.join(rootfs, "etc", "motd"), "w") as f:
        f.write("welcome\n")
    with open(os.path.join(rootfs, "etc", "app.conf"), "w") as f:
        f.write("original\n")
    os.makedirs(os.path.join(rootfs, "etc", "conf.d"))
    with open(os.path.join(rootfs, "etc", "conf.d", "0.conf"), "w") as f:
        f.write("conf 0\n")
    return rootfs


@pytest.fixture(scope="module")
def server_golden(tmp_path_factory, server_image):
    """server:1, captured in a network namespace joined by path (as a pod's is)."""
    from conftest import ThawEnv
    d = tmp_path_factory.mktemp("server-golden")
    env = ThawEnv.in_dir(d)
    ns = unique("thawns")
    b = overlay_bundle(str(d / "src"), server_image, SERVER, python=True, netns=netns(ns))
    try:
        src = env.container(b)
        assert src.create() == 0, src.log_text()
        src.start()
        wait_http_ready(src.pid(), "http://127.0.0.1:8080/ready", 30)
        env.thaw("capture", src.id, "--name", "server:1", "--root", env.root)
        src.destroy()
    finally:
        umount_overlay(b)
        netns_delete(ns)
    return env


@pytest.fixture
def server_target(thaw_env, server_golden, server_image, tmp_path):
    """A fresh overlay bundle of SERVER asking for server:1 with the given resume URL, and its rootfs
    before the create."""
    shutil.copytree(server_golden.store, thaw_env.store, symlinks=True)
    made: list[tuple[str, str]] = []

    def target(resume: str) -> tuple[str, dict]:
        ann = {"thaw.dev/snapshot": "server:1", "thaw.dev/resume": resume}
        ns = unique("thawns")
        b = overlay_bundle(str(tmp_path / unique("dst")), server_image, SERVER, python=True, annotations=ann,
                           netns=netns(ns))
        made.append((b, ns))
        return b, tree_digest(os.path.join(b, "rootfs"))
    yield target
    for b, ns in made:
        umount_overlay(b)
        netns_delete(ns)


def test_a_restore_calls_the_resume_url(thaw_env, server_target):
    bundle, _ = server_target("http://127.0.0.1:8080/resume")
    c = thaw_env.container(bundle)
    assert c.create() == 0, c.log_text()
    assert not [e for e in c.log_entries() if e.get("level") == "warning"], c.log_text()
    # The restored process answered the call during the create, on the new container's stdout.
    assert c.wait_output(lambda t: "POST /resume answered 200" in t).count("POST") == 1
    c.start()
    assert "cold start" not in c.output()
    [restored] = [e for e in events_of(thaw_env) if e["kind"] == "restored"]
    assert restored["container"] == c.id and "resume" in restored["phases"]
    c.destroy()


def test_a_resume_url_answering_500_leaves_nothing_and_cold_starts(thaw_env, server_target):
    """runc restore succeeded, then the restored service refused to resume: the restored container
    is deleted, the rootfs diff undone (the service's changes to the image are gone before the cold
    start runs), and the original create cold-starts the container."""
    bundle, before = server_target("http://127.0.0.1:8080/refuse")
    c = thaw_env.container(bundle)
    assert c.create() == 0, c.log_text()
    [cold] = [e for e in events_of(thaw_env) if e["kind"] == "cold_start"]
    assert cold["code"] == "resume_failed" and "answered 500" in cold["reason"], cold
    c.wait_output(lambda t: "POST /refuse answered 500" in t)      # the restored process ran, and answered
    assert tree_digest(os.path.join(bundle, "rootfs")) == before    # the image's rootfs, exactly
    assert thaw_env.runc_ids() == [c.id] and c.state()["status"] == "created"
    assert not [n for n in os.listdir(bundle) if n.startswith(".thaw-undo")]
    record = json.load(open(os.path.join(thaw_env.state, "containers", c.id + ".json")))
    assert record["phase"] == "cold"
    c.start()
    out = c.wait_output(lambda t: "cold start" in t)
    assert out.index("POST /refuse answered 500") < out.index("cold start")
    from thaw.shim.drivers.runc import cgroup_dirs
    spec = json.load(open(os.path.join(bundle, "config.json")))
    procs = set()
    for d in cgroup_dirs(spec, systemd=False):
        if os.path.exists(os.path.join(d, "cgroup.procs")):
            procs |= {int(p) for p in open(os.path.join(d, "cgroup.procs")).read().split()}
    assert procs == {c.pid()}                    # the restored service is gone; only the cold one runs
    c.destroy()
    assert thaw_env.runc_ids() == [] and thaw_env.state_entries() == []


def events_of(env) -> list[dict]:
    return [json.loads(line) for line in open(os.path.join(env.state, "events.log"))]


# --- the capture guard: a container a dead capture left frozen runs again ---------------------------

GUARDED = r"""
import os, signal, subprocess, sys
from thaw.shim.drivers.runc import Runc
runc, root, cid, die = sys.argv[1:5]
with Runc.with_root(runc, "criu", root).resumed_if_we_die(cid):
    subprocess.run([runc, "--root", root, "pause", cid], check=True)   # as CRIU freezes it to dump
    if die == "die":
        os.kill(os.getpid(), signal.SIGKILL)                        # as a shim's timeout kills a capture
"""


def test_a_capture_killed_while_its_container_is_frozen_leaves_it_running(thaw_env, tmp_path):
    """The guard of `thaw capture` (Runc.resumed_if_we_die), run for real: the capturing process
    dies while the container is paused, and the guard resumes it; a capture that ends normally
    leaves the container as it was (the guard acts only when its capture died)."""
    c = thaw_env.container(make_bundle(str(tmp_path / "c"), COUNTER))
    assert c.create() == 0
    c.start()
    c.wait_output(lambda t: len(ticks(t)) > 3)
    runc = shutil.which("runc")
    assert runc, "runc on PATH"

    def guarded(then: str) -> int:
        return subprocess.run([sys.executable, "-c", GUARDED, runc, thaw_env.root, c.id, then],
                              capture_output=True, timeout=60).returncode
    assert guarded("die") == -9
    wait_for(lambda: c.state()["status"] == "running", 10, "the guard to resume the container")
    n = len(ticks(c.output()))
    wait_for(lambda: len(ticks(c.output())) > n + 3, 10, "the container to go on counting")
    assert guarded("live") == 0
    assert c.state()["status"] == "paused"        # the capture's own business, not the guard's
    c.run("resume", c.id)
    c.destroy()


@pytest.mark.parametrize("fault", ["criu.post-dump=killgroup", "checkpointed=kill", "package=kill", "publish=kill"])
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

        def packaging() -> bool:
            """The capture wrote its two rootfs blobs: it is at (or in) its packaging pause."""
            for area in os.listdir(staging) if os.path.isdir(staging) else []:
                try:
                    with open(os.path.join(staging, area, ".blobs")) as f:
                        return len(f.read().split()) == 2
                except FileNotFoundError:
                    pass
            return False
        wait_for(packaging, 60, "the capture to reach its packaging pause")
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
