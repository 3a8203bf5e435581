"""Seeing what happened on a node: the events log (rotation, `thaw events`), metrics in
Prometheus text format, per-container records, and one-line CLI errors."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import threading
import time

from helpers import fake_snapshot, wait_for
from thaw.oci.annotations import SnapshotRef
from thaw.shim.lifecycle.recovery import finish
from thaw.shim.node import events, metrics
from thaw.shim.node.config import Config
from thaw.shim.node.state import ContainerState, Phase, Record
from thaw.shim.node.store import Store


def cfg_in(tmp_path, **kw) -> Config:
    return Config(store_dir=str(tmp_path / "store"), state_dir=str(tmp_path / "state"), hook="", **kw)


def test_events_are_private_and_rotate_at_the_cap(tmp_path):
    cfg = cfg_in(tmp_path, events_max_bytes=2000)
    for i in range(40):
        events.emit(cfg, "cold_start", f"event {i}", f"c{i}", "warning", reason="x" * 50)
    path = os.path.join(cfg.state_dir, "events.log")
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert os.path.getsize(path) <= 2000 + 400 and os.path.getsize(path + ".1") > 2000
    kept = list(events.read(cfg.state_dir))
    assert [e["msg"] for e in kept] == [f"event {i}" for i in range(40 - len(kept), 40)]   # in order, newest last
    assert [e["container"] for e in events.read(cfg.state_dir, "c39")] == ["c39"]


def test_events_follow_sees_new_events_across_a_rotation(tmp_path):
    cfg = cfg_in(tmp_path, events_max_bytes=600)
    events.emit(cfg, "restored", "before", "c0")
    seen: list[str] = []
    following = threading.Event()

    def follow() -> None:
        for e in events.follow(cfg.state_dir, poll=0.02, stop=60):
            seen.append(e["msg"])
            if e["msg"].startswith("probe"):
                following.set()
            if e["msg"] == "after 11":
                return
    t = threading.Thread(target=follow)
    t.start()
    for i in range(200):                    # it follows from the end of the log: probe until it sees one
        events.emit(cfg, "restored", f"probe {i}", "c0")
        if following.wait(0.05):
            break
    assert following.is_set(), "the follower never saw an event"
    for i in range(12):                     # enough to rotate at least once
        events.emit(cfg, "restored", f"after {i}", "c1", detail="y" * 40)
        wait_for(lambda i=i: f"after {i}" in seen, 10, f"the follower to see event {i}", 0.01)
    t.join(timeout=10)
    assert "before" not in seen and seen[-12:] == [f"after {i}" for i in range(12)], seen
    assert os.path.exists(os.path.join(cfg.state_dir, "events.log.1"))


def test_thaw_events_cli(thaw_env):
    cfg = Config(store_dir=thaw_env.store, state_dir=thaw_env.state)
    events.emit(cfg, "cold_start", "thaw: cold start (restore not possible: x)", "abc", "warning", reason="x")
    events.emit(cfg, "restored", "thaw: restored def", "def")
    out = thaw_env.thaw("events").stdout
    assert "cold_start" in out and "abc" in out and "restored" in out
    listed = [json.loads(x) for x in thaw_env.thaw("events", "--json", "--container", "def").stdout.splitlines()]
    assert [e["kind"] for e in listed] == ["restored"]
    proc = subprocess.Popen(["thaw", "events", "--follow", "--json"], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "THAW_CONFIG": thaw_env.config})
    stdout = proc.stdout
    assert stdout is not None
    lines: queue.Queue[str] = queue.Queue()

    def forward() -> None:
        for line in stdout:
            lines.put(line)
    threading.Thread(target=forward, daemon=True).start()
    try:
        # Once it prints a probe it is following: then the event it must show.
        line = ""
        for i in range(300):
            events.emit(cfg, "restored", f"probe {i}", "probe")
            try:
                while "probe" not in line:
                    line = lines.get(timeout=0.05)
                break
            except queue.Empty:
                continue
        assert "probe" in line, "thaw events --follow printed no new event"
        events.emit(cfg, "captured", "captured late", "ghi")
        while "captured late" not in line:
            line = lines.get(timeout=10)
        assert json.loads(line)["container"] == "ghi"
    finally:
        proc.kill()
        proc.wait()


def test_metrics_counters_histogram_and_store_gauges(tmp_path):
    cfg = cfg_in(tmp_path, metrics_dir=str(tmp_path / "prom"))
    metrics.record_create(cfg, "restored", None, {"runc_restore": 0.3, "total": 0.42})
    metrics.record_create(cfg, "restored", None, {"runc_restore": 7.0, "total": 7.5})
    metrics.record_create(cfg, "cold_start", "not_found", None)
    metrics.record_capture(cfg, True, "auto")
    text = open(tmp_path / "prom" / "thaw.prom").read()
    got = metrics.parse(text)
    assert got['thaw_creates_total{outcome="restored",reason=""}'] == 2
    assert got['thaw_creates_total{outcome="cold_start",reason="not_found"}'] == 1
    assert got['thaw_captures_total{result="ok",trigger="auto"}'] == 1
    assert got['thaw_restore_phase_seconds_bucket{phase="runc_restore",le="0.5"}'] == 1
    assert got['thaw_restore_phase_seconds_bucket{phase="runc_restore",le="10"}'] == 2
    assert got['thaw_restore_phase_seconds_bucket{phase="runc_restore",le="+Inf"}'] == 2
    assert got['thaw_restore_phase_seconds_count{phase="total"}'] == 2
    assert abs(got['thaw_restore_phase_seconds_sum{phase="total"}'] - 7.92) < 1e-6
    assert "# TYPE thaw_restore_phase_seconds histogram" in text
    assert "# TYPE thaw_creates_total counter" in text
    assert not [n for n in os.listdir(tmp_path / "prom") if not n.endswith(".prom")]   # no temp files left

    store = Store.for_config(cfg).init()
    snap = fake_snapshot(store, "a:1")
    gauges = metrics.parse(open(tmp_path / "prom" / "thaw_store.prom").read())
    assert gauges == {"thaw_store_snapshots": 1, "thaw_store_bytes": snap.size}
    store.remove(SnapshotRef("a", "1"), "_local")
    assert metrics.parse(open(tmp_path / "prom" / "thaw_store.prom").read())["thaw_store_snapshots"] == 0


def test_metrics_off_without_a_directory(tmp_path):
    cfg = cfg_in(tmp_path)
    metrics.record_create(cfg, "restored", None, {"total": 1})
    assert not (tmp_path / "prom").exists()


def test_counters_survive_concurrent_writers(tmp_path):
    cfg = cfg_in(tmp_path, metrics_dir=str(tmp_path / "prom"))
    def record_25() -> None:
        for _ in range(25):
            metrics.record_capture(cfg, False, "cli")
    threads = [threading.Thread(target=record_25) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    got = metrics.parse(open(tmp_path / "prom" / "thaw.prom").read())
    assert got['thaw_captures_total{result="failed",trigger="cli"}'] == 100


def _record(st: ContainerState) -> Record:
    record = st.read()
    assert record is not None, "no state record"
    return record


def test_record_phases_and_finish(tmp_path):
    cfg = cfg_in(tmp_path)
    st = ContainerState(cfg.state_dir, "c1")
    rec = st.begin_restore("a:1", time.time(), "/b", None, False, "/b/.thaw-undo-c1")
    assert _record(st).phase == Phase.RESTORING
    assert finish(cfg, "c1", "poststop") is None and st.exists()    # mid-restore: thaw-runtime cleans up
    st.restored(rec, pid=123, phases={"total": 0.5})
    assert _record(st).phase == Phase.RESTORED
    assert st.started() is True and _record(st).phase == Phase.RUNNING
    assert st.started() is False                                      # a second start is runc's business
    ended = finish(cfg, "c1", "delete")
    assert ended is not None and ended.pid == 123 and not st.exists()
    [end] = [e for e in events.read(cfg.state_dir) if e["kind"] == "finished"]
    assert end["restored"] is True and end["phases"] == {"total": 0.5} and end["by"] == "delete"
    assert finish(cfg, "c1", "poststop") is None                      # the other caller came first


def test_cli_errors_are_one_line(thaw_env):
    store = Store(thaw_env.store).init()
    snap = fake_snapshot(store, "a:1")
    blob = store.layout.blob_path(snap.config_desc.digest)
    os.chmod(blob, 0o600)
    with open(blob, "wb") as f:
        f.write(b"{not json")
    for args in (["inspect", "a:1"], ["inspect", "nope:1"], ["rm", "nope:1"]):
        proc = thaw_env.thaw(*args, check=False)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("Error: "), proc.stderr
    garbage = os.path.join(thaw_env.dir, "garbage.tar")
    open(garbage, "wb").write(b"\0" * 1000)
    proc = thaw_env.thaw("import", garbage, "-n", "_local", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and "garbage.tar" in proc.stderr
