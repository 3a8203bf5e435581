"""The GPU logic that needs no GPU: CUDA process discovery, UUID pairing, a container's GPUs from
its spec and the driver's proc files, the GPU part of the fingerprint."""

import subprocess
import sys
import time

import pytest

from thaw.oci.snapshot import Fingerprint, NodeFingerprint
from thaw.shim.drivers import cuda
from thaw.shim.lifecycle import fingerprint


def test_process_tree_and_discovery_with_a_state_oracle():
    child = subprocess.Popen([sys.executable, "-c",
                              "import subprocess,sys,time; p=subprocess.Popen([sys.executable,'-c','import time; time.sleep(30)']); time.sleep(30)"])
    try:
        for _ in range(100):
            tree = cuda.process_tree(child.pid)
            if len(tree) == 2:
                break
            time.sleep(0.05)
        assert tree[0] == child.pid and len(tree) == 2
        grandchild = tree[1]
        states = {grandchild: "CHECKPOINTED", child.pid: "RUNNING"}
        found = cuda.cuda_pids(child.pid, ("CHECKPOINTED",), get_state=states.get, prefilter=lambda p: True)
        assert found == [grandchild]
        # the cheap prefilter keeps non-CUDA processes away from the driver entirely
        asked = []
        cuda.cuda_pids(child.pid, ("RUNNING",), get_state=lambda p: asked.append(p), prefilter=cuda.maps_cuda)
        assert asked == []
    finally:
        child.kill()
        child.wait()
    assert cuda.process_tree(child.pid) == []


def test_uuid_parsing_and_pairs():
    u = "GPU-81accdc1-92a2-4975-c6fe-6788ec816806"
    assert cuda.uuid_bytes(u).hex() == "81accdc192a24975c6fe6788ec816806"
    with pytest.raises(ValueError):
        cuda.uuid_bytes("GPU-nothex")
    assert cuda.gpu_pairs([u], [u]) == []
    assert cuda.gpu_pairs(["GPU-a", "GPU-b"], ["GPU-c", "GPU-d"]) == [("GPU-a", "GPU-c"), ("GPU-b", "GPU-d")]
    with pytest.raises(ValueError):
        cuda.gpu_pairs(["GPU-a"], ["GPU-c", "GPU-d"])


@pytest.fixture
def proc_gpus(tmp_path):
    for minor, (bus, uuid) in enumerate([("0000:00:06.0", "GPU-aaaa"), ("0000:00:07.0", "GPU-bbbb")]):
        d = tmp_path / bus
        d.mkdir()
        (d / "information").write_text(f"Model: \t\t NVIDIA H100 80GB HBM3\nGPU UUID: \t {uuid}\n"
                                       f"Device Minor: \t {minor}\nBus Location: \t {bus}\n")
    return str(tmp_path)


def spec_with(*paths):
    devs = [{"path": p, "type": "c", "major": 195, "minor": int(p[len("/dev/nvidia"):]) if p[-1].isdigit() else 255}
            for p in paths]
    return {"linux": {"devices": devs}}


def test_container_gpus_from_spec(proc_gpus):
    gpus = cuda.node_gpus(proc_gpus)
    assert sorted(gpus) == [0, 1]
    spec = spec_with("/dev/nvidiactl", "/dev/nvidia1", "/dev/nvidia-uvm")
    assert cuda.spec_gpu_minors(spec) == [1]
    [g] = cuda.container_gpus(spec, gpus)
    assert g.uuid == "GPU-bbbb" and g.model == "NVIDIA H100 80GB HBM3"
    assert cuda.container_gpus({"linux": {}}, gpus) == []


def test_gpu_fingerprint_and_restore_onto_another_gpu(proc_gpus):
    gpus = cuda.node_gpus(proc_gpus)
    src = cuda.gpu_fingerprint(cuda.container_gpus(spec_with("/dev/nvidia0"), gpus), driver="580.159.04")
    dst = cuda.gpu_fingerprint(cuda.container_gpus(spec_with("/dev/nvidia1"), gpus), driver="580.159.04")
    assert src.uuids == ("GPU-aaaa",) and dst.uuids == ("GPU-bbbb",)
    snap = Fingerprint(NodeFingerprint(gpu=src))
    here = Fingerprint(NodeFingerprint(gpu=dst))
    reasons = [r for r in fingerprint.compare(snap, here) if r.startswith("gpu")]
    assert reasons == []                        # same model: restorable, UUIDs get paired
    assert cuda.gpu_pairs(list(src.uuids), list(dst.uuids)) == [("GPU-aaaa", "GPU-bbbb")]
    both = cuda.gpu_fingerprint(cuda.container_gpus(spec_with("/dev/nvidia0", "/dev/nvidia1"), gpus), driver="x")
    assert both.count == 2
    reasons = fingerprint.compare(snap, Fingerprint(NodeFingerprint(gpu=both)))
    assert any("gpu count" in r for r in reasons)


def test_driver_version_parse(tmp_path):
    p = tmp_path / "version"
    p.write_text("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.159.04  Release Build  (dvs-builder@U22)\n"
                 "GCC version:  gcc version 12.3.0\n")
    assert cuda.driver_version(str(p)) == "580.159.04"
    p.write_text("NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15  Tue Mar  5 22:23:56 UTC 2024\n")
    assert cuda.driver_version(str(p)) == "550.54.15"
    assert cuda.driver_version(str(tmp_path / "missing")) is None


@pytest.mark.no_gpu
def test_available_is_false_without_a_driver():
    assert cuda.available() is False
