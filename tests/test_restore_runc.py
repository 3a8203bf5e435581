"""Capture and restore through thaw-runtime with the real runc and CRIU, driven the way
containerd's runc v2 shim drives a runtime."""

from __future__ import annotations

import json
import os
import re
import tarfile
import threading

import pytest

from helpers import PYTHON, make_bundle, tcp_in_netns, unique, wait_for

pytestmark = [pytest.mark.root, pytest.mark.runc, pytest.mark.criu]

COUNTER = ["sh", "-c", "i=0; while true; do echo tick $i; i=$((i+1)); sleep 0.05; done"]

HEAP_PROGRAM = r"""
import hashlib, os, sys, time
# State built from fresh randomness: a cold start can never reproduce it.
heap = {i: os.urandom(32) for i in range(50000)}
digest = hashlib.sha256(b"".join(heap[i] for i in range(50000))).hexdigest()
n = 0
while True:
    n += 1
    # recomputed from the live heap every time: proves the heap itself survived
    live = hashlib.sha256(b"".join(heap[i] for i in range(50000))).hexdigest()
    print(f"heap {digest} live {live} n {n}", flush=True)
    time.sleep(0.1)
"""


NETWORK_LOCK_NFTABLES = 1      # CRIU's enum NETWORK_LOCK_METHOD: iptables 0, nftables 1, skip 2


def inventory_field(path: str, number: int) -> int:
    """A varint field of CRIU's inventory_entry (images/inventory.proto; 0 when absent): the image
    is two magic words, a 32-bit length and the protobuf message."""
    with open(path, "rb") as f:
        data = f.read()
    size = int.from_bytes(data[8:12], "little")
    msg, i = data[12:12 + size], 0

    def varint() -> int:
        nonlocal i
        value = shift = 0
        while True:
            b = msg[i]
            i += 1
            value |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                return value
    while i < len(msg):
        key = varint()
        field, wire = key >> 3, key & 7
        if wire == 0:
            value = varint()
            if field == number:
                return value
        elif wire == 2:
            i += varint()
        elif wire == 1:
            i += 8
        elif wire == 5:
            i += 4
        else:
            raise ValueError(f"{path}: wire type {wire}")
    return 0


def ticks(text: str) -> list[int]:
    return [int(x) for x in re.findall(r"tick (\d+)", text)]


def capture(env, cid: str, name: str, *extra: str) -> None:
    env.thaw("capture", cid, "--name", name, "--root", env.root, *extra)


def start_counter(env, tmp_path, annotations=None, name="src"):
    bundle = make_bundle(str(tmp_path / name), COUNTER, annotations=annotations)
    c = env.container(bundle, unique(name))
    assert c.create() == 0, c.log_text()
    c.start()
    c.wait_output(lambda t: len(ticks(t)) > 20)
    return c


def test_counter_continues_on_new_pipes(thaw_env, tmp_path):
    src = start_counter(thaw_env, tmp_path)
    before = max(ticks(src.output()))                   # printed before the capture began
    capture(thaw_env, src.id, "counter:v1")
    snap = json.loads(thaw_env.thaw("inspect", "counter:v1").stdout)
    assert snap["ref"] == "counter:v1" and snap["config"]["sizes"]["criu_bytes"] > 0
    src.destroy()                                       # all its output read
    after = max(ticks(src.output()))                    # printed by the time it was killed

    # The same command: a cold start would count from 0, the restored loop goes on.
    bundle = make_bundle(str(tmp_path / "dst"), COUNTER, annotations={"thaw.dev/snapshot": "counter:v1"})
    dst = thaw_env.container(bundle)
    assert dst.create() == 0, dst.log_text()
    assert dst.state()["status"] == "running"
    dst.start()                                     # a no-op for a restored container
    out = dst.wait_output(lambda t: len(ticks(t)) > 10)
    got = ticks(out)
    # The dump froze the loop between `before` and `after`: it goes on with the next number.
    assert before < got[0] <= after + 1, (before, after, got[:5])
    assert got == list(range(got[0], got[0] + len(got)))  # contiguous: the same loop continued
    assert dst.pid() == dst.state()["pid"]
    assert os.path.exists(os.path.join(thaw_env.state, "containers", dst.id + ".json"))
    dst.destroy()
    assert thaw_env.state_entries() == []                # delete clears thaw's state


STDIO = ["sh", "-c", "i=0; while true; do echo out $i; echo err $i >&2; i=$((i+1)); sleep 0.05; done"]


def streams(c) -> tuple[list[str], list[str]]:
    return "".join(c.stdout).splitlines(), "".join(c.stderr).splitlines()


def test_a_restored_container_gets_the_callers_stdout_and_stderr_as_a_runc_container_does(thaw_env, tmp_path):
    """The restored processes write into the stdout and stderr the shim handed to this create,
    each stream to its own pipe, as runc gives a container it starts; and nothing else reaches
    them (runc's and CRIU's messages go to their logs)."""
    src = thaw_env.container(make_bundle(str(tmp_path / "src"), STDIO), runtime="runc")
    assert src.create() == 0
    src.start()
    wait_for(lambda: len(streams(src)[1]) > 10, 30, "the source's stderr")
    capture(thaw_env, src.id, "stdio:1")
    src.destroy()
    dst = thaw_env.container(make_bundle(str(tmp_path / "dst"), STDIO, annotations={"thaw.dev/snapshot": "stdio:1"}))
    assert dst.create() == 0 and "restored" in dst.log_text(), dst.log_text()
    wait_for(lambda: all(len(s) > 10 for s in streams(dst)), 30, "the restored container's stdout and stderr")
    dst.destroy()
    for c in (src, dst):
        out, err = streams(c)
        assert out and all(re.fullmatch(r"out \d+", line) for line in out), out[:5]
        assert err and all(re.fullmatch(r"err \d+", line) for line in err), err[:5]
    last = int(streams(src)[0][-1].split()[1])
    assert int(streams(dst)[0][0].split()[1]) <= last + 1           # the same loop went on: not from 0
    assert int(streams(dst)[0][0].split()[1]) > 10


def test_tcp_server_restored_into_other_netns(thaw_env, tmp_path, netns_pair):
    ns_src, ns_dst = netns_pair
    script = ("i=0; mkdir -p /www; while true; do echo $i > /www/n; mv /www/n /www/count; i=$((i+1)); sleep 0.05; done & "
              "exec httpd -f -p 8080 -h /www")
    bundle = make_bundle(str(tmp_path / "src"), ["sh", "-c", script], netns=ns_src)
    src = thaw_env.container(bundle)
    assert src.create() == 0
    src.start()
    def count(ns: str) -> int:
        try:
            answer = tcp_in_netns(ns, 8080, b"GET /count HTTP/1.0\r\n\r\n")
        except ConnectionError:
            return -1
        return int(answer.split(b"\r\n\r\n")[1]) if b"200 OK" in answer else -1
    before = wait_for(lambda: (lambda n: n > 5 and n)(count(ns_src)), 20, "the server's count to pass 5")
    capture(thaw_env, src.id, "web:1")
    src.destroy()
    # Dumped with the in-process nftables lock (shim/drivers/criu.py dump_options): the restore below then
    # unlocks without running iptables-restore, and its server must still be reachable.
    info = json.loads(thaw_env.thaw("inspect", "web:1").stdout)
    images = os.path.join(thaw_env.store, "images", info["manifest"].split(":")[1])
    assert inventory_field(os.path.join(images, "inventory.img"), 11) == NETWORK_LOCK_NFTABLES

    bundle2 = make_bundle(str(tmp_path / "dst"), ["sh", "-c", script],
                          netns=ns_dst, annotations={"thaw.dev/snapshot": "web:1"})
    dst = thaw_env.container(bundle2)
    assert dst.create() == 0, dst.log_text()
    dst.start()
    n1 = count(ns_dst)
    assert n1 >= before                     # served at once, by the restored server, from where it was
    wait_for(lambda: count(ns_dst) > n1, 10, "the captured loop to go on counting")
    dst.destroy()


def test_a_plain_rootfs_diff_holds_only_what_the_container_wrote(thaw_env, tmp_path):
    """A bundle's rootfs that is a plain directory has no base to compare with: the diff is what
    changed after the container was created (runc's `created` time), not the image around it."""
    writer = ["sh", "-c", "mkdir -p /tmp/app; echo state > /tmp/app/state; touch -d @1000000000 /tmp/app/old; "
              "echo ok; exec sleep 1000"]
    src = thaw_env.container(make_bundle(str(tmp_path / "src"), writer))
    assert src.create() == 0
    src.start()
    src.wait_output(lambda t: "ok" in t)
    capture(thaw_env, src.id, "plain:1")
    src.destroy()
    info = json.loads(thaw_env.thaw("inspect", "plain:1").stdout)
    layer = next(desc for desc in info["layers"] if "rootfs.diff" in desc["mediaType"])
    blob = os.path.join(thaw_env.store, "layout", "blobs", "sha256", layer["digest"].split(":")[1])
    with tarfile.open(blob) as tar:
        names = tar.getnames()
    # tmp/app/old has an old mtime but a new ctime: it was written after the create too
    assert names == ["tmp", "tmp/app", "tmp/app/old", "tmp/app/state"], names
    assert info["config"]["sizes"]["rootfs_entries"] == 4


def test_a_loopback_server_in_its_own_network_namespace_answers_after_restore(thaw_env, tmp_path):
    """A bare runc bundle with a network namespace of its own (no path): the restored server must
    answer on 127.0.0.1 inside it, as it did before the capture."""
    from thaw.shim.drivers import engine
    serve = ["sh", "-c", "mkdir -p /www; echo hello > /www/index.html; exec httpd -f -p 127.0.0.1:8080 -h /www"]
    src = thaw_env.container(make_bundle(str(tmp_path / "src"), serve))
    assert src.create() == 0
    src.start()
    wait_for(lambda: engine.ready("http://127.0.0.1:8080/", src.pid()), 10, "the source server")
    capture(thaw_env, src.id, "own-netns:1")
    src.destroy()
    dst = thaw_env.container(make_bundle(str(tmp_path / "dst"), serve, annotations={"thaw.dev/snapshot": "own-netns:1"}))
    assert dst.create() == 0 and "restored" in dst.log_text(), dst.log_text()
    dst.start()
    try:
        wait_for(lambda: engine.ready("http://127.0.0.1:8080/", dst.pid()), 5, "the restored server on loopback")
    finally:
        dst.destroy()


def test_python_heap_survives(thaw_env, tmp_path):
    bundle = make_bundle(str(tmp_path / "src"), [PYTHON, "-c", HEAP_PROGRAM], python=True)
    src = thaw_env.container(bundle)
    assert src.create() == 0, src.log_text()
    src.start()
    out = src.wait_output(lambda t: " n 3" in t, timeout=60)
    heap = re.search(r"heap (\w+)", out)
    assert heap, out
    digest = heap.group(1)
    capture(thaw_env, src.id, "heap:1", "--exit")
    assert src.state() is None or src.state()["status"] == "stopped"
    src.destroy()

    # The same program: a cold start would draw another random heap, so another digest.
    bundle2 = make_bundle(str(tmp_path / "dst"), [PYTHON, "-c", HEAP_PROGRAM], python=True,
                          annotations={"thaw.dev/snapshot": "heap:1"})
    dst = thaw_env.container(bundle2)
    assert dst.create() == 0, dst.log_text()
    dst.start()
    out = dst.wait_output(lambda t: t.count("heap ") >= 3, timeout=30)
    lines = [line for line in out.splitlines() if line.startswith("heap ")]
    for line in lines:
        _, d, _, live, _, _n = line.split()
        assert d == digest and live == digest
    assert int(lines[0].split()[-1]) > 3           # the loop counter continued
    dst.destroy()


def test_four_concurrent_restores(thaw_env, tmp_path):
    src = start_counter(thaw_env, tmp_path)
    capture(thaw_env, src.id, "counter:multi")
    src.destroy()
    containers = []
    for i in range(4):
        b = make_bundle(str(tmp_path / f"d{i}"), COUNTER, annotations={"thaw.dev/snapshot": "counter:multi"})
        containers.append(thaw_env.container(b))
    rcs = [None] * 4
    threads = [threading.Thread(target=lambda i=i: rcs.__setitem__(i, containers[i].create()))
               for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert rcs == [0, 0, 0, 0], [c.log_text()[-500:] for c in containers]
    pids = set()
    for c in containers:
        c.start()
        assert ticks(c.wait_output(lambda t: len(ticks(t)) > 5))[0] > 20      # restored, not cold
        pids.add(c.pid())
    assert len(pids) == 4
    for c in containers:
        c.destroy()
    assert thaw_env.state_entries() == []


def test_export_import_between_stores(thaw_env, tmp_path):
    src = start_counter(thaw_env, tmp_path)
    capture(thaw_env, src.id, "counter:x")
    src.destroy()
    archive = str(tmp_path / "counter.tar")
    thaw_env.thaw("export", "counter:x", archive)
    digest = json.loads(thaw_env.thaw("inspect", "counter:x").stdout)["manifest"]

    # A second node: a fresh store; import, then restore from it.
    thaw_env.store = str(tmp_path / "store-b")
    thaw_env.write_config(trust={"unsigned": ["import"]})     # unsigned: signatures are test_provenance's
    assert "counter:x" not in thaw_env.thaw("ls").stdout
    thaw_env.thaw("import", archive, "-n", "_local")
    assert json.loads(thaw_env.thaw("inspect", "counter:x").stdout)["manifest"] == digest
    b = make_bundle(str(tmp_path / "dst"), COUNTER, annotations={"thaw.dev/snapshot": "counter:x"})
    dst = thaw_env.container(b)
    assert dst.create() == 0
    dst.start()
    assert ticks(dst.wait_output(lambda t: len(ticks(t)) > 5))[0] > 20      # restored, not cold
    dst.destroy()
    thaw_env.thaw("rm", "counter:x")
    assert thaw_env.thaw("inspect", "counter:x", check=False).returncode != 0


def test_cli_errors_are_clear(thaw_env):
    p = thaw_env.thaw("capture", "no-such-container", "--name", "x:1", "--root", thaw_env.root, check=False)
    assert p.returncode != 0 and "not found" in p.stderr
    p = thaw_env.thaw("capture", "c", "--name", "Bad Name", check=False)
    assert p.returncode != 0 and "invalid snapshot" in p.stderr
    p = thaw_env.thaw("inspect", "missing:1", check=False)
    assert p.returncode != 0 and "not found" in p.stderr
