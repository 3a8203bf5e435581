"""thaw's OCI hooks with the real runc: injection, the restore-path network check, auto-capture
(once, even with two cold starts at once), poststop cleanup."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time

import pytest

from helpers import make_bundle, netns, netns_delete, unique, wait_for
from thaw.oci.spec import Bundle, add_hook
from thaw.shim.drivers.netcheck import listening_sockets

pytestmark = [pytest.mark.root, pytest.mark.runc, pytest.mark.criu]

READY_AFTER_COUNT = ["sh", "-c", "i=0; while true; do echo tick $i; i=$((i+1)); "
                     "[ $i = 20 ] && touch /ready; sleep 0.05; done"]


def ticks(text):
    return [int(x) for x in re.findall(r"tick (\d+)", text)]


def hooks_of(bundle):
    return json.load(open(os.path.join(bundle, "config.json"))).get("hooks", {})


def test_add_hook_is_idempotent_and_keeps_order(tmp_path):
    spec = {"hooks": {"prestart": [{"path": "/usr/bin/nvidia-container-runtime-hook", "args": ["x", "prestart"]}]}}
    assert add_hook(spec, "prestart", {"path": "/h", "args": ["thaw-hook", "prestart"]})
    assert not add_hook(spec, "prestart", {"path": "/h", "args": ["thaw-hook", "prestart"]})
    assert [h["path"] for h in spec["hooks"]["prestart"]] == ["/usr/bin/nvidia-container-runtime-hook", "/h"]
    b = Bundle(str(tmp_path), spec)
    (tmp_path / "config.json").write_text("{}")
    b.save()
    assert json.load(open(tmp_path / "config.json")) == spec


def wait_for_snapshot(env, ref, timeout=90):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if ref in env.thaw("ls").stdout:
            return
        time.sleep(0.3)
    events = open(os.path.join(env.state, "events.log")).read() if os.path.exists(os.path.join(env.state, "events.log")) else ""
    raise AssertionError(f"{ref} never captured; events: {events[-2000:]}")


def events(env):
    path = os.path.join(env.state, "events.log")
    return [json.loads(line) for line in open(path)] if os.path.exists(path) else []


def test_auto_capture_then_restore(thaw_env, tmp_path):
    ann = {"thaw.dev/snapshot": "auto:1", "thaw.dev/capture": "on-ready", "thaw.dev/ready": "file:/ready"}
    b1 = make_bundle(str(tmp_path / "first"), READY_AFTER_COUNT, annotations=ann)
    first = thaw_env.container(b1)
    assert first.create() == 0
    prestart = [h["args"] for h in hooks_of(b1)["prestart"]]
    assert prestart == [["thaw-hook", "prestart"]] and hooks_of(b1)["poststop"][0]["args"][1] == "poststop"
    assert any("cold start" in e["msg"] and "not found" in e["msg"] for e in first.log_entries())
    first.start()
    wait_for_snapshot(thaw_env, "auto:1")
    record = json.load(open(os.path.join(thaw_env.state, "containers", first.id + ".json")))
    assert record["captured"] == "auto:1" and record["watcher"]["pid"]
    assert first.state()["status"] == "running"       # captured, left running

    b2 = make_bundle(str(tmp_path / "second"), READY_AFTER_COUNT, annotations=ann)
    second = thaw_env.container(b2)
    assert second.create() == 0
    assert not [e for e in second.log_entries() if e["level"] == "warning"], second.log_text()
    second.start()
    got = ticks(second.wait_output(lambda t: len(ticks(t)) > 5))
    first.destroy()                                   # all of the first container's output read
    # From the captured state: ready (/ready is touched once i is 20), and no later than the first
    # container had come when it was killed, after the capture.
    assert 20 <= got[0] <= max(ticks(first.output())) + 1, (got[:5], max(ticks(first.output())))
    assert got == list(range(got[0], got[0] + len(got)))
    second.destroy()
    assert thaw_env.state_entries() == []
    assert sum("published auto:1" in e["msg"] for e in events(thaw_env)) == 1


def test_two_cold_starts_capture_once(thaw_env, tmp_path):
    ann = {"thaw.dev/snapshot": "race:1", "thaw.dev/capture": "on-ready", "thaw.dev/ready": "file:/ready"}
    cs = []
    for i in range(2):
        c = thaw_env.container(make_bundle(str(tmp_path / f"c{i}"), READY_AFTER_COUNT, annotations=ann))
        assert c.create() == 0
        cs.append(c)
    for c in cs:
        c.start()
    wait_for_snapshot(thaw_env, "race:1")
    deadline = time.time() + 60
    while time.time() < deadline:
        msgs = [e["msg"] for e in events(thaw_env)]
        if sum("published race:1" in m for m in msgs) + sum("race:1 already exists" in m for m in msgs) == 2:
            break
        time.sleep(0.3)
    msgs = [e["msg"] for e in events(thaw_env)]
    assert sum("published race:1" in m for m in msgs) == 1, msgs
    assert sum("race:1 already exists" in m for m in msgs) == 1, msgs
    for c in cs:
        c.destroy()


def test_restore_checks_listen_addresses_of_target_netns(thaw_env, tmp_path):
    from pyroute2 import NetNS
    names = [unique("thawnc") for _ in range(3)]
    paths = [netns(n) for n in names]
    try:
        def add_addr(ns_name):
            with NetNS(ns_name) as ns:     # a service address, on lo (no dummy module here)
                ns.addr("add", index=ns.link_lookup(ifname="lo")[0], address="10.250.77.1", prefixlen=32)
        add_addr(names[0])
        add_addr(names[2])
        serve = ["sh", "-c", "mkdir -p /www; echo hello > /www/index.html; exec httpd -f -p 10.250.77.1:8080 -h /www"]
        src = thaw_env.container(make_bundle(str(tmp_path / "src"), serve, netns=paths[0]))
        assert src.create() == 0
        src.start()
        wait_for(lambda: ("10.250.77.1", 8080) in [(s.addr, s.port) for s in listening_sockets(src.pid())], 10,
                 "httpd to listen")
        thaw_env.thaw("capture", src.id, "--name", "bound:1", "--root", thaw_env.root)
        info = json.loads(thaw_env.thaw("inspect", "bound:1").stdout)
        assert {"addr": "10.250.77.1", "port": 8080} in info["config"]["network"]["listen"]
        src.destroy()

        ann = {"thaw.dev/snapshot": "bound:1"}
        missing = thaw_env.container(make_bundle(str(tmp_path / "m"), serve, netns=paths[1], annotations=ann))
        assert missing.create() == 0
        warn = [e["msg"] for e in missing.log_entries() if e["level"] == "warning"]
        assert warn and "10.250.77.1" in warn[-1] and "not configured" in warn[-1], (missing.log_text(), missing.stderr, missing.stdout)
        missing.start()                  # cold: its httpd cannot bind 10.250.77.1 there and exits
        missing.destroy()

        ok = thaw_env.container(make_bundle(str(tmp_path / "ok"), serve, netns=paths[2], annotations=ann))
        assert ok.create() == 0
        assert not [e for e in ok.log_entries() if e["level"] == "warning"], ok.log_text()
        ok.start()
        out = subprocess.run(["nsenter", f"--net={paths[2]}", "busybox", "wget", "-qO-", "http://10.250.77.1:8080/"],
                             capture_output=True, text=True, timeout=10)
        assert out.stdout.strip() == "hello"
        ok.destroy()
    finally:
        for n in names:
            netns_delete(n)


def test_poststop_cleans_up_when_deleted_behind_thaws_back(thaw_env, tmp_path):
    b = make_bundle(str(tmp_path / "c"), ["sh", "-c", "exit 0"], annotations={"thaw.dev/snapshot": "absent:1"})
    c = thaw_env.container(b)
    assert c.create() == 0
    # a plain cold start never depends on a prestart hook (a failing one would fail the container)
    assert "prestart" not in hooks_of(b) and hooks_of(b)["poststop"][0]["args"] == ["thaw-hook", "poststop"]
    assert thaw_env.state_entries() == [c.id + ".json"]
    c.start()
    for _ in range(100):
        if c.state()["status"] == "stopped":
            break
        time.sleep(0.05)
    subprocess.run(["runc", "--root", thaw_env.root, "delete", c.id], check=True)   # plain runc
    assert thaw_env.state_entries() == []
    timing = [e for e in events(thaw_env) if e["kind"] == "finished"][-1]
    assert timing["container"] == c.id and timing["by"] == "poststop" and "not found" in timing["cold_reason"]
