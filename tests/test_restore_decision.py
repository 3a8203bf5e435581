"""The restore decision without runc, CRIU or root: annotations, snapshot lookup, fingerprint,
policy -> an outcome (restore plan, cold start with its reason, refusal), and what create()
leaves in the bundle and reports."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest

from helpers import fake_snapshot
from thaw.oci import runc_args
from thaw.oci import snapshot as fmt
from thaw.oci.annotations import AnnotationError, parse_request
from thaw.oci.spec import Bundle, deny_io_uring
from thaw.shim.lifecycle import create, fingerprint, restore
from thaw.shim.lifecycle.container import Container
from thaw.shim.node import events, metrics
from thaw.shim.node.config import Config, Policy
from thaw.shim.node.store import CorruptSnapshot, SnapshotNotFound, Store

NODE = fmt.NodeFingerprint(kernel="6.18.44", arch="x86_64", cpu_flags=("avx2", "sse4_2"),
                           criu="4.1.1", runc="1.1.5")
CONTAINER = fmt.ContainerFingerprint(image="img:1", mounts=("/dev", "/proc"))


def spec_for(annotations: dict[str, str] | None = None, **process) -> dict:
    return {"ociVersion": "1.0.2",
            "process": {"args": ["sh"], "user": {"uid": 0, "gid": 0}, "env": ["PATH=/bin", "HOSTNAME=pod-a"],
                        "capabilities": {"bounding": ["CAP_KILL"], "effective": ["CAP_KILL"],
                                         "permitted": ["CAP_KILL"]}, **process},
            "mounts": [{"destination": "/proc"}, {"destination": "/dev"}],
            "annotations": {"io.kubernetes.cri.sandbox-namespace": "team-a",
                            "io.kubernetes.cri.image-name": "img:1", **(annotations or {})}}


SNAP_CONFIG = fmt.SnapshotConfig(ref="", fingerprint=fmt.Fingerprint(NODE, CONTAINER),
                                 identity=fingerprint.identity(spec_for()))


@pytest.fixture
def node(tmp_path):
    cfg = Config(store_dir=str(tmp_path / "store"), state_dir=str(tmp_path / "state"), hook="",
                 metrics_dir=str(tmp_path / "metrics"))
    store = Store(cfg.store_dir).init()
    fake_snapshot(store, "app:1", config=SNAP_CONFIG, namespace="team-a")
    return cfg, store


def bundle_for(tmp_path, annotations: dict[str, str], **process) -> Bundle:
    d = tmp_path / "bundle"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text(json.dumps(spec_for(annotations, **process)))
    return Bundle.load(str(d))


def check(tmp_path, node, annotations, node_fp=NODE, process=None, **policy):
    cfg, store = node
    if policy:
        cfg = Config(store_dir=cfg.store_dir, state_dir=cfg.state_dir, hook="", policy=Policy(**policy))
    b = bundle_for(tmp_path, annotations, **(process or {}))
    return restore.check(Container.of(call_for(b), b, cfg, "/usr/bin/false"), store, node_fp)


def test_compatible_snapshot_gives_a_plan(tmp_path, node):
    plan = check(tmp_path, node, {"thaw.dev/snapshot": "app:1"})
    assert plan.snapshot.ref == "app:1" and plan.gpus is None
    assert {"resolve", "fingerprint"} <= set(plan.phases.times)


@pytest.mark.parametrize("what, node_fp, annotations, words", [
    ("kernel", dataclasses.replace(NODE, kernel="6.1.0"), {}, ["kernel", "6.1.0"]),
    ("cpu", dataclasses.replace(NODE, cpu_flags=("sse4_2",)), {}, ["cpu", "avx2"]),
    ("criu", dataclasses.replace(NODE, criu=None), {}, ["criu", "not found"]),
    ("image", NODE, {"io.kubernetes.cri.image-name": "img:2"}, ["image", "img:2"]),
])
def test_mismatch_is_incompatible_with_the_field_named(tmp_path, node, what, node_fp, annotations, words):
    with pytest.raises(restore.Incompatible) as err:
        check(tmp_path, node, {"thaw.dev/snapshot": "app:1", **annotations}, node_fp)
    assert all(w in str(err.value) for w in words), str(err.value)


def test_another_namespace_reads_only_by_policy(tmp_path, node):
    other = {"thaw.dev/snapshot": "app:1", "io.kubernetes.cri.sandbox-namespace": "team-b"}
    with pytest.raises(SnapshotNotFound, match="team-b"):
        check(tmp_path, node, other)
    assert check(tmp_path, node, other, share={"team-a": ["team-b"]}).snapshot.namespace == "team-a"
    assert check(tmp_path, node, other, share={"team-a": ["*"]}).snapshot.namespace == "team-a"
    with pytest.raises(SnapshotNotFound):
        check(tmp_path, node, other, share={"team-a": ["team-c"]})


def test_outside_any_namespace_only_local_snapshots_are_found(tmp_path, node):
    """A container of no Kubernetes namespace (Podman, ctr, a bare runc bundle) is in `_local`: it
    never gets a namespace's snapshot, and a pod never gets a `_local` one."""
    _cfg, store = node
    no_namespace = {"thaw.dev/snapshot": "app:1", "io.kubernetes.cri.sandbox-namespace": ""}
    with pytest.raises(SnapshotNotFound, match="_local"):
        check(tmp_path, node, no_namespace)
    fake_snapshot(store, "local:1", config=SNAP_CONFIG, namespace="_local")
    assert check(tmp_path, node, {**no_namespace, "thaw.dev/snapshot": "local:1"}).snapshot.namespace == "_local"
    with pytest.raises(SnapshotNotFound, match="team-a"):
        check(tmp_path, node, {"thaw.dev/snapshot": "local:1"})


def test_a_captured_process_may_not_hold_more_than_the_new_spec_grants(tmp_path, node):
    """The spec is the capturing one (identity matches), but a captured process became root with
    every capability (a setuid binary): restoring it would hand that to the new container."""
    _cfg, store = node
    root = fmt.ProcessCreds(pid=7, uids=(0, 0, 0, 0), gids=(0, 0, 0, 0), cap_prm=(1 << 41) - 1,
                            cap_eff=(1 << 41) - 1, cap_bnd=(1 << 41) - 1)
    user = {"user": {"uid": 1000, "gid": 1000}}
    captured = dataclasses.replace(SNAP_CONFIG, identity=fingerprint.identity(spec_for(user=user["user"])),
                                   processes=(root,))
    fake_snapshot(store, "suid:1", config=captured, namespace="team-a")
    with pytest.raises(restore.Incompatible) as err:
        check(tmp_path, node, {"thaw.dev/snapshot": "suid:1"}, process=user)
    assert "captured process 7 holds more than the spec grants" in str(err.value)
    assert "uids [0, 0, 0, 0]" in str(err.value) and "CapEff" in str(err.value)
    # the same process as it was started (uid 1000, the spec's capabilities) is fine
    kill = 1 << 5
    started = dataclasses.replace(root, uids=(1000,) * 4, gids=(1000,) * 4, cap_prm=kill, cap_eff=kill, cap_bnd=kill)
    fake_snapshot(store, "suid:1", config=dataclasses.replace(captured, processes=(started,)), namespace="team-a")
    assert check(tmp_path, node, {"thaw.dev/snapshot": "suid:1"}, process=user).snapshot.ref == "suid:1"


@pytest.mark.parametrize("field, process, words", [
    ("user", {"user": {"uid": 1000, "gid": 1000}}, ["process.user"]),
    ("caps", {"capabilities": {"bounding": [], "effective": [], "permitted": []}}, ["process.capabilities"]),
    ("nnp", {"noNewPrivileges": True}, ["process.noNewPrivileges"]),
    ("args", {"args": ["sh", "-c", "other"]}, ["process.args"]),
    ("cwd", {"cwd": "/srv"}, ["process.cwd"]),
    ("env", {"env": ["PATH=/bin", "HOSTNAME=pod-a", "SECRET=x"]}, ["process.env", "SECRET"]),
    ("terminal", {"terminal": True}, ["process.terminal"]),
    ("apparmor", {"apparmorProfile": "runtime/default"}, ["process.apparmorProfile"]),
    ("selinux", {"selinuxLabel": "system_u:system_r:container_t:s0:c1,c2"}, ["process.selinuxLabel"]),
    ("rlimits", {"rlimits": [{"type": "RLIMIT_NOFILE", "soft": 10, "hard": 10}]}, ["process.rlimits"]),
])
def test_identity_mismatch_names_the_field(tmp_path, node, field, process, words):
    with pytest.raises(restore.Incompatible) as err:
        check(tmp_path, node, {"thaw.dev/snapshot": "app:1"}, process=process)
    assert all(w in str(err.value) for w in words), str(err.value)


def test_a_snapshot_of_a_cold_started_thaw_container_restores_under_the_spec_narrowed_alike(tmp_path, node):
    """The capturing container ran with io_uring denied (create.py's cold start): the new spec,
    narrowed the same way, is what is compared and what the container is restored under."""
    cfg, store = node
    narrowed = spec_for()
    deny_io_uring(narrowed, os.uname().machine)
    fake_snapshot(store, "narrow:1", config=dataclasses.replace(SNAP_CONFIG, identity=fingerprint.identity(narrowed)),
                  namespace="team-a")
    b = bundle_for(tmp_path, {"thaw.dev/snapshot": "narrow:1"})
    restore.check(Container.of(call_for(b), b, cfg, "/usr/bin/false"), store, NODE)
    assert b.spec["linux"]["seccomp"] == narrowed["linux"]["seccomp"]
    # A snapshot of a container thaw-runtime did not create: the spec stays as it is.
    b = bundle_for(tmp_path, {"thaw.dev/snapshot": "app:1"})
    restore.check(Container.of(call_for(b), b, cfg, "/usr/bin/false"), store, NODE)
    assert "linux" not in b.spec
    # A spec with a profile of its own: narrowed alike when that matches the snapshot's...
    profile = {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["ptrace"], "action": "SCMP_ACT_ERRNO"}]}
    captured = spec_for()
    captured["linux"] = {"seccomp": json.loads(json.dumps(profile))}
    deny_io_uring(captured, os.uname().machine)
    fake_snapshot(store, "prof:1", config=dataclasses.replace(SNAP_CONFIG, identity=fingerprint.identity(captured)),
                  namespace="team-a")
    b = bundle_for(tmp_path, {"thaw.dev/snapshot": "prof:1"})
    b.spec["linux"] = {"seccomp": json.loads(json.dumps(profile))}
    restore.check(Container.of(call_for(b), b, cfg, "/usr/bin/false"), store, NODE)
    assert b.spec["linux"]["seccomp"] == captured["linux"]["seccomp"]
    # ...and any other profile is still a difference.
    b = bundle_for(tmp_path, {"thaw.dev/snapshot": "prof:1"})
    b.spec["linux"] = {"seccomp": {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
        {"names": ["kexec_load"], "action": "SCMP_ACT_ERRNO"}]}}
    with pytest.raises(restore.Incompatible, match=r"linux\.seccomp"):
        restore.check(Container.of(call_for(b), b, cfg, "/usr/bin/false"), store, NODE)


def test_hostname_may_differ_by_default_and_the_list_is_the_node_s(tmp_path, node):
    other_pod = {"env": ["PATH=/bin", "HOSTNAME=pod-b"]}
    assert check(tmp_path, node, {"thaw.dev/snapshot": "app:1"}, process=other_pod).snapshot.ref == "app:1"
    with pytest.raises(restore.Incompatible, match="HOSTNAME"):
        check(tmp_path, node, {"thaw.dev/snapshot": "app:1"}, process=other_pod, env_may_differ=())


def test_unknown_snapshot(tmp_path, node):
    with pytest.raises(SnapshotNotFound):
        check(tmp_path, node, {"thaw.dev/snapshot": "nope:1"})


@pytest.mark.no_gpu
def test_gpu_snapshot_on_a_node_without_gpus(tmp_path, node):
    _cfg, store = node
    gpu_cfg = dataclasses.replace(SNAP_CONFIG, gpu=fmt.GpuState(pids=1, uuids=("GPU-a",)))
    fake_snapshot(store, "gpu:1", config=gpu_cfg, namespace="team-a")
    with pytest.raises(restore.Incompatible, match="holds GPU state"):
        check(tmp_path, node, {"thaw.dev/snapshot": "gpu:1"})


def test_corrupt_config_blob(tmp_path, node):
    _cfg, store = node
    snap = store.resolve(parse_request({"thaw.dev/snapshot": "app:1"}).snapshot, "team-a")
    path = store.layout.blob_path(snap.config_desc.digest)
    os.chmod(path, 0o600)
    with open(path, "r+b") as f:
        f.write(b"#")
    with pytest.raises(CorruptSnapshot):
        check(tmp_path, node, {"thaw.dev/snapshot": "app:1"})


def test_bad_annotation():
    with pytest.raises(AnnotationError):
        parse_request({"thaw.dev/snapshot": "Not Valid!"})


# --- create(): the outcome, the bundle, the report ----------------------------------------------

def call_for(b: Bundle, cid: str = "c1") -> runc_args.RuncCall:
    return runc_args.parse(["thaw-runtime", "--log", os.path.join(b.path, "log.json"), "--log-format",
                            "json", "create", "--bundle", b.path, "--pid-file", "p", cid])


def log_lines(b: Bundle) -> list[dict]:
    with open(os.path.join(b.path, "log.json")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("annotations, code, words", [
    ({"thaw.dev/snapshot": "nope:1"}, "not_found", ["nope:1", "not found"]),
    ({"thaw.dev/snapshot": "Bad Name"}, "bad_annotation", ["invalid snapshot name"]),
    ({"thaw.dev/snapshot": "app:1", "io.kubernetes.cri.image-name": "img:2"}, "incompatible", ["image"]),
])
def test_create_cold_starts_with_the_reason(tmp_path, node, annotations, code, words):
    cfg, _ = node
    b = bundle_for(tmp_path, annotations)
    before = b.spec
    outcome = create.create(Container.of(call_for(b), b, cfg, "/usr/bin/false"))
    assert isinstance(outcome, create.ColdStart) and outcome.code == code
    assert all(w in outcome.reason for w in words), outcome.reason
    # No hook (none configured); io_uring denied, as in every cold-started thaw container.
    deny_io_uring(before, os.uname().machine)
    assert json.loads(open(os.path.join(b.path, "config.json")).read()) == before
    record = json.load(open(os.path.join(cfg.state_dir, "containers", "c1.json")))
    assert record["phase"] == "cold" and record["cold_reason"] == outcome.reason

    create.report(call_for(b), cfg, outcome)
    [line] = log_lines(b)
    assert line["level"] == "warning" and "cold start" in line["msg"] and outcome.reason in line["msg"]
    [event] = list(events.read(cfg.state_dir))
    assert event["kind"] == "cold_start" and event["container"] == "c1" and event["code"] == code
    prom = metrics.parse(open(os.path.join(cfg.metrics_dir, "thaw.prom")).read())
    assert prom[f'thaw_creates_total{{outcome="cold_start",reason="{code}"}}'] == 1


def test_required_refuses_and_leaves_the_bundle_as_it_was(tmp_path, node):
    cfg, _ = node
    b = bundle_for(tmp_path, {"thaw.dev/snapshot": "nope:1", "thaw.dev/required": "true"})
    before = open(os.path.join(b.path, "config.json")).read()
    outcome = create.create(Container.of(call_for(b), b, cfg, "/usr/bin/false"))
    assert isinstance(outcome, create.Refused) and outcome.code == "not_found"
    assert json.loads(open(os.path.join(b.path, "config.json")).read()) == json.loads(before)
    assert not os.path.exists(os.path.join(cfg.state_dir, "containers", "c1.json"))
    create.report(call_for(b), cfg, outcome)
    assert log_lines(b)[-1]["level"] == "error" and "required" in log_lines(b)[-1]["msg"]


def test_policy_required_refuses_without_the_annotation(tmp_path, node):
    cfg, _ = node
    cfg = Config(store_dir=cfg.store_dir, state_dir=cfg.state_dir, hook="", policy=Policy(required=True))
    b = bundle_for(tmp_path, {"thaw.dev/snapshot": "nope:1"})
    assert isinstance(create.create(Container.of(call_for(b), b, cfg, "/usr/bin/false")), create.Refused)


def test_cold_start_with_auto_capture_gets_both_hooks(tmp_path, node):
    cfg, _ = node
    hook = tmp_path / "thaw-hook"
    hook.write_text("#!/bin/sh\n")
    hook.chmod(0o755)
    cfg = Config(store_dir=cfg.store_dir, state_dir=cfg.state_dir, hook=str(hook))
    ann = {"thaw.dev/snapshot": "new:1", "thaw.dev/capture": "on-ready", "thaw.dev/ready": "file:/ready"}
    b = bundle_for(tmp_path, ann)
    assert isinstance(create.create(Container.of(call_for(b), b, cfg, "/usr/bin/false")), create.ColdStart)
    hooks = json.load(open(os.path.join(b.path, "config.json")))["hooks"]
    assert [h["args"] for h in hooks["prestart"]] == [["thaw-hook", "prestart"]]
    assert [h["args"] for h in hooks["poststop"]] == [["thaw-hook", "poststop"]]
    record = json.load(open(os.path.join(cfg.state_dir, "containers", "c1.json")))
    assert record["capture"]["snapshot"] == "new:1" and record["capture"]["ready"] == "file:/ready"
