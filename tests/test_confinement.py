"""What CRIU restores is proven within the new spec (shim/lifecycle/confinement/), attacked for real: real
captures, forged the way an attacker would — the CRIU images re-encoded with the classes generated
from CRIU's .proto files, the snapshot re-packed with correct digests and brought in with
`thaw import` — and restored into a restricted spec. Each attack must cold-start with an event
naming the cause and leave nothing behind; the untouched snapshot must restore, also into a spec
that grants more than the captured one."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from typing import TYPE_CHECKING, Any

import pytest

from helpers import PYTHON, make_bundle, unique, wait_for
from thaw.oci import snapshot as fmt
from thaw.oci.annotations import SnapshotRef
from thaw.oci.digest import of_file
from thaw.shim.drivers import criu_decode, criu_images
from thaw.shim.drivers.criu_images import CORE_MAGIC, PSTREE_MAGIC, SECCOMP_MAGIC
from thaw.shim.drivers.runc import cgroup_dirs
from thaw.shim.lifecycle import confinement
from thaw.shim.lifecycle.confinement import kernel_check
from thaw.shim.node.store import Store

if TYPE_CHECKING:
    from conftest import ThawEnv

pytestmark = [pytest.mark.root, pytest.mark.runc, pytest.mark.criu]

# Two extra threads and a child task, so that there is a non-leader thread and a second task.
WORKLOAD = r"""
import subprocess, threading, time
for _ in range(2):
    threading.Thread(target=time.sleep, args=(10**6,), daemon=True).start()
child = subprocess.Popen(["/usr/bin/sleep", "1000000"])
i = 0
while True:
    print("tick", i, flush=True)
    i += 1
    time.sleep(0.05)
"""
SECCOMP: dict[str, Any] = {"defaultAction": "SCMP_ACT_ALLOW", "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_AARCH64"],
           "syscalls": [{"names": ["mount", "umount2"], "action": "SCMP_ACT_ERRNO"}]}


def proc_status(path: str) -> dict[str, str]:
    """A /proc status file's fields, read as the kernel check reads them."""
    return kernel_check.status_fields(kernel_check.read_text(path))


# Every capability this machine's root holds (the test machines' root lacks CAP_SYS_RESOURCE).
ALL_CAPS = ["CAP_" + name for name, bit in confinement.CAP_BITS.items()
            if int(proc_status("/proc/self/status")["CapBnd"], 16) >> bit & 1]
ALL_CAP_WORDS = [0xFFFFFFFF, (1 << (len(confinement.CAP_BITS) - 32)) - 1]
ALLOW_ALL_BPF = bytes([0x06, 0x00, 0x00, 0x00, 0x00, 0x00, 0xFF, 0x7F])   # BPF_RET|BPF_K SECCOMP_RET_ALLOW


def restricted(spec: dict, uid: int = 0) -> dict:
    """No capabilities, no-new-privs, a seccomp profile. uid 0: the test machines' root lacks
    CAP_SYS_RESOURCE, without which CRIU cannot dump another uid's process (prlimit); the uid
    attacks restore uid-0 images into a uid-1000 spec instead."""
    p = spec["process"]
    p["user"] = {"uid": uid, "gid": uid}
    p["capabilities"] = {k: [] for k in ("bounding", "effective", "inheritable", "permitted", "ambient")}
    p["noNewPrivileges"] = True
    spec["linux"]["seccomp"] = SECCOMP
    return spec  # changed in place; returned for a lambda that changes it further


def privileged(spec: dict) -> None:
    p = spec["process"]
    p["user"] = {"uid": 0, "gid": 0}
    p["capabilities"] = dict.fromkeys(("bounding", "effective", "permitted"), ALL_CAPS)
    p["noNewPrivileges"] = False
    spec["linux"].pop("seccomp", None)


def more_than_captured(spec: dict) -> None:
    """The restricted spec, granting more: capabilities, no NNP, no seccomp."""
    restricted(spec)
    p = spec["process"]
    p["capabilities"] = {k: ["CAP_NET_BIND_SERVICE", "CAP_KILL"] for k in ("bounding", "effective", "permitted")}
    p["noNewPrivileges"] = False
    del spec["linux"]["seccomp"]


def bundle(path: str, change, snapshot: str | None = None) -> str:
    b = make_bundle(path, [PYTHON, "-c", WORKLOAD], python=True,
                    annotations={"thaw.dev/snapshot": snapshot} if snapshot else None)
    cfg = os.path.join(b, "config.json")
    with open(cfg) as f:
        spec = json.load(f)
    change(spec)
    with open(cfg, "w") as f:
        json.dump(spec, f)
    return b


def ticks(text: str) -> list[int]:
    return [int(line.split()[1]) for line in text.splitlines() if line.startswith("tick ")]


@dataclasses.dataclass
class World:
    env: ThawEnv
    dir: str
    forged: int = 0


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """One thaw installation, with two real captures: `base` (the restricted spec) and `root`
    (uid 0, every capability, no NNP, no seccomp)."""
    from conftest import ThawEnv
    d = tmp_path_factory.mktemp("confinement")
    env = ThawEnv.in_dir(d)
    # Forged snapshots come in unsigned by `thaw import`: accepted here so that the images check is
    # what refuses them (provenance would refuse them first: tests/test_provenance.py).
    env.write_config(trust={"unsigned": ["import"]})
    old = os.environ.get("THAW_CONFIG")
    os.environ["THAW_CONFIG"] = env.config
    try:
        for name, change in (("base:1", restricted), ("root:1", privileged)):
            src = env.container(bundle(str(d / unique("src")), change))
            assert src.create() == 0, src.log_text()
            src.start()
            src.wait_output(lambda t: len(ticks(t)) > 10)
            env.thaw("capture", src.id, "--name", name, "--root", env.root)
            src.destroy()
        yield World(env, str(d))
    finally:
        for cid in env.runc_ids():
            subprocess.run(["runc", "--root", env.root, "delete", "--force", cid], capture_output=True)
        if old is None:
            os.environ.pop("THAW_CONFIG", None)
        else:
            os.environ["THAW_CONFIG"] = old


# --- the attacker's tool --------------------------------------------------------------------------

def read_one(images: str, name: str, magic: int, message):
    return criu_decode.read_file(os.path.join(images, name), magic, message, name != "pstree.img")


def write(images: str, name: str, magic: int, messages: list) -> None:
    path = os.path.join(images, name)
    with open(path, "wb") as f:
        f.write(criu_decode.encode(messages, magic, name))


def edit_core(images: str, tid: int, change) -> None:
    name = f"core-{tid}.img"
    [core] = read_one(images, name, CORE_MAGIC, criu_decode.schemas().core)
    change(core)
    write(images, name, CORE_MAGIC, [core])


def tasks(images: str) -> list:
    return read_one(images, "pstree.img", PSTREE_MAGIC, criu_decode.schemas().pstree)


def forge(world: World, source: str, images=None, config=None) -> str:
    """A snapshot made from `source`'s real files, its images edited by `images(dir)` and its
    config by `config(SnapshotConfig)`, re-packed into an archive with correct digests and brought
    in with `thaw import`, as an attacker (or a registry they push to) would. Returns its name."""
    env = world.env
    world.forged += 1
    ref = f"forged{world.forged}:1"
    store = Store(env.store)
    name, tag = source.split(":")
    snap = store.resolve(SnapshotRef(name, tag), "_local")
    work = Store(os.path.join(world.dir, unique("forge"))).init()
    with work.staging("capture") as staging:
        out = staging.new_dir("images")
        with store.image_dir(snap) as src:
            for name in os.listdir(src):
                shutil.copyfile(os.path.join(src, name), os.path.join(out, name))
        if images:
            images(out)
        whole, parts, hashes, _ = staging.package_images(out)
        with store.open_rootfs_layer(snap) as layer:
            rootfs = staging.put_stream(lambda w: shutil.copyfileobj(layer, w), fmt.ROOTFS_LAYER)
        deleted = staging.put_bytes(fmt.deleted_blob(store.deleted_paths(snap)), fmt.DELETED_LAYER)
        cfg = dataclasses.replace(snap.config, ref=ref)
        new = staging.write_snapshot(config(cfg) if config else cfg, whole, parts, rootfs, deleted)
        work.publish(new, out, "captured", hashes)
    archive = os.path.join(world.dir, ref.replace(":", "_") + ".tar")
    name, tag = ref.split(":")
    work.export(SnapshotRef(name, tag), "_local", archive)
    env.thaw("import", archive, "-n", "_local")
    return ref


# --- what a user sees ------------------------------------------------------------------------------

def cold_started(world: World, ref: str, *cause: str, uid: int = 0, also=None, others: tuple[str, ...] = ()) -> str:
    """Restore `ref` into the restricted spec (changed by `also`): it must cold-start, say why
    (every word of `cause` in the runtime log and the events log), and leave nothing of the
    restore behind."""
    env = world.env

    def change(spec):
        restricted(spec, uid)
        if also:
            also(spec)
    dst = env.container(bundle(os.path.join(world.dir, unique("dst")), change, ref))
    assert dst.create() == 0, dst.log_text()
    try:
        warnings = [e["msg"] for e in dst.log_entries() if e.get("level") == "warning"]
        assert len(warnings) == 1, warnings
        msg = warnings[0]
        assert "cold start" in msg, msg
        for word in cause:
            assert word in msg, (word, msg)
        events = [json.loads(line) for line in open(os.path.join(env.state, "events.log"))]
        [event] = [e for e in events if e.get("container") == dst.id and e["kind"] == "cold_start"]
        assert all(word in event["reason"] for word in cause), event
        # Nothing left behind: one container, its cgroup holding only runc's init (a restored task
        # that was not killed would still be there, stopped), no thaw record but the cold start's.
        assert sorted(env.runc_ids()) == sorted([dst.id, *others])     # others: the test's own
        with open(os.path.join(dst.bundle, "config.json")) as f:
            spec = json.load(f)
        for cg in [c for c in cgroup_dirs(spec, False) if os.path.exists(os.path.join(c, "cgroup.procs"))]:
            with open(os.path.join(cg, "cgroup.procs")) as f:
                assert f.read().split() == [str(dst.pid())], cg
        dst.start()
        out = dst.wait_output(lambda t: len(ticks(t)) > 2)
        assert ticks(out)[0] == 0                                 # started afresh
        st = proc_status(f"/proc/{dst.pid()}/status")
        assert st["Uid"].split() == [str(uid)] * 4 and st["CapEff"] == "0000000000000000"
        assert st["NoNewPrivs"] == "1" and st["Seccomp"] == "2"
        return msg
    finally:
        dst.destroy()


def restored(world: World, ref: str, change=restricted) -> dict[str, str]:
    env = world.env
    dst = env.container(bundle(os.path.join(world.dir, unique("dst")), change, ref))
    assert dst.create() == 0, dst.log_text()
    try:
        assert not [e for e in dst.log_entries() if e.get("level") == "warning"], dst.log_text()
        dst.start()
        assert ticks(dst.wait_output(lambda t: len(ticks(t)) > 12))[0] > 10     # it went on counting
        return proc_status(f"/proc/{dst.pid()}/status")
    finally:
        dst.destroy()


# --- positive controls --------------------------------------------------------------------------------

def test_the_captured_snapshot_restores_into_its_own_spec(world):
    st = restored(world, "base:1")
    assert st["Uid"].split() == ["0"] * 4 and st["CapEff"] == "0000000000000000"
    assert st["NoNewPrivs"] == "1" and st["Seccomp"] == "2" and st["Seccomp_filters"] == "1"


def test_a_spec_granting_more_than_captured_restores_and_the_process_keeps_less(world):
    st = restored(world, "base:1", more_than_captured)
    assert st["CapEff"] == "0000000000000000" and st["NoNewPrivs"] == "1" and st["Seccomp"] == "2"


def test_a_reencoded_but_unchanged_snapshot_restores(world):
    """The forging path itself changes nothing: a re-encoded, re-packed, imported copy restores."""
    def same(images):
        for t in tasks(images):
            for tid in t.threads:
                edit_core(images, tid, lambda core: None)
    restored(world, forge(world, "base:1", same))


# --- attacks ------------------------------------------------------------------------------------------

def test_forged_config_over_uid0_images(world):
    """Images of a uid-0, all-capabilities container; its config rewritten to claim the restricted
    spec's identity and to list no process."""
    with open(os.path.join(bundle(os.path.join(world.dir, unique("id")), lambda s: restricted(s, 1000)),
                           "config.json")) as f:
        claimed = json.load(f)
    from thaw.shim.lifecycle import fingerprint
    ref = forge(world, "root:1", config=lambda c: dataclasses.replace(
        c, identity=fingerprint.identity(claimed), processes=()))
    msg = cold_started(world, ref, "task 1: uids [0, 0, 0, 0] (the spec grants uid 1000)", "gids", "CapEff",
                       "CapPrm", "CapBnd", "no_new_privs", "seccomp mode disabled", uid=1000)
    assert "snapshot's images" in msg


@pytest.mark.parametrize("capset", ["cap_eff", "cap_prm", "cap_inh", "cap_amb", "cap_bnd"])
def test_each_capability_set_alone(world, capset):
    def grant_all(images):
        def every_capability(core):
            words = getattr(core.thread_core.creds, capset)
            del words[:]
            words.extend(ALL_CAP_WORDS)
        edit_core(images, tasks(images)[0].pid, every_capability)
    name = "Cap" + capset[4:].capitalize()
    msg = cold_started(world, forge(world, "base:1", grant_all), f"task 1: {name}")
    assert msg.count("Cap") == 1, msg                           # that set alone


def test_no_new_privs_off(world):
    def nnp_off(images):
        edit_core(images, tasks(images)[0].pid, lambda core: setattr(core.thread_core.creds, "no_new_privs", 0))
    cold_started(world, forge(world, "base:1", nnp_off), "task 1: no_new_privs off")


def test_seccomp_absent(world):
    def no_seccomp(images):
        edit_core(images, tasks(images)[0].pid, lambda core: setattr(core.thread_core, "seccomp_mode", 0))
    cold_started(world, forge(world, "base:1", no_seccomp), "task 1: seccomp mode disabled")


def test_an_allow_all_seccomp_filter(world):
    """Mode filter, one filter: one that allows everything, in place of the profile's."""
    def allow_all(images):
        [sec] = read_one(images, "seccomp.img", SECCOMP_MAGIC, criu_decode.schemas().seccomp)
        f = sec.seccomp_filters.add()
        f.filter = ALLOW_ALL_BPF
        index = len(sec.seccomp_filters) - 1
        write(images, "seccomp.img", SECCOMP_MAGIC, [sec])
        for t in tasks(images):
            for tid in t.threads:
                edit_core(images, tid, lambda core: setattr(core.thread_core, "seccomp_filter", index))
    cold_started(world, forge(world, "base:1", allow_all), "seccomp oldest filter", "1 instructions")


def test_a_seccomp_chain_that_loops(world):
    """A filter whose `prev` names itself: CRIU's own walk of the chain would never end."""
    def loop(images):
        [sec] = read_one(images, "seccomp.img", SECCOMP_MAGIC, criu_decode.schemas().seccomp)
        sec.seccomp_filters[0].prev = 0
        write(images, "seccomp.img", SECCOMP_MAGIC, [sec])
    cold_started(world, forge(world, "base:1", loop), "seccomp filter chain loops at index 0")


def test_a_node_that_never_ran_the_profile_learns_its_filter_from_a_probe(world, tmp_path):
    """Another node (here: a fresh state_dir over the same store) has no record of the profile's
    filter: it learns it from a container that runs nothing, gets byte for byte what the capture
    recorded, and restores. A snapshot whose oldest filter is another profile's — its config
    forged to claim this one — is refused there too."""
    from conftest import ThawEnv
    env = world.env
    other = ThawEnv(dir=str(tmp_path), config=str(tmp_path / "config.yaml"), store=env.store,
                    state=str(tmp_path / "state"), root=str(tmp_path / "runc-root"))
    other.write_config(trust={"unsigned": ["import"]})
    node2 = World(other, world.dir, world.forged)
    old = os.environ["THAW_CONFIG"]
    os.environ["THAW_CONFIG"] = other.config
    try:
        restored(node2, "base:1")
        [learnt] = os.listdir(os.path.join(other.state, "seccomp"))
        probe = json.load(open(os.path.join(other.state, "seccomp", learnt)))
        captured = json.load(open(os.path.join(env.state, "seccomp", learnt)))
        assert probe["source"] == "probe container" and captured["source"].startswith("capture of")
        assert (probe["filter"], probe["flags"]) == (captured["filter"], captured["flags"])

        stricter = {**SECCOMP, "syscalls": SECCOMP["syscalls"] + [{"names": ["chmod"], "action": "SCMP_ACT_ERRNO"}]}

        def claims_stricter(c):
            identity = dict(c.identity)
            identity["seccomp"] = hashlib.sha256(json.dumps(stricter, sort_keys=True, separators=(",", ":"))
                                                 .encode()).hexdigest()
            return dataclasses.replace(c, identity=identity)
        ref = forge(node2, "base:1", config=claims_stricter)
        dst = other.container(bundle(os.path.join(world.dir, unique("dst")),
                                     lambda spec: (restricted(spec), spec["linux"].__setitem__("seccomp", stricter)), ref))
        assert dst.create() == 0
        try:
            [msg] = [e["msg"] for e in dst.log_entries() if e.get("level") == "warning"]
            assert "seccomp oldest filter" in msg and "the profile's filter" in msg, msg
        finally:
            dst.destroy()
    finally:
        world.forged = node2.forged
        os.environ["THAW_CONFIG"] = old
        for cid in other.runc_ids():
            subprocess.run(["runc", "--root", other.root, "delete", "--force", cid], capture_output=True)


def test_an_extra_supplementary_group(world):
    def group(images):
        edit_core(images, tasks(images)[0].pid, lambda core: core.thread_core.creds.groups.append(27))
    cold_started(world, forge(world, "base:1", group), "task 1: supplementary groups [27]")


def test_a_non_leader_thread_with_other_credentials(world):
    def thread_root(images):
        leader = tasks(images)[0]
        other = next(t for t in leader.threads if t != leader.pid)

        def every_capability(core):
            c = core.thread_core.creds
            for words in (c.cap_eff, c.cap_prm, c.cap_bnd):
                del words[:]
                words.extend(ALL_CAP_WORDS)
            c.no_new_privs = 0
        edit_core(images, other, every_capability)
    msg = cold_started(world, forge(world, "base:1", thread_root), "task 1 thread ", "CapEff", "no_new_privs")
    assert "task 1:" not in msg                                  # the leader is fine, only that thread


def test_a_task_the_config_does_not_list(world):
    """The child task gets every capability; the config lists the leader alone."""
    child: list[int] = []

    def child_root(images):
        task = tasks(images)[1]
        child.append(task.pid)

        def every_capability(core):
            c = core.thread_core.creds
            for words in (c.cap_eff, c.cap_prm, c.cap_bnd):
                del words[:]
                words.extend(ALL_CAP_WORDS)
        for tid in task.threads:
            edit_core(images, tid, every_capability)
    ref = forge(world, "base:1", child_root, config=lambda c: dataclasses.replace(c, processes=c.processes[:1]))
    msg = cold_started(world, ref, f"task {child[0]}: CapEff", f"task {child[0]}: CapBnd")
    assert "task 1:" not in msg


def test_an_apparmor_policy_blob(world):
    """Policy CRIU would load into the kernel: an apparmor.img, or apparmor_data in the creds."""
    def policy_image(images):
        import thaw.shim.drivers.criu_proto.apparmor_pb2 as apparmor_pb2  # made by install/node.sh: Any to mypy
        entry = apparmor_pb2.apparmor_entry()
        ns = entry.namespaces.add(name="root")
        ns.policies.add(name="unconfined-everything", blob=b"\x04\x08\x00version\x00")
        write(images, "apparmor.img", 0x59423047, [entry])
    cold_started(world, forge(world, "base:1", policy_image), "apparmor.img", "AppArmor policy blobs")

    def policy_in_creds(images):
        edit_core(images, tasks(images)[0].pid,
                  lambda core: setattr(core.thread_core.creds, "apparmor_data", b"\x04\x08\x00version\x00"))
    cold_started(world, forge(world, "base:1", policy_in_creds), "task 1: AppArmor policy data")


def test_an_image_kind_outside_the_allow_list(world):
    def tun(images):
        import thaw.shim.drivers.criu_proto.tun_pb2 as tun_pb2  # made by install/node.sh: Any to mypy
        write(images, "tunfile.img", 0x57143751, [tun_pb2.tunfile_entry(id=7, netdev="tun0")])
    cold_started(world, forge(world, "base:1", tun), "tunfile.img", "not restored by thaw")

    def old_creds(images):
        import thaw.shim.drivers.criu_proto.creds_pb2 as creds_pb2  # made by install/node.sh: Any to mypy
        c = creds_pb2.creds_entry(uid=0, gid=0, euid=0, egid=0, suid=0, sgid=0, fsuid=0, fsgid=0, secbits=0)
        write(images, "creds-1.img", 0x54023547, [c])
    cold_started(world, forge(world, "base:1", old_creds), "creds-1.img", "old per-task credentials")


def test_an_unknown_field_is_refused(world):
    """A field CRIU 4.1.1's schema does not define, deep in a thread's credentials: a second
    thread_core (field 5) whose creds (field 10) hold field 501, which protobuf merges in."""
    def unknown(images):
        name = f"core-{tasks(images)[0].pid}.img"
        [core] = read_one(images, name, CORE_MAGIC, criu_decode.schemas().core)
        creds = bytes([0xA8, 0x1F, 0x01])                           # field 501, varint 1
        thread_core = bytes([0x52]) + _varint(len(creds)) + creds
        body = core.SerializeToString() + bytes([0x2A]) + _varint(len(thread_core)) + thread_core
        with open(os.path.join(images, name), "wb") as f:
            f.write(criu_images.header(name, CORE_MAGIC) + len(body).to_bytes(4, "little") + body)
    cold_started(world, forge(world, "base:1", unknown), "fields CRIU 4.1.1 does not define")


def _varint(n: int) -> bytes:
    out = b""
    while True:
        b = n & 0x7F
        n >>= 7
        out += bytes([b | (0x80 if n else 0)])
        if not n:
            return out


# --- the kernel, before the restored tasks run ----------------------------------------------------------

def test_a_task_running_before_the_kernel_check_is_killed_and_cold_started(world):
    """CRIU leaves the restored tasks stopped; thaw checks them and only then lets them run. A
    task found running at the check (here: continued from outside while thaw waits) may have run
    code: the container is killed and cold-started."""
    env = world.env
    dst = env.container(bundle(os.path.join(world.dir, unique("dst")), restricted, "base:1"))
    import threading
    found: list[int] = []

    def cont():
        def restored_and_stopped():
            # runc knows the restored init once CRIU is done; thaw then sleeps at the fault point
            # (the caller's pid file is written only after the checks)
            st = dst.state()
            if not st or not st.get("pid"):
                return None
            try:
                pids = confinement.tree(int(st["pid"]))
                states = [proc_status(f"/proc/{p}/status")["State"] for p in pids]
            except (OSError, ValueError, KeyError):
                return None
            return pids if all(s.startswith("T") for s in states) else None
        pids = wait_for(restored_and_stopped, 60, "the restored, stopped tasks")
        found.extend(pids)
        for p in pids:
            os.kill(p, signal.SIGCONT)
    th = threading.Thread(target=cont, daemon=True)
    th.start()
    try:
        assert dst.create(env={"THAW_TEST_FAULTS": "runc_restored=sleep:3"}) == 0, dst.log_text()
        th.join(10)
        assert found, "never saw the restored tasks stopped"
        [msg] = [e["msg"] for e in dst.log_entries() if e.get("level") == "warning"]
        assert "(kernel)" in msg and "state" in msg and "stopped until checked" in msg, msg
        assert env.runc_ids() == [dst.id]
        for p in found:                                              # the restored tasks are gone
            assert not os.path.exists(f"/proc/{p}") or proc_status(f"/proc/{p}/status")["State"][0] in "ZX"
        dst.start()
        # What the test let run printed its ticks before it was killed; the cold start counts from 0.
        dst.wait_output(lambda t: 2 in ticks(t))
    finally:
        dst.destroy()


def test_the_kernel_check_reads_every_thread_of_a_real_tree(world):
    """kernel_excess on a live uid-0 container with every capability (stopped, as CRIU leaves a
    restore), against the restricted spec's grant: each thread's excess from /proc, by name."""
    env = world.env
    src = env.container(bundle(os.path.join(world.dir, unique("live")), privileged))
    assert src.create() == 0
    src.start()
    try:
        src.wait_output(lambda t: len(ticks(t)) > 3)
        pid = src.pid()
        pids = confinement.tree(pid)
        assert len(pids) == 2                                     # python and its child
        with Store(env.store).image_dir(Store(env.store).resolve(SnapshotRef("root", "1"), "_local")) as d:
            images = criu_decode.read(d)
        for p in pids:
            os.kill(p, signal.SIGSTOP)
        wait_for(lambda: all(proc_status(f"/proc/{p}/status")["State"][0] == "T" for p in pids), 10, "stop")
        with open(os.path.join(src.bundle, "config.json")) as f:
            spec = json.load(f)
        restricted(spec, 1000)
        grant = confinement.Grant.of(spec, None)
        excess, _ = confinement.kernel_excess(pid, images, grant)
        fields = {(e.task, e.field) for e in excess}
        for field in ("uids", "CapEff", "CapPrm", "CapBnd", "no_new_privs", "seccomp"):
            assert (1, field) in fields, excess
        threads = {e.thread for e in excess if e.field == "CapEff"}
        assert len(threads) == 3 + 1                              # every thread of python, and the child
        # the same tree is within a spec that grants it all
        with open(os.path.join(src.bundle, "config.json")) as f:
            excess, restored = confinement.kernel_excess(pid, images, confinement.Grant.of(json.load(f)))
        assert not [e for e in excess if e.field not in ("thread", "threads", "seccomp")], excess
        assert set(restored.tasks) == set(pids) and restored.tasks[pid] == 1    # host pid -> container pid
    finally:
        src.destroy()


def test_the_kernel_check_reads_each_stopped_threads_oldest_filter(world, tmp_path):
    """The filter count alone would let a restore whose tasks hold another filter pass: each
    stopped thread's oldest filter is read from the kernel (PTRACE_SECCOMP_GET_FILTER) and must
    be the profile's. A live tree of another profile (as many filters, so the count agrees) is
    refused thread by thread; a tree of the profile itself passes, and is left stopped."""
    env = world.env
    reference = confinement.probe_reference(str(tmp_path), SECCOMP, "runc")
    assert reference is not None
    other = {**SECCOMP, "syscalls": [{"names": ["reboot"], "action": "SCMP_ACT_ERRNO"}]}
    with Store(env.store).image_dir(Store(env.store).resolve(SnapshotRef("base", "1"), "_local")) as d:
        images = criu_decode.read(d)
    found = {}
    for name, profile in (("other", other), ("same", SECCOMP)):
        src = env.container(bundle(os.path.join(world.dir, unique(name)),
                                   lambda spec, profile=profile: (restricted(spec), spec["linux"].update(seccomp=profile))))
        assert src.create() == 0
        src.start()
        try:
            src.wait_output(lambda t: len(ticks(t)) > 3)
            pids = confinement.tree(src.pid())
            for p in pids:
                os.kill(p, signal.SIGSTOP)
            wait_for(lambda pids=pids: all(proc_status(f"/proc/{p}/status")["State"][0] == "T"
                                           for p in pids), 10, "stop")
            with open(os.path.join(src.bundle, "config.json")) as f:
                spec = json.load(f)
            spec["linux"]["seccomp"] = SECCOMP                   # the new spec: the base profile
            excess, _ = confinement.kernel_excess(src.pid(), images, confinement.Grant.of(spec, reference))
            found[name] = [e for e in excess if e.field == "seccomp (kernel)"]
            # read and detached: every task goes back to its group stop (the kernel re-enters it
            # before any return to user code)
            wait_for(lambda pids=pids: all(proc_status(f"/proc/{p}/status")["State"][0] == "T"
                                           for p in pids), 5, "back in the group stop")
        finally:
            src.destroy()
    assert len(found["other"]) == 3 + 1, found                   # every thread of python, and the child
    assert "oldest filter sha256:" in found["other"][0].snapshot, found
    assert found["same"] == [], found


# --- mounts and the UTS namespace: what CRIU makes beside the tasks ----------------------------------------

def edit_mounts(images: str, change) -> None:
    """Edit the container's mount tree (mountpoints-<id>.img) with `change(list of mnt_entry)`."""
    [name] = [n for n in os.listdir(images) if n.startswith("mountpoints-")]
    entries = criu_decode.read_file(os.path.join(images, name), criu_images.MOUNTPOINTS_MAGIC,
                                    criu_decode.schemas().mount, False)
    change(entries)
    write(images, name, criu_images.MOUNTPOINTS_MAGIC, entries)


def test_a_masked_path_unmasked(world):
    """The spec masks /proc/keys; the images drop the mask (runc's mapping of the mask is only used
    for an entry the images have): refused, naming the path."""
    def unmask(entries):
        entries[:] = [e for e in entries if e.mountpoint != "/proc/keys"]
    ref = forge(world, "base:1", lambda images: edit_mounts(images, unmask))
    cold_started(world, ref, "mount /proc/keys (maskedPaths)", "absent from the images")


def test_a_read_only_path_made_writable(world):
    def writable(entries):
        [e] = [e for e in entries if e.mountpoint == "/proc/sys"]
        e.flags &= ~criu_images.MS_RDONLY
    ref = forge(world, "base:1", lambda images: edit_mounts(images, writable))
    cold_started(world, ref, "mount /proc/sys (readonlyPaths) writable")


def test_a_mount_the_spec_does_not_have(world):
    """The host's disk, once bound at a path the spec never names and once mounted afresh in place
    of the spec's /dev/shm tmpfs (fstype auto: CRIU would mount the device)."""
    def disk_at_shm(entries):
        [shm] = [e for e in entries if e.mountpoint == "/dev/shm"]
        shm.fstype, shm.fsname, shm.source = criu_images.FSTYPE_AUTO, "ext4", "/dev/vda"
    ref = forge(world, "base:1", lambda images: edit_mounts(images, disk_at_shm))
    cold_started(world, ref, "mount /dev/shm", "ext4 source '/dev/vda'")

    def host_bind(entries):
        [usr] = [e for e in entries if e.mountpoint == "/usr"]
        extra = type(usr)()
        extra.CopyFrom(usr)
        extra.mnt_id, extra.mountpoint, extra.root = 4000, "/srv", "/"
        extra.ClearField("ext_key")
        entries.append(extra)
    ref = forge(world, "base:1", lambda images: edit_mounts(images, host_bind))
    cold_started(world, ref, "mount /srv", "no such mount in the spec")


def test_a_hostname_the_spec_does_not_set(world):
    def rename(images):
        [name] = [n for n in os.listdir(images) if n.startswith("utsns-")]
        [uts] = read_one(images, name, criu_images.UTSNS_MAGIC, criu_decode.schemas().uts)
        uts.nodename = "not-the-pod"
        write(images, name, criu_images.UTSNS_MAGIC, [uts])
    cold_started(world, forge(world, "base:1", rename), "hostname 'not-the-pod'", "'thaw-test'")


def read_only_root(spec: dict) -> None:
    restricted(spec)
    spec["root"]["readonly"] = True


def test_a_read_only_rootfs_made_writable(world):
    """Captured with a read-only rootfs (it restores into that spec); the images' root mount made
    writable: refused."""
    env = world.env
    src = env.container(bundle(os.path.join(world.dir, unique("ro")), read_only_root))
    assert src.create() == 0, src.log_text()
    src.start()
    src.wait_output(lambda t: len(ticks(t)) > 10)
    env.thaw("capture", src.id, "--name", "ro:1", "--root", env.root)
    src.destroy()
    restored(world, "ro:1", read_only_root)

    def writable_root(entries):
        [root] = [e for e in entries if e.mountpoint == "/"]
        root.flags &= ~criu_images.MS_RDONLY
    ref = forge(world, "ro:1", lambda images: edit_mounts(images, writable_root))
    cold_started(world, ref, "mount / writable", "root.readonly", also=lambda spec: spec["root"].update(readonly=True))


# --- what CRIU writes into namespaces: IPC sysctls, namespaces joined by path ----------------------------

def edit_ipc_vars(images: str, change) -> None:
    """Edit the IPC sysctls CRIU writes into the IPC namespace (ipcns-var-<id>.img)."""
    [name] = [n for n in os.listdir(images) if n.startswith("ipcns-var-")]
    [var] = read_one(images, name, criu_images.IPCNS_VAR_MAGIC, criu_decode.schemas().ipc_var)
    change(var)
    write(images, name, criu_images.IPCNS_VAR_MAGIC, [var])


def test_an_ipc_sysctl_the_spec_does_not_set(world, tmp_path):
    """CRIU writes the images' IPC sysctls into the container's IPC namespace, as root, although
    runc mounts /proc/sys read-only: each must be the spec's (linux.sysctl) or what a fresh IPC
    namespace has on this node. A raised kernel.msgmnb is refused, naming field and values; the
    same images restore into a spec that sets that value."""
    fresh = confinement.fresh_ipc_sysctls(str(tmp_path))
    assert fresh is not None and fresh["kernel.msgmnb"] != [1 << 20]
    ref = forge(world, "base:1", lambda images: edit_ipc_vars(images, lambda v: setattr(v, "msg_ctlmnb", 1 << 20)))
    cold_started(world, ref, f"IPC sysctl kernel.msgmnb {1 << 20}",
                 f"{fresh['kernel.msgmnb'][0]} (a fresh IPC namespace on this node)")
    # The positive control: a spec that sets it (the config, a hint only, forged to agree)
    sysctl = {"kernel.msgmnb": str(1 << 20)}
    agreeing = forge(world, "base:1", lambda images: edit_ipc_vars(images, lambda v: setattr(v, "msg_ctlmnb", 1 << 20)),
                     config=lambda c: dataclasses.replace(c, identity={**c.identity, "sysctl": sysctl}))
    restored(world, agreeing, lambda spec: (restricted(spec), spec["linux"].update(sysctl=sysctl)))


def test_a_namespace_joined_by_path_is_not_written_into(world):
    """A spec that joins a UTS and an IPC namespace by path (a pod's: here a real container's, its
    hostname 'pod-b'): CRIU setns()es into them, then writes the images' hostname and IPC sysctls
    there. The hostname: CRIU is handed the pod's own, so the pod keeps it and the restore goes
    on; an IPC sysctl other than the pod namespace's own, or System V objects CRIU would create
    there: refused, naming the path."""
    env = world.env
    pod = env.container(bundle(os.path.join(world.dir, unique("pod")), lambda s: s.update(hostname="pod-b")))
    assert pod.create() == 0, pod.log_text()
    paths = {t: f"/proc/{pod.pid()}/ns/{t}" for t in ("uts", "ipc")}

    def join(spec):
        spec.pop("hostname", None)
        for n in spec["linux"]["namespaces"]:
            if n["type"] in paths:
                n["path"] = paths[n["type"]]

    def in_pod(kind: str, key: str) -> str:
        return subprocess.run(["nsenter", f"--{kind}={paths[kind]}", "cat", f"/proc/sys/{key}"],
                              capture_output=True, text=True, check=True).stdout.strip()
    try:
        restored(world, "base:1", lambda spec: (restricted(spec), join(spec)))
        assert in_pod("uts", "kernel/hostname") == "pod-b"           # not the images' 'thaw-test'
        msgmnb = in_pod("ipc", "kernel/msgmnb")
        ref = forge(world, "base:1", lambda images: edit_ipc_vars(images, lambda v: setattr(v, "msg_ctlmnb", 1 << 20)))
        cold_started(world, ref, f"IPC sysctl kernel.msgmnb (IPC namespace joined by path {paths['ipc']}) {1 << 20}",
                     f"{msgmnb}: unchanged", also=join, others=(pod.id,))
        assert in_pod("ipc", "kernel/msgmnb") == msgmnb
        # A System V message queue in the images (an ipcns-msg image with more than its header, as
        # a source that called msgget() leaves): CRIU would create it in the pod's namespace.
        def queue(images):
            var = next(n for n in os.listdir(images) if re.fullmatch(r"ipcns-var-\d+\.img", n))
            with open(os.path.join(images, var.replace("-var-", "-msg-")), "wb") as f:
                f.write(b"\0" * 64)
        ref = forge(world, "base:1", queue)
        cold_started(world, ref, f"System V IPC objects (IPC namespace joined by path {paths['ipc']})",
                     "ipcns-msg-", also=join, others=(pod.id,))
    finally:
        pod.destroy()


# --- the facts the store keeps beside the seal ----------------------------------------------------------

def test_the_sealed_facts_are_the_images_and_cannot_be_swapped(world):
    """A restore reads what the images would restore from the facts decoded when the snapshot was
    sealed (no protobuf on the restore path): they equal a fresh decoding of the images. A facts
    file that is not the one the seal names — the restricted snapshot's put beside uid-0 images
    under a config claiming the restricted identity — is not believed: the images are decoded
    again and refuse the restore before CRIU runs (not only the kernel check after it)."""
    store = Store(world.env.store)
    base = store.resolve(SnapshotRef("base", "1"), "_local")
    with store.image_dir(base) as d:
        facts = store.images.facts_path(base)                          # sealed when it entered the store
        assert os.path.isfile(facts)
        with open(store.images.seal_path(base)) as f:
            assert json.load(f)["facts"] == of_file(facts)[0]
        assert store.image_facts(base) == criu_decode.read(d)
    with open(os.path.join(bundle(os.path.join(world.dir, unique("id")), restricted), "config.json")) as f:
        claimed = json.load(f)
    from thaw.shim.lifecycle import fingerprint
    ref = forge(world, "root:1", config=lambda c: dataclasses.replace(
        c, identity=fingerprint.identity(claimed), processes=()))
    name, tag = ref.split(":")
    forged = store.resolve(SnapshotRef(name, tag), "_local")
    shutil.copyfile(store.images.facts_path(base), store.images.facts_path(forged))
    msg = cold_started(world, ref, "the snapshot's images hold more", "CapEff")
    assert "(kernel)" not in msg, msg
    # ... and the facts were derived again from the images and sealed, for the next restore
    with store.image_dir(forged) as d:
        assert store.image_facts(forged) == criu_decode.read(d) != store.image_facts(base)
    with open(store.images.seal_path(forged)) as f:
        assert json.load(f)["facts"] == of_file(store.images.facts_path(forged))[0]


def test_facts_of_another_version_are_decoded_again(world):
    """Facts written by another version of thaw (the seal naming them, so only their version
    tells) are not read: the images are decoded again and the new facts sealed."""
    store = Store(world.env.store)
    snap = store.resolve(SnapshotRef("base", "1"), "_local")
    with store.image_dir(snap) as d:
        path = store.images.facts_path(snap)
        with open(path) as f:
            old = json.load(f)
        os.chmod(path, 0o600)
        with open(path, "w") as f:
            json.dump({**old, "version": old["version"] - 1}, f)
        with open(store.images.seal_path(snap)) as f:
            seal = json.load(f)
        with open(store.images.seal_path(snap), "w") as f:
            json.dump({**seal, "facts": of_file(path)[0]}, f)
        assert store.image_facts(snap) == criu_decode.read(d)
    with open(store.images.facts_path(snap)) as f:
        assert json.load(f)["version"] == old["version"]
    with open(store.images.seal_path(snap)) as f:
        assert json.load(f)["facts"] == of_file(store.images.facts_path(snap))[0]


def test_a_node_without_the_decoder_seals_no_facts(world, monkeypatch):
    """Sealed on a node whose CRIU image schemas are missing, a snapshot gets no facts (that is
    about the node, not the images): a restore there says why and cold-starts; once the
    decoder is back, the images are decoded and their facts sealed."""
    store = Store(world.env.store)
    snap = store.resolve(SnapshotRef("base", "1"), "_local")
    monkeypatch.setattr(criu_decode, "_pb", None)
    monkeypatch.setitem(sys.modules, criu_decode.__package__ + ".criu_proto.core_pb2", None)   # import fails
    with store.image_dir(snap) as d:
        store.images.write_seal(snap, d)
        with open(store.images.seal_path(snap)) as f:
            assert json.load(f)["facts"] is None
        with pytest.raises(criu_images.DecoderMissing, match="schemas are not installed"):
            store.image_facts(snap)
    monkeypatch.undo()
    with store.image_dir(snap) as d:
        assert store.image_facts(snap) == criu_decode.read(d)
    with open(store.images.seal_path(snap)) as f:
        assert json.load(f)["facts"] == of_file(store.images.facts_path(snap))[0]


def test_a_path_the_spec_masks_that_the_images_lack(world):
    """Captured without a mask at /etc/hostname (the spec did not ask); its config rewritten to
    claim the mask (a config is only a hint), restored into a spec that masks the path, or makes
    it read-only, while the restored rootfs has it: CRIU makes only the mounts its images list and
    would leave it unmasked, so refused. A masked path the rootfs lacks restores (runc skips it
    too); one below a spec mount (/usr: a bind of the host's) is not provable from the rootfs:
    refused."""
    def mask(key: str, path: str):
        return lambda spec: spec["linux"].setdefault(key, []).append(path)

    def claiming(key: str, path: str) -> str:
        return forge(world, "base:1", config=lambda c: dataclasses.replace(
            c, identity={**c.identity, key: sorted([*c.identity[key], path])}))
    cold_started(world, claiming("maskedPaths", "/etc/hostname"), "mount /etc/hostname (maskedPaths)",
                 "the restored rootfs has it", also=mask("maskedPaths", "/etc/hostname"))
    cold_started(world, claiming("readonlyPaths", "/etc/hostname"), "mount /etc/hostname (readonlyPaths)",
                 "the restored rootfs has it", also=mask("readonlyPaths", "/etc/hostname"))
    cold_started(world, claiming("maskedPaths", "/usr/share"), "mount /usr/share (maskedPaths)",
                 "below the spec's mount /usr", also=mask("maskedPaths", "/usr/share"))

    def absent(spec):
        restricted(spec)
        mask("maskedPaths", "/etc/no-such-file")(spec)
    restored(world, claiming("maskedPaths", "/etc/no-such-file"), absent)
