import copy
from typing import Any

from thaw.oci.snapshot import Fingerprint
from thaw.oci.spec import Bundle
from thaw.shim.lifecycle import fingerprint

BASE: dict[str, Any] = {
    "node": {"kernel": "6.18.44", "arch": "x86_64", "cpu_flags": ["avx", "avx2", "sse4_2"],
             "criu": "4.1.1", "runc": "1.1.5", "gpu": {}},
    "container": {"image": "img:1", "mounts": ["/dev", "/proc"]},
}


def compare(snap: dict, here: dict, **kw) -> list[str]:
    return fingerprint.compare(Fingerprint.from_json(snap), Fingerprint.from_json(here), **kw)


def variant(**changes):
    fp = copy.deepcopy(BASE)
    for path, value in changes.items():
        part, key = path.split("__")
        fp[part][key] = value
    return fp


def test_identical_is_compatible():
    assert compare(BASE, copy.deepcopy(BASE)) == []


def test_superset_cpu_and_newer_criu_ok():
    here = variant(node__cpu_flags=["avx", "avx2", "sse4_2", "avx512f"], node__criu="4.2")
    assert compare(BASE, here) == []


def test_each_mismatch_is_reported():
    cases = {
        "arch": variant(node__arch="aarch64"),
        "kernel": variant(node__kernel="6.1.0"),
        "cpu": variant(node__cpu_flags=["sse4_2"]),
        "criu": variant(node__criu="3.17.1"),
        "image": variant(container__image="img:2"),
        "mounts": variant(container__mounts=["/dev", "/proc", "/data"]),
    }
    for word, here in cases.items():
        reasons = compare(BASE, here)
        assert len(reasons) == 1 and reasons[0].startswith(word), (word, reasons)


def test_criu_missing_on_node():
    assert compare(BASE, variant(node__criu=None))[0].startswith("criu")


def test_an_unidentified_image_never_matches():
    assert compare(variant(container__image=None), variant(container__image=None))[0].startswith("image")


def test_gpu_rules():
    g = {"count": 1, "model": "NVIDIA H100 80GB HBM3", "driver": "580.159.04", "cuda": 13000, "uuids": ["GPU-a"]}
    snap = variant(node__gpu=g)
    assert compare(snap, variant(node__gpu=dict(g, uuids=["GPU-b"]))) == []
    assert compare(snap, variant(node__gpu={}))[0].startswith("gpu")
    assert compare(snap, variant(node__gpu=dict(g, model="NVIDIA H200")))[0].startswith("gpu model")
    assert compare(snap, variant(node__gpu=dict(g, driver="570.1")))[0].startswith("gpu driver")
    assert compare(snap, variant(node__gpu=dict(g, count=2)))[0].startswith("gpu count")


def test_container_part_from_bundle(tmp_path):
    b = Bundle(str(tmp_path), {"mounts": [{"destination": "/proc/"}, {"destination": "/dev"}],
                               "annotations": {"io.kubernetes.cri.sandbox-namespace": "ns1",
                                               "io.kubernetes.cri.image-name": "docker.io/x:1"}})
    c = fingerprint.container(b)
    assert c.mounts == ("/dev", "/proc") and c.image == "docker.io/x:1"


def test_cpu_flags_filter(tmp_path):
    p = tmp_path / "cpuinfo"
    p.write_text("processor: 0\nflags\t\t: fpu vme avx2 avx512f sse4_2 hypervisor lm\n")
    assert fingerprint.cpu_flags(str(p)) == ["avx2", "avx512f", "fpu", "sse4_2"]


def test_criu_version_cache(tmp_path):
    from thaw.shim.drivers import criu
    fake = tmp_path / "criu"
    fake.write_text("#!/bin/sh\necho calls >> " + str(tmp_path / "calls") + "\necho 'Version: 4.1.1'\n")
    fake.chmod(0o755)
    assert criu.version(str(fake), str(tmp_path)) == "4.1.1"
    assert criu.version(str(fake), str(tmp_path)) == "4.1.1"
    assert (tmp_path / "calls").read_text().count("calls") == 1      # second answer from the cache
    fake.write_text("#!/bin/sh\necho 'Version: 4.2'\n")                   # a new binary is asked again
    assert criu.version(str(fake), str(tmp_path)) == "4.2"
    assert criu.version(str(tmp_path / "missing"), str(tmp_path)) is None
