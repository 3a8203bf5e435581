"""What real engines' process layouts need of a capture (vLLM's among them, tests/test_vllm.py):
io_uring (libuv, so uvloop, sets up a ring in every event loop; CRIU cannot dump one) and files
opened under a name since removed while another name still links them (POSIX semaphores, so
Python's multiprocessing locks, in /dev/shm)."""

from __future__ import annotations

import copy
import json
import os
import re

import pytest

from helpers import PYTHON, make_bundle
from thaw.oci.spec import IO_URING_SYSCALLS, deny_io_uring

RING = r"""
import ctypes, os, time
libc = ctypes.CDLL(None, use_errno=True)
params = ctypes.create_string_buffer(120)                # struct io_uring_params
fd = libc.syscall(425, 4, params)                        # io_uring_setup(4 entries)
print(f"io_uring_setup {fd} errno {ctypes.get_errno()}", flush=True)
n = 0
while True:
    n += 1
    print(f"alive {n}", flush=True)
    time.sleep(0.1)
"""

# sem_open's layout, by hand and through multiprocessing: the file was created under one name,
# linked under another, and the first name removed, while the process keeps it mapped and open.
SEMAPHORES = r"""
import mmap, multiprocessing, os, time
lock = multiprocessing.get_context("spawn").Lock()       # a named POSIX semaphore in /dev/shm
fd = os.open("/dev/shm/tmp.layout", os.O_RDWR | os.O_CREAT, 0o600)
os.ftruncate(fd, 4096)
shared = mmap.mmap(fd, 4096)
os.link("/dev/shm/tmp.layout", "/dev/shm/sem.layout")
os.unlink("/dev/shm/tmp.layout")
shared[:5] = b"hello"
n = 0
while True:
    n += 1
    with lock:
        same = os.fstat(fd).st_ino == os.stat("/dev/shm/sem.layout").st_ino
        with open("/dev/shm/sem.layout", "rb") as f:
            seen = f.read(5)
    print(f"n {n} same {same} seen {seen.decode()} shm {sorted(os.listdir('/dev/shm'))}", flush=True)
    shared[:5] = b"world" if n % 2 else b"hello"
    time.sleep(0.1)
"""


def test_deny_io_uring_without_a_filter():
    spec: dict = {"process": {}}
    assert deny_io_uring(spec, "x86_64")
    sc = spec["linux"]["seccomp"]
    assert sc["defaultAction"] == "SCMP_ACT_ALLOW" and "SCMP_ARCH_X86" in sc["architectures"]
    assert sc["syscalls"] == [{"names": list(IO_URING_SYSCALLS), "action": "SCMP_ACT_ERRNO", "errnoRet": 38}]
    again = copy.deepcopy(spec)
    assert not deny_io_uring(again, "x86_64") and again == spec          # idempotent


def test_deny_io_uring_narrows_a_profile_and_never_widens_it():
    allowlist = {"linux": {"seccomp": {"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [
        {"names": ["read", "io_uring_setup", "write"], "action": "SCMP_ACT_ALLOW"},
        {"names": ["io_uring_enter"], "action": "SCMP_ACT_ALLOW"}]}}}
    assert deny_io_uring(allowlist, "x86_64")
    # The calls leave the allow rules; the default (an errno) denies them: no rule needs adding.
    assert allowlist["linux"]["seccomp"]["syscalls"] == [{"names": ["read", "write"], "action": "SCMP_ACT_ALLOW"}]
    denylist = {"linux": {"seccomp": {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
        {"names": ["io_uring_setup"], "action": "SCMP_ACT_KILL"}]}}}
    assert deny_io_uring(denylist, "x86_64")
    # io_uring_setup keeps its own (stricter) rule: a second rule for it would conflict in libseccomp.
    assert denylist["linux"]["seccomp"]["syscalls"] == [
        {"names": ["io_uring_setup"], "action": "SCMP_ACT_KILL"},
        {"names": ["io_uring_enter", "io_uring_register"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38}]


def _ring_line(out: str) -> tuple[int, int]:
    m = re.search(r"io_uring_setup (-?\d+) errno (\d+)", out)
    assert m, out
    return int(m.group(1)), int(m.group(2))


@pytest.mark.root
@pytest.mark.runc
@pytest.mark.criu
def test_a_thaw_container_runs_without_io_uring_and_is_captured(thaw_env, tmp_path):
    bundle = make_bundle(str(tmp_path / "src"), [PYTHON, "-c", RING], python=True,
                         annotations={"thaw.dev/snapshot": "ring:1"})      # none yet: a cold start
    src = thaw_env.container(bundle)
    assert src.create() == 0, src.log_text()
    src.start()
    out = src.wait_output(lambda t: "alive 2" in t, timeout=60)
    assert _ring_line(out) == (-1, 38)                                      # ENOSYS, as without io_uring
    thaw_env.thaw("capture", src.id, "--name", "ring:1", "--root", thaw_env.root)

    dst = thaw_env.container(make_bundle(str(tmp_path / "dst"), [PYTHON, "-c", RING], python=True,
                                         annotations={"thaw.dev/snapshot": "ring:1"}))
    assert dst.create() == 0, dst.log_text()
    dst.start()
    assert "restored" in dst.log_text() or dst.state()["status"] == "running"
    events = thaw_env.thaw("events", "--json", "--container", dst.id).stdout
    assert '"restored"' in events, events
    dst.wait_output(lambda t: "alive" in t, timeout=30)
    src.destroy()
    dst.destroy()


@pytest.mark.root
@pytest.mark.runc
@pytest.mark.criu
def test_capture_refuses_a_ring_up_front_naming_the_process(thaw_env, tmp_path):
    # Created without thaw.dev/snapshot: thaw-runtime hands it to runc untouched, io_uring works.
    src = thaw_env.container(make_bundle(str(tmp_path / "src"), [PYTHON, "-c", RING], python=True))
    assert src.create() == 0, src.log_text()
    src.start()
    out = src.wait_output(lambda t: "alive 2" in t, timeout=60)
    fd, _ = _ring_line(out)
    assert fd >= 0, out
    proc = thaw_env.thaw("capture", src.id, "--name", "ring:2", "--root", thaw_env.root, check=False)
    assert proc.returncode != 0
    err = proc.stderr
    assert f"pid {src.pid()} (python3)" in err and "io_uring" in err and "seccomp" in err, err
    assert "mapfile" not in err and "runc checkpoint" not in err, err     # never CRIU's raw error
    assert src.state()["status"] == "running"                              # never frozen
    n = len(re.findall("alive", src.output()))
    src.wait_output(lambda t: len(re.findall("alive", t)) > n, timeout=10)
    assert "ring:2" not in thaw_env.thaw("ls").stdout
    src.destroy()


@pytest.mark.root
@pytest.mark.runc
@pytest.mark.criu
def test_linked_deleted_shm_files_restore_without_leftovers(thaw_env, tmp_path):
    src = thaw_env.container(make_bundle(str(tmp_path / "src"), [PYTHON, "-c", SEMAPHORES], python=True))
    assert src.create() == 0, src.log_text()
    src.start()
    src.wait_output(lambda t: " n 3 " in t or "n 3 " in t, timeout=60)
    assert any(n.startswith("sem.mp-") for n in os.listdir(f"/proc/{src.pid()}/root/dev/shm"))
    thaw_env.thaw("capture", src.id, "--name", "sem:1", "--root", thaw_env.root)
    # CRIU made its link_remap.N links for the dump and removed them from the running source.
    assert not [n for n in os.listdir(f"/proc/{src.pid()}/root/dev/shm") if n.startswith("link_remap")]
    snap = json.loads(thaw_env.thaw("inspect", "sem:1").stdout)
    assert snap["config"]["sizes"]["criu_bytes"] > 0
    src.destroy()

    dst = thaw_env.container(make_bundle(str(tmp_path / "dst"), [PYTHON, "-c", SEMAPHORES], python=True,
                                         annotations={"thaw.dev/snapshot": "sem:1"}))
    assert dst.create() == 0, dst.log_text()
    dst.start()
    out = dst.wait_output(lambda t: len(re.findall(r"^n \d+", t, re.M)) >= 3, timeout=30)
    lines = [ln for ln in out.splitlines() if ln.startswith("n ")]
    assert int(lines[0].split()[1]) > 3, dst.log_text()                     # the loop went on
    for ln in lines:
        # the open file and the linked name are still one inode, the semaphore still works
        assert " same True " in ln and re.search(r"seen (hello|world)", ln), ln
        assert "link_remap" not in ln, ln                                   # CRIU removed its links
    assert not [n for n in os.listdir(f"/proc/{dst.pid()}/root/dev/shm") if n.startswith("link_remap")]
    dst.destroy()


ROOTFS_LINKED = r"""
import os, time
fd = os.open("/tmp/tmp.layout", os.O_RDWR | os.O_CREAT, 0o600)
os.link("/tmp/tmp.layout", "/tmp/final.layout")
os.unlink("/tmp/tmp.layout")
n = 0
while True:
    n += 1
    print(f"alive {n}", flush=True)
    time.sleep(0.1)
"""


@pytest.mark.root
@pytest.mark.runc
@pytest.mark.criu
def test_capture_refuses_a_linked_deleted_file_on_the_rootfs(thaw_env, tmp_path):
    """On the root file system CRIU's link_remap.N would be gone before thaw's rootfs diff is
    taken: the snapshot could never be restored, so the capture refuses, naming the file."""
    src = thaw_env.container(make_bundle(str(tmp_path / "src"), [PYTHON, "-c", ROOTFS_LINKED], python=True))
    assert src.create() == 0, src.log_text()
    src.start()
    src.wait_output(lambda t: "alive 2" in t, timeout=60)
    proc = thaw_env.thaw("capture", src.id, "--name", "rootfs:1", "--root", thaw_env.root, check=False)
    assert proc.returncode != 0
    assert f"pid {src.pid()} (python3) /tmp/tmp.layout" in proc.stderr and "tmpfs" in proc.stderr, proc.stderr
    assert "runc checkpoint" not in proc.stderr
    assert src.state()["status"] == "running" and "rootfs:1" not in thaw_env.thaw("ls").stdout
    src.destroy()
