"""Attacks on thaw, performed for real (runc, CRIU): each test does what an attacker would and
checks the outcome a user would see. The threat model is in docs/implementation-notes.md."""

from __future__ import annotations

import array
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tarfile
import threading
import time
import uuid

import pytest

from helpers import PYTHON, make_bundle, unique, wait_for
from thaw.shim.drivers import engine
from thaw.shim.drivers.procs import ProcessHandle
from thaw.shim.lifecycle.recovery import finish
from thaw.shim.node.config import Config
from thaw.shim.node.state import ContainerState

pytestmark = [pytest.mark.root, pytest.mark.runc, pytest.mark.criu]

COUNTER = ["sh", "-c", "i=0; while true; do echo tick $i; i=$((i+1)); sleep 0.05; done"]
ALL_CAPS = ["CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_FSETID", "CAP_KILL",
            "CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE", "CAP_NET_RAW", "CAP_NET_ADMIN",
            "CAP_SYS_CHROOT", "CAP_SYS_ADMIN", "CAP_SYS_PTRACE", "CAP_MKNOD", "CAP_AUDIT_WRITE", "CAP_SETFCAP"]
SECCOMP = {"defaultAction": "SCMP_ACT_ALLOW", "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_AARCH64"],
           "syscalls": [{"names": ["mount", "umount2"], "action": "SCMP_ACT_ERRNO"}]}


def edit_spec(bundle: str, change) -> str:
    path = os.path.join(bundle, "config.json")
    spec = json.load(open(path))
    change(spec)
    json.dump(spec, open(path, "w"))
    return bundle


def ticks(text: str) -> list[int]:
    return [int(x) for x in re.findall(r"tick (\d+)", text)]


def captured_counter(env, tmp_path, name: str, after_ticks: int) -> None:
    """COUNTER run, captured as `name` once it has ticked `after_ticks` times, then removed."""
    src = env.container(make_bundle(str(tmp_path / "src"), COUNTER))
    assert src.create() == 0
    src.start()
    src.wait_output(lambda t: len(ticks(t)) > after_ticks)
    env.thaw("capture", src.id, "--name", name, "--root", env.root)
    src.destroy()


def status_of(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def warnings_of(c) -> list[str]:
    """thaw's warnings in the container's runtime log (runc may add its own)."""
    return [e["msg"] for e in c.log_entries() if e.get("level") == "warning" and e["msg"].startswith("thaw:")]


# --- 1. capture cannot be redirected to host files --------------------------------------------------

RACER = r"""
import ctypes, os, sys, time
libc = ctypes.CDLL(None, use_errno=True)
os.makedirs("/work/d", exist_ok=True)
with open("/work/d/f", "w") as f:
    f.write("container bytes")
os.symlink(sys.argv[1], "/work/l")          # absolute: inside the container it names nothing
print("racing", flush=True)
while True:                                  # swap the directory and the symlink, forever
    libc.renameat2(-100, b"/work/d", -100, b"/work/l", 2)      # AT_FDCWD, RENAME_EXCHANGE
    time.sleep(0.002)                        # each state lasts long enough to be read through
"""


def test_capture_cannot_be_redirected_to_host_files(thaw_env, tmp_path):
    token = uuid.uuid4().hex
    secret = tmp_path / f"host-secret-{token[:8]}"
    secret.mkdir()
    (secret / "f").write_text(f"host-only {token}")
    bundle = make_bundle(str(tmp_path / "racer"), [PYTHON, "-c", RACER, str(secret)], python=True)
    c = thaw_env.container(bundle)
    assert c.create() == 0, c.log_text()
    c.start()
    c.wait_output(lambda t: "racing" in t)
    outcomes = []
    for i in range(6):
        p = thaw_env.thaw("capture", c.id, "--name", f"race:{i}", "--root", thaw_env.root, check=False)
        outcomes.append("captured" if p.returncode == 0 else p.stderr.strip())
    c.destroy()
    # No byte of the host file reaches the store, whatever the timing; a capture either refuses
    # the changing rootfs or records the symlink as a symlink.
    for root, _, files in os.walk(thaw_env.store):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                assert token.encode() not in f.read(), (os.path.join(root, name), outcomes)
    for o in outcomes:
        assert o == "captured" or "rootfs changed during capture" in o, o


# --- 2. a restore never gives a pod more than its spec allows ---------------------------------------

def test_privileged_capture_is_not_restored_into_a_restricted_spec(thaw_env, tmp_path):
    def privileged(spec):
        p = spec["process"]
        p["user"] = {"uid": 0, "gid": 0}
        p["capabilities"] = dict.fromkeys(("bounding", "effective", "permitted"), ALL_CAPS)
        p["noNewPrivileges"] = False
    src = thaw_env.container(edit_spec(make_bundle(str(tmp_path / "src"), COUNTER), privileged))
    assert src.create() == 0
    src.start()
    src.wait_output(lambda t: len(ticks(t)) > 10)
    assert status_of(src.pid())["CapEff"].strip() != "0000000000000000"
    thaw_env.thaw("capture", src.id, "--name", "priv:1", "--root", thaw_env.root)
    src.destroy()

    def restricted(spec):
        p = spec["process"]
        p["user"] = {"uid": 1000, "gid": 1000}
        p["capabilities"] = {k: [] for k in ("bounding", "effective", "permitted")}
        p["noNewPrivileges"] = True
        spec["linux"]["seccomp"] = SECCOMP
    bundle = make_bundle(str(tmp_path / "dst"), COUNTER, annotations={"thaw.dev/snapshot": "priv:1"})
    dst = thaw_env.container(edit_spec(bundle, restricted))
    assert dst.create() == 0
    [msg] = warnings_of(dst)
    for field in ("process.user", "process.capabilities", "process.noNewPrivileges", "linux.seccomp"):
        assert field in msg, msg
    dst.start()
    assert ticks(dst.wait_output(lambda t: len(ticks(t)) > 2))[0] == 0        # a cold start
    st = status_of(dst.pid())
    assert st["Uid"].split()[:2] == ["1000", "1000"]
    assert st["CapEff"].strip() == "0000000000000000"
    assert st["NoNewPrivs"].strip() == "1" and st["Seccomp"].strip() == "2"
    dst.destroy()


SETUID_PROGRAM = r"""
import ctypes, os, time
os.setresgid(0, 0, 0)                       # the setuid binary's capabilities make it root entirely
os.setresuid(0, 0, 0)
ctypes.CDLL(None).prctl(4, 1, 0, 0, 0)     # PR_SET_DUMPABLE: setuid made it undumpable; undo that
print("ids", os.getresuid(), os.getresgid(), flush=True)
while True:
    time.sleep(0.2)
"""


def test_privileges_gained_after_start_do_not_come_back(thaw_env, tmp_path):
    """A setuid-root binary run without no-new-privs, in a spec that runs uid 1000 with no
    capabilities but leaves CAP_SETUID/CAP_SETGID in the bounding set: the binary gains them and
    makes the process root. The same spec may be restored, but not that process.
    (It makes all its ids root because CRIU cannot dump a process whose ids differ from its own
    without CAP_SYS_RESOURCE, which root lacks on the test VMs.)"""
    def unprivileged(spec):
        p = spec["process"]
        p["user"] = {"uid": 1000, "gid": 1000}
        p["capabilities"] = {"bounding": ["CAP_SETUID", "CAP_SETGID"], "effective": [], "permitted": []}
        p["noNewPrivileges"] = False
    args = ["/work/pysu", "-c", SETUID_PROGRAM]

    def bundle_at(name, annotations=None):
        b = make_bundle(str(tmp_path / name), args, python=True, annotations=annotations)
        suid = os.path.join(b, "rootfs", "work", "pysu")
        shutil.copy(os.path.realpath(PYTHON), suid)
        os.chown(suid, 0, 0)
        os.chmod(suid, 0o4755)
        return edit_spec(b, unprivileged)
    src = thaw_env.container(bundle_at("src"))
    assert src.create() == 0
    src.start()
    out = src.wait_output(lambda t: "ids" in t, timeout=30)
    assert "ids (0, 0, 0) (0, 0, 0)" in out                          # it did become root
    thaw_env.thaw("capture", src.id, "--name", "suid:1", "--root", thaw_env.root)
    src.destroy()
    dst = thaw_env.container(bundle_at("dst", {"thaw.dev/snapshot": "suid:1"}))
    assert dst.create() == 0
    [msg] = warnings_of(dst)
    assert "holds more than the spec grants" in msg and "uids [0, 0, 0, 0]" in msg, msg
    assert "CapPrm" in msg, msg
    dst.destroy()


# --- 4. the capture watcher is a handle, not a pid --------------------------------------------------

def test_finish_never_signals_a_process_that_reused_the_watchers_pid(thaw_env):
    cfg = Config(store_dir=thaw_env.store, state_dir=thaw_env.state)
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        st = ContainerState(cfg.state_dir, "c1")
        st.cold(time.time(), None, "x", "a:1", {"snapshot": "a:1"})
        # the recorded watcher had this pid, but started at another time: it is not this process
        start = ProcessHandle.of(bystander.pid).start
        assert start is not None
        st.update(watcher={"pid": bystander.pid, "start": start - 1})
        finish(cfg, "c1", "delete")
        time.sleep(0.2)
        assert bystander.poll() is None
        st.cold(time.time(), None, "x", "a:1", {"snapshot": "a:1"})
        st.update(watcher=ProcessHandle.of(bystander.pid).to_json())   # the real one is stopped
        finish(cfg, "c1", "delete")
        assert bystander.wait(timeout=5) == -signal.SIGTERM
    finally:
        bystander.kill()


def test_the_watcher_ends_with_its_container(thaw_env, tmp_path):
    ann = {"thaw.dev/snapshot": "never:1", "thaw.dev/capture": "on-ready", "thaw.dev/ready": "file:/never"}
    c = thaw_env.container(make_bundle(str(tmp_path / "c"), COUNTER, annotations=ann))
    assert c.create() == 0
    c.start()
    record = json.load(open(os.path.join(thaw_env.state, "containers", c.id + ".json")))
    watcher = ProcessHandle.from_json(record["watcher"])
    assert watcher is not None and watcher.alive()
    subprocess.run(["runc", "--root", thaw_env.root, "kill", c.id, "KILL"], check=True)   # behind thaw's back
    wait_for(lambda: not watcher.alive(), 10, "the watcher to end with its container")
    c.destroy()
    events = [json.loads(line) for line in open(os.path.join(thaw_env.state, "events.log"))]
    assert any(e["kind"] == "auto_capture" and e["outcome"] == "gone" for e in events)


# --- 6. file: readiness is resolved inside the container ---------------------------------------------

def test_file_readiness_never_looks_at_host_paths(thaw_env, tmp_path):
    host_only = f"/tmp/thaw-host-only-{uuid.uuid4().hex[:8]}"
    open(host_only, "w").close()
    try:
        script = f"ln -s {host_only} /ready; ln -s /proc/self/root/{host_only.lstrip('/')} /ready2; exec sleep 1000"
        c = thaw_env.container(make_bundle(str(tmp_path / "c"), ["sh", "-c", script]))
        assert c.create() == 0
        c.start()
        rootfs = os.path.join(c.bundle, "rootfs")
        wait_for(lambda: os.path.islink(os.path.join(rootfs, "ready2")), 10, "the symlinks")
        assert engine.ready("file:/ready", c.pid()) is False      # the host has it, the container not
        assert engine.ready("file:/ready2", c.pid()) is False     # nor through a magic link
        os.makedirs(os.path.join(rootfs, "tmp"), exist_ok=True)
        open(os.path.join(rootfs, host_only.lstrip("/")), "w").close()
        assert engine.ready("file:/ready", c.pid()) is True       # now the container has it
        c.destroy()
    finally:
        os.unlink(host_only)


# --- 7. process memory is root-only ------------------------------------------------------------------

def test_process_memory_is_root_only_everywhere(thaw_env, tmp_path):
    captured_counter(thaw_env, tmp_path, "modes:1", 5)
    assert os.stat(thaw_env.store).st_mode & 0o077 == 0
    [images] = [os.path.join(thaw_env.store, "images", n) for n in os.listdir(os.path.join(thaw_env.store, "images"))
                if os.path.isdir(os.path.join(thaw_env.store, "images", n))]
    assert os.stat(images).st_mode & 0o777 == 0o700
    for name in os.listdir(images):
        assert os.stat(os.path.join(images, name)).st_mode & 0o777 == 0o400, name
    blobs = os.path.join(thaw_env.store, "layout", "blobs", "sha256")
    for name in os.listdir(blobs):
        assert os.stat(os.path.join(blobs, name)).st_mode & 0o777 == 0o400, name
    archive = str(tmp_path / "out.tar")
    thaw_env.thaw("export", "modes:1", archive)
    assert os.stat(archive).st_mode & 0o777 == 0o600
    with tarfile.open(archive) as tar:
        assert {m.mode for m in tar.getmembers()} == {0o600}
    for name in ("events.log", "metrics.json"):
        path = os.path.join(thaw_env.state, name)
        if os.path.exists(path):
            assert os.stat(path).st_mode & 0o777 == 0o600, name
    assert os.stat(os.path.join(thaw_env.state, "events.log")).st_mode & 0o777 == 0o600


# --- 8. a terminal mismatch cold-starts, and runc never writes into the container -------------------

class ConsoleSocket:
    """What a shim does for a terminal container: receive the pty master over a unix socket."""

    def __init__(self, path: str):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(1)
        self.master: int | None = None
        self.output = b""
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        conn, _ = self.sock.accept()
        fds = array.array("i")
        _, ancdata, _, _ = conn.recvmsg(1024, socket.CMSG_LEN(fds.itemsize))
        for level, kind, data in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(data[:fds.itemsize])
        self.master = fds[0]
        while True:
            try:
                chunk = os.read(self.master, 4096)
            except OSError:
                return
            if not chunk:
                return
            self.output += chunk


def test_terminal_mismatch_cold_starts_into_the_terminal(thaw_env, tmp_path):
    captured_counter(thaw_env, tmp_path, "notty:1", 10)

    bundle = make_bundle(str(tmp_path / "dst"), COUNTER, annotations={"thaw.dev/snapshot": "notty:1"})
    edit_spec(bundle, lambda spec: spec["process"].__setitem__("terminal", True))
    console = ConsoleSocket(str(tmp_path / "console.sock"))
    cid = unique("tty")
    log = os.path.join(bundle, "log.json")
    g = ["thaw-runtime", "--root", thaw_env.root, "--log", log, "--log-format", "json"]
    p = subprocess.run([*g, "create", "--bundle", bundle, "--console-socket", console.path, cid],
                       stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
    try:
        assert p.returncode == 0, (p.stderr, open(log).read())
        msg = [json.loads(line)["msg"] for line in open(log)][-1]
        assert "cold start" in msg and "process.terminal" in msg
        subprocess.run([*g, "start", cid], check=True)
        wait_for(lambda: len(ticks(console.output.decode(errors="replace"))) > 3, 10, "ticks on the terminal")
        assert ticks(console.output.decode())[0] == 0
        assert b"runc" not in console.output and b"criu" not in console.output.lower()
        assert p.stdout == b"" and p.stderr == b""
    finally:
        subprocess.run([*g, "kill", cid, "KILL"], capture_output=True)
        time.sleep(0.2)
        subprocess.run([*g, "delete", "--force", cid], capture_output=True)


def test_a_failed_restore_writes_nothing_into_the_container(thaw_env, tmp_path):
    captured_counter(thaw_env, tmp_path, "broken:1", 10)
    manifest = json.loads(thaw_env.thaw("inspect", "broken:1").stdout)["manifest"]
    # CRIU fails on it (its message past the header wrecked); the seal cannot see it, and thaw's
    # image check reads only the header of an mm image
    inv = os.path.join(thaw_env.store, "images", manifest.split(":")[1], "mm-1.img")
    st = os.stat(inv)
    os.chmod(inv, 0o600)
    with open(inv, "r+b") as f:
        f.seek(8)
        f.write(b"\xff" * 8)
    os.utime(inv, ns=(st.st_atime_ns, st.st_mtime_ns))
    dst = thaw_env.container(make_bundle(str(tmp_path / "dst"), COUNTER,
                                         annotations={"thaw.dev/snapshot": "broken:1"}))
    assert dst.create() == 0
    assert "runc restore" in warnings_of(dst)[-1]
    dst.start()
    out = dst.wait_output(lambda t: len(ticks(t)) > 3)
    assert ticks(out)[0] == 0 and out.startswith("tick 0")    # nothing of runc's or CRIU's before it
    assert "".join(dst.stderr) == ""
    dst.destroy()


# --- 9. outside Kubernetes an image is identified by its layers ---------------------------------------

def _overlay_bundle(tmp_path, name: str, lower: str, annotations=None) -> tuple[str, str]:
    b = make_bundle(str(tmp_path / name), COUNTER, annotations=annotations, image=None)
    rootfs = os.path.join(b, "rootfs")
    upper, work = str(tmp_path / f"{name}-upper"), str(tmp_path / f"{name}-work")
    os.makedirs(upper)
    os.makedirs(work)
    shutil.rmtree(rootfs)
    os.makedirs(rootfs)
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", f"lowerdir={lower},upperdir={upper},workdir={work}",
                    rootfs], check=True)
    return b, rootfs


def test_without_an_image_name_the_image_layers_decide(thaw_env, tmp_path):
    image_a = make_bundle(str(tmp_path / "image-a"), ["true"])
    image_b = make_bundle(str(tmp_path / "image-b"), ["true"])
    with open(os.path.join(image_b, "rootfs", "etc", "release"), "w") as f:
        f.write("another image\n")
    mounts = []
    try:
        b, r = _overlay_bundle(tmp_path, "src", os.path.join(image_a, "rootfs"))
        mounts.append(r)
        src = thaw_env.container(b)
        assert src.create() == 0
        src.start()
        src.wait_output(lambda t: len(ticks(t)) > 10)
        thaw_env.thaw("capture", src.id, "--name", "layers:1", "--root", thaw_env.root)
        image = json.loads(thaw_env.thaw("inspect", "layers:1").stdout)["config"]["fingerprint"]["container"]["image"]
        assert image.startswith("layers:sha256:")
        src.destroy()
        ann = {"thaw.dev/snapshot": "layers:1"}
        b, r = _overlay_bundle(tmp_path, "other", os.path.join(image_b, "rootfs"), ann)
        mounts.append(r)
        other = thaw_env.container(b)
        assert other.create() == 0
        assert "image" in warnings_of(other)[-1]          # another image running the same command
        other.destroy()
        b, r = _overlay_bundle(tmp_path, "same", os.path.join(image_a, "rootfs"), ann)
        mounts.append(r)
        same = thaw_env.container(b)
        assert same.create() == 0 and not warnings_of(same), same.log_text()
        same.start()
        assert ticks(same.wait_output(lambda t: len(ticks(t)) > 2))[0] > 10
        same.destroy()
        # a plain directory without an image name cannot be identified: never restored
        plain = thaw_env.container(make_bundle(str(tmp_path / "plain"), COUNTER, annotations=ann, image=None))
        assert plain.create() == 0 and "cannot be identified" in warnings_of(plain)[-1]
        plain.destroy()
    finally:
        for m in mounts:
            subprocess.run(["umount", m], capture_output=True)


# --- 10. without --log, errors still reach the caller ------------------------------------------------

def test_without_log_errors_go_to_stderr_and_cold_starts_stay_quiet(thaw_env, tmp_path):
    def create_without_log(annotations) -> subprocess.CompletedProcess:
        b = make_bundle(str(tmp_path / unique("b")), COUNTER, annotations=annotations)
        cid = unique("nolog")
        # Files, not pipes: a created container holds its stdio until it ends.
        with open(os.path.join(b, "out"), "w+b") as out, open(os.path.join(b, "err"), "w+b") as err:
            rc = subprocess.run(["thaw-runtime", "--root", thaw_env.root, "create", "--bundle", b, cid],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=err, timeout=60).returncode
            subprocess.run(["runc", "--root", thaw_env.root, "delete", "--force", cid], capture_output=True)
            err.seek(0)
            return subprocess.CompletedProcess([], rc, b"", err.read())
    p = create_without_log({"thaw.dev/snapshot": "absent:1", "thaw.dev/required": "true"})
    assert p.returncode == 1
    assert b"level=error" in p.stderr and b"absent:1" in p.stderr and b"not found" in p.stderr
    p = create_without_log({"thaw.dev/snapshot": "absent:1"})
    assert p.returncode == 0 and p.stderr == b""             # the container's stderr stays its own
    events = [json.loads(line) for line in open(os.path.join(thaw_env.state, "events.log"))]
    assert [e["kind"] for e in events if "absent:1" in e["msg"]] == ["refused", "cold_start"]


# --- a spec must not choose CRIU's options ------------------------------------------------------------

def test_a_container_naming_a_criu_config_is_not_captured(thaw_env, tmp_path):
    marker = tmp_path / "action-script-ran"
    script = tmp_path / "evil.sh"
    script.write_text(f"#!/bin/sh\ntouch {marker}\n")
    script.chmod(0o755)
    conf = tmp_path / "evil.conf"
    conf.write_text(f"action-script {script}\n")
    c = thaw_env.container(make_bundle(str(tmp_path / "c"), COUNTER, annotations={"org.criu.config": str(conf)}))
    assert c.create() == 0
    c.start()
    c.wait_output(lambda t: len(ticks(t)) > 3)
    p = thaw_env.thaw("capture", c.id, "--name", "evil:1", "--root", thaw_env.root, check=False)
    c.destroy()
    assert p.returncode == 1 and "CRIU configuration file" in p.stderr
    assert not marker.exists()
    # a restore ignores the annotation of the spec it restores into (thaw names its own file)
    captured_counter(thaw_env, tmp_path, "fine:1", 10)
    dst = thaw_env.container(make_bundle(str(tmp_path / "dst"), COUNTER, annotations={
        "thaw.dev/snapshot": "fine:1", "org.criu.config": str(conf)}))
    assert dst.create() == 0 and not warnings_of(dst), dst.log_text()        # restored
    dst.start()
    assert ticks(dst.wait_output(lambda t: len(ticks(t)) > 2))[0] > 10
    assert not marker.exists()
    dst.destroy()
