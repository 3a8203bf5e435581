"""Behaviours that no other test pinned (each found by a deliberate break that the whole suite
missed; bench/mutations.py keeps the list): policy prefixes, the identity comparison's seccomp
and capability sets, CRIU's fill options for each probe result, the prefetch memory floor, the
store's image seal and its directory's mode, runc's pid-file temp and CRIU's stdio map. Unit
tests: no root, no runc."""

from __future__ import annotations

import json
import os
import stat

import pytest

from helpers import fake_snapshot
from thaw.shim.drivers import criu
from thaw.shim.drivers.runc import RuncError, pid_file_temp, stdio_descriptors
from thaw.shim.lifecycle import fingerprint, prefetch
from thaw.shim.node.config import Config, Registry
from thaw.shim.node.store import Store

# --- policy: repository prefixes match whole path components ---------------------------------------

@pytest.mark.parametrize("name, allowed", [
    ("reg.example/team-a", True),                 # the prefix itself
    ("reg.example/team-a/worker", True),          # below it
    ("reg.example/team-ab/worker", False),        # a longer component, not below it
    ("reg.example/team-a-b", False),
    ("reg.example:5000/team-a/worker", False),    # another port is another registry
    ("other.example/team-a/worker", False),
])
def test_repository_prefixes_match_whole_path_components(name, allowed):
    policy = Registry(pull={"ns": ["reg.example/team-a/"]}, push={"ns": ["reg.example/team-a"]})
    registry, _, repository = name.partition("/")
    assert policy.allows("pull", "ns", registry, repository) is allowed
    assert policy.allows("push", "ns", registry, repository) is allowed
    assert not policy.allows("pull", "other-ns", registry, repository)


# --- restore: what the identity comparison looks at ------------------------------------------------

def _spec(**process) -> dict:
    base = {"process": {"user": {"uid": 0, "gid": 0}, "args": ["sh"], "cwd": "/",
                        "capabilities": {k: ["CAP_KILL"] for k in ("bounding", "effective", "permitted")}},
            "linux": {}}
    base["process"].update(process)
    return base


def _differs(a: dict, b: dict) -> list[str]:
    return fingerprint.compare_identity(fingerprint.identity(a), fingerprint.identity(b), ())


def test_seccomp_profiles_are_compared_whole_not_by_default_action():
    allow_ptrace = {"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [{"names": ["ptrace"], "action": "SCMP_ACT_ALLOW"}]}
    allow_read = {"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [{"names": ["read"], "action": "SCMP_ACT_ALLOW"}]}
    a, b = _spec(), _spec()
    a["linux"]["seccomp"], b["linux"]["seccomp"] = allow_ptrace, allow_read
    assert [r for r in _differs(a, b) if "seccomp" in r]
    b["linux"]["seccomp"] = json.loads(json.dumps(allow_ptrace))
    assert _differs(a, b) == []


@pytest.mark.parametrize("kind", ["ambient", "inheritable"])
def test_ambient_and_inheritable_capabilities_are_compared(kind):
    """A capturing spec that granted an ambient (inheritable) capability the new one does not:
    refused (the new spec may grant more, never less)."""
    captured, new = _spec(), _spec()
    captured["process"]["capabilities"][kind] = ["CAP_KILL"]
    reasons = _differs(captured, new)
    assert reasons and any("capabilities" in r for r in reasons), reasons
    assert _differs(new, captured) == []


# --- restore: CRIU's fill options for each probe result --------------------------------------------

HAVE = frozenset({criu.PAGE_WORKERS, criu.PAGE_HUGEPAGES})


@pytest.mark.parametrize("workers, hugepages, have, probe, want", [
    (4, "auto", HAVE, {"hugepages_faster": True}, (f"{criu.PAGE_WORKERS} 4", criu.PAGE_HUGEPAGES)),
    (4, "auto", HAVE, {"hugepages_faster": False}, (f"{criu.PAGE_WORKERS} 4",)),
    (4, "auto", HAVE, None, (f"{criu.PAGE_WORKERS} 4",)),                     # no probe: off
    (4, "on", HAVE, None, (f"{criu.PAGE_WORKERS} 4", criu.PAGE_HUGEPAGES)),
    (4, "off", HAVE, {"hugepages_faster": True}, (f"{criu.PAGE_WORKERS} 4",)),
    (4, "on", frozenset({criu.PAGE_WORKERS}), None, (f"{criu.PAGE_WORKERS} 4",)),  # CRIU lacks huge pages
    (0, "on", HAVE, {"hugepages_faster": True}, ()),                          # workers 0: stock fill
    (4, "on", frozenset(), None, ()),                                         # a stock CRIU
])
def test_restore_options_follow_the_config_the_criu_and_the_probe(workers, hugepages, have, probe, want):
    assert criu.restore_options(workers, hugepages, have, probe) == want


# --- prefetch: the memory floor ---------------------------------------------------------------------

def test_prefetch_keeps_a_gib_or_a_tenth_of_the_node_available():
    with open("/proc/meminfo") as f:
        total = int(f.readline().split()[1]) * 1024
    assert prefetch.floor_bytes() == max(1 << 30, total // 10)


# --- store: the image seal and the store's mode ------------------------------------------------------

@pytest.fixture
def store(tmp_path):
    return Store.for_config(Config(store_dir=str(tmp_path / "store"), state_dir=str(tmp_path / "state"))).init()


def test_store_dir_is_root_only(store):
    assert stat.S_IMODE(os.stat(store.root).st_mode) == 0o700
    os.chmod(store.root, 0o755)
    store.init()
    assert stat.S_IMODE(os.stat(store.root).st_mode) == 0o700


def test_an_extra_file_in_an_image_directory_fails_its_seal(store, tmp_path):
    snap = fake_snapshot(store, "app:1")
    path = store.image_path(snap)
    with open(os.path.join(path, "planted.img"), "wb") as f:
        f.write(b"not CRIU's")
    with store.image_dir(snap) as image_dir:         # the seal fails; the repair drops what is extra
        assert sorted(os.listdir(image_dir)) == ["descriptors.json", "inventory.img", "pages-1.img"]
    events = [json.loads(line)["msg"] for line in open(os.path.join(str(tmp_path / "state"), "events.log"))]
    assert any("sealed again" in m for m in events), events


def test_a_seal_without_digests_is_not_trusted_and_a_repair_writes_them(store, tmp_path):
    """A seal whose whole files carry no digests cannot vouch for them: when it fails, those files
    are rebuilt from their verified tar (not "content intact"), and the new seal has digests."""
    snap = fake_snapshot(store, "app:1")
    seal = store.images.seal_path(snap)
    with open(seal) as f:
        sealed = json.load(f)
    whole = set(sealed["files"]) - {p.file for p in snap.parts}
    assert whole and all(sealed["files"][n]["digest"] for n in sealed["files"])   # publish wrote them
    for meta in sealed["files"].values():
        meta["digest"] = None
    with open(seal, "w") as f:
        json.dump(sealed, f)
    os.utime(os.path.join(store.image_path(snap), "inventory.img"), (1, 1))      # the seal fails
    with store.image_dir(snap):
        pass
    with open(seal) as f:
        resealed = json.load(f)["files"]
    assert all(resealed[n]["digest"] for n in whole), resealed
    events = [json.loads(line)["msg"] for line in open(os.path.join(str(tmp_path / "state"), "events.log"))]
    assert any("rebuilt" in m and "inventory.img" in m for m in events), events


# --- runc: its pid-file temp, and the stdio CRIU hands the restored process ----------------------

def test_runc_s_pid_file_temp_is_a_dot_file_beside_it():
    assert pid_file_temp("/run/c/b1/init.pid") == "/run/c/b1/.init.pid"


def test_stdio_descriptors_are_the_first_three_and_must_be_strings(tmp_path):
    (tmp_path / "descriptors.json").write_text(json.dumps(["pipe:[1]", "/dev/null", "pipe:[2]", "socket:[3]"]))
    assert stdio_descriptors(str(tmp_path)) == ["pipe:[1]", "/dev/null", "pipe:[2]"]
    (tmp_path / "descriptors.json").write_text(json.dumps({"0": "pipe:[1]"}))
    with pytest.raises(RuncError):
        stdio_descriptors(str(tmp_path))
