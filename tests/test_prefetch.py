"""Prefetch from the pod sandbox's create: thaw-runtime hands the sandbox's create to runc at once
and starts reading the snapshot the pod asks for into the page cache beside it — once per
snapshot however many pods ask, never delaying or failing the sandbox. `thaw warm` does the same."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time

import pytest

from helpers import make_bundle, wait_for

pytestmark = [pytest.mark.root, pytest.mark.runc, pytest.mark.criu]

COUNTER = ["sh", "-c", "i=0; while true; do echo tick $i; i=$((i+1)); sleep 0.05; done"]
POD = {"io.kubernetes.cri.container-type": "sandbox", "io.kubernetes.cri.sandbox-namespace": "_local"}


def events(env, kind: str) -> list[dict]:
    path = os.path.join(env.state, "events.log")
    return [e for e in (json.loads(line) for line in open(path)) if e["kind"] == kind] if os.path.exists(path) else []


def resident(path: str) -> int:
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--raw", "--output", "RES", path],
                         capture_output=True, text=True, check=True).stdout
    return int(out.split()[0])


@pytest.fixture
def snapshot(thaw_env, tmp_path) -> str:
    src = thaw_env.container(make_bundle(str(tmp_path / "src"), COUNTER))
    assert src.create() == 0
    src.start()
    src.wait_output(lambda t: "tick 10" in t)
    thaw_env.thaw("capture", src.id, "--name", "pre:1", "--root", thaw_env.root)
    src.destroy()
    manifest = json.loads(thaw_env.thaw("inspect", "pre:1").stdout)["manifest"]
    return os.path.join(thaw_env.store, "images", manifest.split(":")[1])


def sandbox(env, tmp_path, name: str, annotations: dict, fault: str | None = None):
    c = env.container(make_bundle(str(tmp_path / name), ["sleep", "1000"], annotations={**POD, **annotations}))
    t = time.perf_counter()
    assert c.create(env={"THAW_TEST_FAULTS": fault} if fault else None) == 0, c.log_text()
    return c, time.perf_counter() - t


def test_sandbox_create_starts_the_prefetch_and_does_not_wait(thaw_env, tmp_path, snapshot):
    subprocess.run(["sync"], check=True)
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("1\n")
    pages = max((os.path.join(snapshot, n) for n in os.listdir(snapshot)), key=os.path.getsize)
    assert resident(pages) < os.path.getsize(pages)
    # The prefetch is held 3 s at its start: the sandbox's create must be done long before.
    box, _ = sandbox(thaw_env, tmp_path, "box", {"thaw.dev/snapshot": "pre:1"}, "prefetch=sleep:3")
    assert box.state()["status"] == "created" and events(thaw_env, "prefetch") == []
    assert subprocess.run(["pgrep", "-f", "thaw-hook prepare _local pre:1"], capture_output=True).returncode == 0
    box.start()
    [done] = wait_for(lambda: events(thaw_env, "prefetch"), 30, "the prefetch")
    assert done["outcome"] == "warm" and done["bytes"] == sum(
        os.path.getsize(os.path.join(snapshot, n)) for n in os.listdir(snapshot))
    assert resident(pages) == os.path.getsize(pages)           # in the page cache now
    box.destroy()


def test_many_pods_one_prefetch(thaw_env, tmp_path, snapshot):
    boxes = [sandbox(thaw_env, tmp_path, f"box{i}", {"thaw.dev/snapshot": "pre:1"}, "prefetch=sleep:2")[0]
             for i in range(3)]
    wait_for(lambda: len(events(thaw_env, "prefetch")) == 3, 30, "every pod's prefetch to end")
    assert sorted(e["outcome"] for e in events(thaw_env, "prefetch")) == ["busy", "busy", "warm"]
    for b in boxes:
        b.destroy()


@pytest.mark.parametrize("annotations, outcome", [({"thaw.dev/snapshot": "absent:1"}, "absent"),
                                                 ({"thaw.dev/snapshot": "Bad Name!"}, None)])
def test_a_sandbox_never_fails_for_its_prefetch(thaw_env, tmp_path, annotations, outcome):
    box, _ = sandbox(thaw_env, tmp_path, "box", annotations)
    box.start()
    assert box.state()["status"] == "running"
    if outcome:
        [e] = wait_for(lambda: events(thaw_env, "prefetch"), 30, "the prefetch")
        assert e["outcome"] == outcome
    else:
        time.sleep(1)
        assert events(thaw_env, "prefetch") == []
    box.destroy()


def test_thaw_warm(thaw_env, snapshot):
    out = thaw_env.thaw("warm", "pre:1").stdout
    assert re.match(r"pre:1 \(_local\): warm, .* in [\d.]+s", out), out
    assert thaw_env.thaw("warm", "absent:1", check=False).returncode == 1


def test_prepare_warms_the_volume_weights_of_a_snapshot_that_holds_none(thaw_env, tmp_path):
    """A snapshot whose weights stay outside it (on a volume): `thaw-hook prepare`, which the pod
    sandbox's create starts, reads the weight files from the volume's recorded source into the
    page cache and their digests into the node's digest cache, so the restore neither waits for
    the disk nor hashes them."""
    import hashlib

    from helpers import fake_snapshot
    from thaw.oci import snapshot as fmt
    from thaw.shim.lifecycle import weights
    from thaw.shim.node.config import load
    from thaw.shim.node.store import Store
    volume = tmp_path / "volume"
    (volume / "m").mkdir(parents=True)
    data = os.urandom(3 << 20)
    (volume / "m" / "w.safetensors").write_bytes(data)
    wf = fmt.WeightFile("/models/m/w.safetensors", len(data), "sha256:" + hashlib.sha256(data).hexdigest(),
                        "volume", mount="/models", source=str(volume))
    config = fmt.SnapshotConfig(ref="w:1", fingerprint=fmt.Fingerprint(), phases={"total": 1.0},
                                weights=fmt.Weights(files=(wf,), outside=True))
    fake_snapshot(Store.for_config(load(thaw_env.config)).init(), "w:1", config=config)
    path = str(volume / "m" / "w.safetensors")
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    assert resident(path) < len(data)
    hook = load(thaw_env.config).hook
    subprocess.run([hook, "prepare", "_local", "w:1"], env={**os.environ, "THAW_CONFIG": thaw_env.config},
                   check=True, timeout=60)
    [done] = events(thaw_env, "prefetch")
    assert done["outcome"] == "warm" and "(weights 3 MiB)" in done["msg"], done
    assert resident(path) == len(data)
    assert weights.DigestCache(thaw_env.state).get(os.stat(path)) == wf.digest
    # Known from now on: a prepare reads only what the page cache lacks. The weights' pages
    # dropped: read again; everything cached: nothing read, the snapshot's files neither.
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    assert resident(path) < len(data)
    for weights_read in (3, 0):
        subprocess.run([hook, "prepare", "_local", "w:1"], env={**os.environ, "THAW_CONFIG": thaw_env.config},
                       check=True, timeout=60)
        done = events(thaw_env, "prefetch")[-1]
        assert done["outcome"] == "warm" and f"(weights {weights_read} MiB)" in done["msg"], done
        assert resident(path) == len(data)
    assert done["msg"].startswith("prefetch of w:1 (_local): warm: 0 MiB read, ") and "already cached" in done["msg"], done
