"""The store as a bounded node cache: sizes on disk, last use, least-recently-used eviction
(never a snapshot a restore reads; only ones a registry holds unless evict_unpushed), eviction
after each publish, `thaw gc` and `thaw ls`. Real stores in tmp_path, no runc."""

import json
import os
import re
import time

import pytest

from helpers import dead_capture, fake_snapshot
from thaw.oci.annotations import SnapshotRef
from thaw.shim.lifecycle.importer import import_archive
from thaw.shim.node import events
from thaw.shim.node.config import Config, StoreLimits, Trust
from thaw.shim.node.store import PUSHED, QuotaExceeded, Store
from thaw.shim.registry.progress import human_bytes as _human

PULLED = "pulled:registry.example/team/app:1"


@pytest.fixture
def cfg(tmp_path):
    # Unsigned imports accepted: these tests are about the cache (tests/test_provenance.py: signatures).
    return Config(store_dir=str(tmp_path / "store"), state_dir=str(tmp_path / "state"),
                  trust=Trust(unsigned=("import",)))


@pytest.fixture
def store(cfg):
    return Store.for_config(cfg).init()


def used_at(store, snap, when: float) -> None:
    """A restore of `snap` at `when` (what a restore leaves: the image lock, touched)."""
    with store.image_dir(snap):
        pass
    store.touch(snap)
    lock = store.image_path(snap) + ".lock"
    os.utime(lock, (when, when))


def names(store) -> set[str]:
    return {s.ref for s in store.snapshots()}


def store_events(cfg, level: str) -> list[str]:
    return [e["msg"] for e in events.read(cfg.state_dir) if e["kind"] == "store" and e["level"] == level]


def file_bytes(*paths: str) -> int:
    total = 0
    for p in paths:
        if os.path.isdir(p):
            total += sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(p) for f in fs)
        elif os.path.exists(p):
            total += os.path.getsize(p)
    return total


def test_size_counts_blobs_and_image_dir_and_shared_blobs_once_in_the_total(store):
    a = fake_snapshot(store, "a:1", b"A" * 50_000)
    b = fake_snapshot(store, "b:1", b"B" * 20_000)
    for snap in (a, b):
        blobs = [store.layout.blob_path(d.digest) for d in (snap.manifest, snap.config_desc, snap.criu_whole,
                                                              snap.rootfs, snap.deleted)]
        path = store.image_path(snap)
        assert store.size(snap) == file_bytes(*blobs, path, path + ".seal", path + ".facts")
    assert store.size(a) > store.size(b) > 2 * 20_000     # small files: in the image dir and its tar
    # The rootfs diff and the deleted list of these stand-ins are byte-identical: one blob each,
    # counted in each snapshot's size but once in the store's.
    assert (a.rootfs.digest, a.deleted.digest) == (b.rootfs.digest, b.deleted.digest)
    assert store.total_bytes() == store.size(a) + store.size(b) - a.rootfs.size - a.deleted.size
    assert store.total_bytes() == file_bytes(store.layout.root + "/blobs", store.images_dir)


def test_last_use_is_the_last_restore_else_the_publish(store):
    before = time.time()
    snap = fake_snapshot(store, "a:1")
    assert before - 1 <= store.last_used(snap) <= time.time() + 1       # published just now
    used_at(store, snap, 1_000_000)
    assert store.last_used(snap) == 1_000_000
    with store.image_dir(snap):
        pass
    store.touch(snap)                                                    # what a restore does
    assert store.last_used(snap) >= before - 1


def test_eviction_goes_least_recently_used_first(store, cfg):
    a = fake_snapshot(store, "a:1", b"A" * 30_000, origin=PULLED)
    b = fake_snapshot(store, "b:1", b"B" * 30_000, origin=PULLED)
    c = fake_snapshot(store, "c:1", b"C" * 30_000, origin=PULLED)
    now = time.time()
    used_at(store, a, now - 10)           # most recent
    used_at(store, b, now - 3000)         # least recent
    used_at(store, c, now - 600)
    total = store.total_bytes()
    [gone] = store.evict(total - 1)
    assert (gone.ref, gone.namespace, gone.digest) == ("b:1", "_local", b.manifest.digest)
    assert gone.bytes_freed == total - store.total_bytes() > 30_000
    assert names(store) == {"a:1", "c:1"}
    assert not os.path.exists(store.image_path(b)) and not os.path.exists(store.layout.blob_path(b.criu_whole.digest))
    assert os.path.exists(store.layout.blob_path(a.rootfs.digest))      # shared: still used by a and c
    assert [e.ref for e in store.evict(store.size(a))] == ["c:1"]
    assert names(store) == {"a:1"} and store.evict(1)[0].ref == "a:1"
    assert any("b:1 (_local) evicted" in m for m in store_events(cfg, "info"))


def test_nothing_is_evicted_while_the_store_fits_or_unbounded(store):
    fake_snapshot(store, "a:1", origin=PULLED)
    assert store.evict(store.total_bytes()) == [] and store.evict(0) == []
    assert names(store) == {"a:1"}


def test_a_snapshot_a_restore_reads_is_never_evicted(store, cfg):
    held = fake_snapshot(store, "held:1", origin=PULLED)
    fake_snapshot(store, "other:1", origin=PULLED)
    used_at(store, held, time.time() - 3600)        # the older: first in line
    with store.image_dir(held) as path:
        assert [e.ref for e in store.evict(1)] == ["other:1"]
        assert names(store) == {"held:1"} and os.path.exists(os.path.join(path, "pages-1.img"))
        [warning] = store_events(cfg, "warning")
        assert "in use by a restore: held:1 (_local)" in warning
    assert [e.ref for e in store.evict(1)] == ["held:1"]     # released: the next pass takes it
    assert names(store) == set() and os.listdir(store.images_dir) == []


def test_captured_and_imported_snapshots_stay_unless_evict_unpushed(tmp_path, store, cfg):
    captured = fake_snapshot(store, "mine:1", b"M" * 10_000)
    store.export(SnapshotRef("mine", "1"), "_local", str(tmp_path / "mine.tar"))
    store.remove(SnapshotRef("mine", "1"), "_local")
    [imported] = import_archive(store, str(tmp_path / "mine.tar"), cfg, "_local")
    assert store.origin(imported) == "imported" and imported.manifest.digest == captured.manifest.digest
    here = fake_snapshot(store, "here:1", b"H" * 10_000)
    pulled = fake_snapshot(store, "pulled:1", b"P" * 10_000, origin=PULLED)
    now = time.time()
    used_at(store, imported, now - 9000)
    used_at(store, here, now - 8000)
    used_at(store, pulled, now - 10)      # the most recent, yet the only one that may go
    assert [e.ref for e in store.evict(1)] == ["pulled:1"]
    assert names(store) == {"mine:1", "here:1"}
    [warning] = store_events(cfg, "warning")           # once per call, naming why
    assert "never pushed" in warning and "mine:1 (_local)" in warning and "here:1 (_local)" in warning
    assert [e.ref for e in store.evict(1, evict_unpushed=True)] == ["mine:1", "here:1"]
    assert names(store) == set()


def test_eviction_never_removes_an_image_directory_another_snapshot_still_uses(tmp_path, store, cfg):
    """One manifest published twice (pulled here, imported by another namespace) shares one image
    directory: evicting the pulled one (the imported one may not go) keeps the directory, and the
    other still reads it, digest-verified; the last one to go takes it."""
    pulled = fake_snapshot(store, "app:1", b"S" * 20_000, origin=PULLED)
    with store.image_dir(pulled) as path:
        original = {n: open(os.path.join(path, n), "rb").read() for n in os.listdir(path)}
    store.export(SnapshotRef("app", "1"), "_local", str(tmp_path / "app.tar"))
    [imported] = import_archive(store, str(tmp_path / "app.tar"), cfg, "team-b")
    assert imported.manifest.digest == pulled.manifest.digest and len(store.snapshots()) == 2
    [gone] = store.evict(1)
    assert (gone.ref, gone.namespace) == ("app:1", "_local")
    [left] = store.snapshots()
    assert left.namespace == "team-b"
    with store.image_dir(left, verify="digest") as path:
        assert {n: open(os.path.join(path, n), "rb").read() for n in os.listdir(path)} == original
    assert [e.namespace for e in store.evict(1, evict_unpushed=True)] == ["team-b"]
    assert os.listdir(store.images_dir) == []


def test_a_pushed_snapshot_may_be_evicted(store):
    snap = fake_snapshot(store, "a:1")
    assert store.evict(1) == [] and store.pushed(snap) == ""
    store.mark_pushed(snap, "registry.example/team/a:1")
    assert store.pushed(snap) == "registry.example/team/a:1"
    assert store.origin(snap) == "captured"                      # the origin stays what it was
    assert [e.ref for e in store.evict(1)] == ["a:1"]
    store.mark_pushed(snap, "registry.example/team/a:2")        # gone: nothing to mark
    assert store.snapshots() == []


def test_the_pushed_mark_survives_only_a_republish_of_the_same_manifest(tmp_path, store, cfg):
    snap = fake_snapshot(store, "a:1")
    store.export(SnapshotRef("a", "1"), "_local", str(tmp_path / "a.tar"))
    store.mark_pushed(snap, "registry.example/a:1")
    [again] = import_archive(store, str(tmp_path / "a.tar"), cfg, "_local")     # the same manifest published again
    assert again.manifest.digest == snap.manifest.digest and store.pushed(again) == "registry.example/a:1"
    new = fake_snapshot(store, "a:1", b"changed" * 100)          # a new capture under the name
    assert store.pushed(new) == ""
    index = json.load(open(store.layout.index_path))
    assert [PUSHED in m["annotations"] for m in index["manifests"]] == [False]


def test_each_publish_evicts_down_to_max_bytes(tmp_path):
    probe = Store(str(tmp_path / "probe")).init()
    one = probe.size(fake_snapshot(probe, "x:1", b"X" * 40_000, origin=PULLED))
    cfg = Config(store_dir=str(tmp_path / "store"), state_dir=str(tmp_path / "state"),
                 store=StoreLimits(max_bytes=int(one * 2.5), quota_share=1.0))
    store = Store.for_config(cfg).init()
    a = fake_snapshot(store, "a:1", b"A" * 40_000, origin=PULLED)
    b = fake_snapshot(store, "b:1", b"B" * 40_000, origin=PULLED)
    used_at(store, a, time.time() - 100)
    used_at(store, b, time.time() - 50)
    assert names(store) == {"a:1", "b:1"}                     # two fit
    fake_snapshot(store, "c:1", b"C" * 40_000)                # the third does not: a goes
    assert names(store) == {"b:1", "c:1"} and not os.path.exists(store.image_path(a))
    assert store.total_bytes() <= cfg.store.max_bytes
    assert any("a:1 (_local) evicted" in m for m in store_events(cfg, "info"))
    # A snapshot larger than the whole cache is refused (store.max_bytes bounds every publish),
    # and nothing is evicted for it.
    with pytest.raises(QuotaExceeded, match=r"publishing big:1 .* over its quota"):
        fake_snapshot(store, "big:1", b"G" * 200_000, origin=PULLED)
    assert names(store) == {"b:1", "c:1"}


def test_publish_never_evicts_without_max_bytes(store):
    for i in range(4):
        fake_snapshot(store, f"s:{i}", bytes([65 + i]) * 40_000, origin=PULLED)
    assert names(store) == {"s:0", "s:1", "s:2", "s:3"}


def test_gc_returns_the_bytes_it_freed(store):
    """What a capture killed before publish left (its staging area and a committed blob) and a
    snapshot's files a restore held while it was removed: all counted in what gc frees."""
    snap = fake_snapshot(store, "a:1", b"A" * 30_000)
    path = store.image_path(snap)
    with store.image_dir(snap):
        store.remove(SnapshotRef("a", "1"), "_local")         # the image dir stays while held
    dead, orphan = dead_capture(store)
    expected = file_bytes(dead, path, path + ".seal", path + ".facts") + orphan.size
    assert file_bytes(dead) > 1000 and os.path.exists(path) and store.gc() == expected
    assert not os.path.exists(dead) and not os.path.exists(path) and store.gc() == 0


# --- the CLI ------------------------------------------------------------------------------------

def test_thaw_gc_frees_unreferenced_files_then_evicts(thaw_env):
    store = Store(thaw_env.store).init()
    a = fake_snapshot(store, "a:1", b"A" * 30_000, origin=PULLED)
    b = fake_snapshot(store, "b:1", b"B" * 30_000, origin=PULLED)
    mine = fake_snapshot(store, "mine:1", b"M" * 30_000)
    used_at(store, a, time.time() - 7200)
    used_at(store, b, time.time() - 60)
    stray = os.path.join(store.layout.root, "blobs", "sha256", "f" * 64)   # what a crash left
    with open(stray, "wb") as f:
        f.write(b"x" * 12345)
    keep = store.size(b) + store.size(mine)
    out = json.loads(thaw_env.thaw("gc", "--max-bytes", str(keep), "--json").stdout)
    assert out["unreferenced_bytes"] == 12345 and not os.path.exists(stray)
    assert [(e["ref"], e["namespace"], e["digest"]) for e in out["evicted"]] == [("a:1", "_local", a.manifest.digest)]
    assert out["freed_bytes"] == 12345 + out["evicted"][0]["bytes_freed"] and out["max_bytes"] == keep
    assert out["store_bytes"] == store.total_bytes() <= keep
    assert names(store) == {"b:1", "mine:1"}
    # The configured bound, in words: b goes, mine:1 (captured here, never pushed) stays.
    thaw_env.write_config(store={"max_bytes": 1})
    text = thaw_env.thaw("gc").stdout.splitlines()
    assert text[0].startswith("evicted b:1 (_local): ") and text[1].startswith("freed ")
    assert "1 snapshot(s) evicted" in text[1] and "over max_bytes" in text[1] and len(text) == 2
    assert names(store) == {"mine:1"}
    thaw_env.write_config(store={"max_bytes": 1, "evict_unpushed": True})
    assert thaw_env.thaw("gc").stdout.startswith("evicted mine:1 (_local)")
    assert names(store) == set()


def test_thaw_gc_without_a_bound_only_collects(thaw_env):
    store = Store(thaw_env.store).init()
    fake_snapshot(store, "a:1", origin=PULLED)
    out = json.loads(thaw_env.thaw("gc", "--json").stdout)
    assert out["evicted"] == [] and out["unreferenced_bytes"] == 0 and names(store) == {"a:1"}
    assert thaw_env.thaw("gc", "--max-bytes", "-1", check=False).returncode == 2


def test_thaw_ls_shows_size_last_use_and_origin(thaw_env):
    store = Store(thaw_env.store).init()
    here = fake_snapshot(store, "here:1", b"H" * 300_000)
    pulled = fake_snapshot(store, "pulled:1", origin=PULLED)
    pushed = fake_snapshot(store, "pushed:1")
    store.mark_pushed(pushed, "registry.example/team/pushed:1")
    used_at(store, pulled, time.time() - 200)
    used_at(store, pushed, time.time() - 3 * 3600 - 5)
    lines = thaw_env.thaw("ls").stdout.splitlines()
    assert lines[0].split()[:7] == ["NAMESPACE", "NAME", "SIZE", "CREATED", "LAST", "USE", "DIGEST"]
    assert lines[0].split()[7:] == ["PROVENANCE", "ORIGIN"]
    row = {line.split()[1]: line for line in lines[1:]}
    assert " captured " in row["here:1"] and " unsigned (refused) " in row["pulled:1"]   # no trust.unsigned
    assert row["here:1"].rstrip().endswith("captured here") and f" {_human(store.size(here))} " in row["here:1"]
    assert re.search(r" \d+s ago ", row["here:1"])
    assert "3m ago" in row["pulled:1"] and row["pulled:1"].rstrip().endswith(
        "pulled from registry.example/team/app:1")
    assert "3h ago" in row["pushed:1"] and row["pushed:1"].rstrip().endswith(
        "captured here · pushed to registry.example/team/pushed:1")
    rows = {r["ref"]: r for r in json.loads(thaw_env.thaw("ls", "--json").stdout)}
    for snap in (here, pulled, pushed):
        r = rows[snap.ref]
        assert r["size_bytes"] == store.size(snap) and r["last_used"] == store.last_used(snap)
    assert (rows["pulled:1"]["origin"], rows["pulled:1"]["pushed"]) == (PULLED, "")
    assert (rows["pushed:1"]["origin"], rows["pushed:1"]["pushed"]) == ("captured", "registry.example/team/pushed:1")


def test_thaw_doctor_reports_the_node_cache(thaw_env):
    store = Store(thaw_env.store).init()
    fake_snapshot(store, "mine:1", b"M" * 30_000)             # captured here: gc may not evict it
    held = store.total_bytes()
    thaw_env.write_config(store={"max_bytes": held - 1})
    out = thaw_env.thaw("doctor", "--skip-containerd", check=False).stdout
    [line] = [x for x in out.splitlines() if "node cache" in x]
    assert line.startswith("[  ok]") and f"{held} bytes of store.max_bytes {held - 1}: warning: over it" in line
    thaw_env.write_config(store={"max_bytes": held})
    assert f"{held} bytes of store.max_bytes {held}: within it" in thaw_env.thaw("doctor", "--skip-containerd",
                                                                                check=False).stdout
