"""The snapshot artifact and the store, without runc: layout, publish, export/import, corruption."""

import io
import json
import os
import tarfile

import pytest

from helpers import fake_snapshot
from thaw.oci import snapshot as fmt
from thaw.oci.annotations import SnapshotRef
from thaw.oci.layout import ImageLayout, LayoutError
from thaw.shim.store import CorruptSnapshot, SnapshotNotFound, Store


@pytest.fixture
def store(tmp_path):
    return Store(str(tmp_path / "store")).init()


def test_publish_resolve_list(store):
    snap = fake_snapshot(store, "a:1")
    got = store.resolve(SnapshotRef("a", "1"))
    assert got.manifest.digest == snap.manifest.digest
    assert [s.ref for s in store.snapshots()] == ["a:1"]
    assert store.deleted_paths(got) == ["etc/motd"]
    assert sorted(os.listdir(store.cached_layer(got))) == ["descriptors.json", "inventory.img", "pages-1.img"]
    index = json.load(open(store.layout.index_path))
    assert index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"] == "a:1"
    manifest = json.load(open(store.layout.blob_path(snap.manifest.digest)))
    assert manifest["artifactType"] == fmt.ARTIFACT_TYPE
    assert [l["mediaType"] for l in manifest["layers"]] == [fmt.CRIU_LAYER, fmt.ROOTFS_LAYER, fmt.DELETED_LAYER]


def test_store_is_root_only(store):
    assert os.stat(store.root).st_mode & 0o077 == 0


def test_unknown_snapshot(store):
    with pytest.raises(SnapshotNotFound):
        store.resolve(SnapshotRef("nope"))


def test_republish_replaces_tag_and_gc_removes_old_blobs(store):
    old = fake_snapshot(store, "a:1", b"old" * 100)
    new = fake_snapshot(store, "a:1", b"new" * 100)
    assert store.resolve(SnapshotRef("a", "1")).manifest.digest == new.manifest.digest
    assert not os.path.exists(store.layout.blob_path(old.criu.digest))
    store.remove(SnapshotRef("a", "1"))
    assert store.snapshots() == [] and list(store.layout.all_blobs()) == []
    assert [n for n in os.listdir(store.layers_dir) if not n.startswith(".")] == []


def test_cached_layer_seal_detects_flip_and_truncation(store):
    snap = fake_snapshot(store, "a:1")
    path = store.cached_layer(snap)
    pages = os.path.join(path, "pages-1.img")
    with open(pages, "r+b") as f:
        f.seek(10)
        f.write(b"X")
    with pytest.raises(CorruptSnapshot, match="modified"):
        store.cached_layer(snap)
    os.truncate(pages, 100)
    with pytest.raises(CorruptSnapshot, match="truncated"):
        store.cached_layer(snap)


def test_digest_mode_catches_flip_with_mtime_restored(store):
    snap = fake_snapshot(store, "a:1")
    pages = os.path.join(store.cached_layer(snap), "pages-1.img")
    st = os.stat(pages)
    with open(pages, "r+b") as f:
        f.write(b"Z")
    os.utime(pages, ns=(st.st_atime_ns, st.st_mtime_ns))
    store.cached_layer(snap, "stat")      # stat mode cannot see it: documented tradeoff
    with pytest.raises(CorruptSnapshot, match="sha256"):
        store.cached_layer(snap, "digest")


def test_missing_cache_is_rebuilt_from_verified_blob(store):
    snap = fake_snapshot(store, "a:1")
    import shutil
    shutil.rmtree(store.cached_layer(snap))
    assert os.path.exists(os.path.join(store.cached_layer(snap), "pages-1.img"))
    shutil.rmtree(store.cached_layer(snap))
    blob = store.layout.blob_path(snap.criu.digest)
    os.chmod(blob, 0o600)
    data = bytearray(open(blob, "rb").read())
    data[2000] ^= 0xFF
    open(blob, "wb").write(bytes(data))
    with pytest.raises(CorruptSnapshot):
        store.cached_layer(snap)


def test_rootfs_layer_is_digest_checked(store):
    snap = fake_snapshot(store, "a:1")
    blob = store.layout.blob_path(snap.rootfs.digest)
    os.chmod(blob, 0o600)
    with open(blob, "r+b") as f:
        f.seek(600)
        f.write(b"!")
    with pytest.raises(CorruptSnapshot):
        store.open_rootfs_layer(snap)


def test_export_import_round_trip(tmp_path, store):
    snap = fake_snapshot(store, "a:1")
    archive = str(tmp_path / "a.tar")
    store.export(SnapshotRef("a", "1"), archive)
    other = Store(str(tmp_path / "other"))
    [imported] = other.import_archive(archive)
    assert imported.manifest.digest == snap.manifest.digest and imported.ref == "a:1"
    assert open(os.path.join(other.cached_layer(imported), "pages-1.img"), "rb").read() == b"pages" * 1000


@pytest.mark.parametrize("damage", ["flip", "truncate", "garbage", "traversal"])
def test_import_rejects_damaged_archives(tmp_path, store, damage):
    fake_snapshot(store, "a:1")
    archive = str(tmp_path / "a.tar")
    store.export(SnapshotRef("a", "1"), archive)
    data = bytearray(open(archive, "rb").read())
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF
    elif damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "garbage":
        data = bytearray(b"not a tar at all" * 100)
    else:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            info = tarfile.TarInfo("../../etc/evil")
            info.size = 1
            tar.addfile(info, io.BytesIO(b"x"))
        data = bytearray(buf.getvalue())
    open(archive, "wb").write(bytes(data))
    other = Store(str(tmp_path / "other"))
    with pytest.raises(CorruptSnapshot):
        other.import_archive(archive)
    assert other.snapshots() == []
    assert not os.path.exists("/etc/evil")


def test_layout_rejects_bad_digests(tmp_path):
    layout = ImageLayout(str(tmp_path))
    with pytest.raises(LayoutError):
        layout.blob_path("sha256:../../x")
    with pytest.raises(LayoutError):
        layout.blob_path("md5:abc")


def test_killed_capture_leaves_no_snapshot_and_is_collected(store):
    # A capture that dies before publish: blobs and a staging dir of a dead pid remain.
    with store.staging("capture") as staging:
        layout = store.staged_layout(staging)
        orphan = layout.put_bytes(b"half a snapshot", "application/octet-stream")
        dead = os.path.join(store.staging_dir, "capture-dead")
        os.rename(staging, dead)
        with open(os.path.join(dead, ".pid"), "w") as f:
            f.write("999999999")
        os.mkdir(staging)
    assert store.snapshots() == []
    fake_snapshot(store, "b:1")          # any publish collects garbage
    assert not os.path.exists(store.layout.blob_path(orphan.digest))
    assert not os.path.exists(dead)
