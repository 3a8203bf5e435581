"""The snapshot artifact (format 2) and the store, without runc: publish and resolve by namespace,
one copy of the CRIU files with large ones as parts, seals and repair, garbage collection,
export/import (hostile archives too), format 1 archives and stores."""

import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import tarfile

import pytest

from helpers import dead_capture, fake_snapshot
from thaw.oci import snapshot as fmt
from thaw.oci.annotations import SnapshotRef
from thaw.oci.layout import Descriptor, ImageLayout, LayoutError
from thaw.oci.snapshot import files as snapshot_files
from thaw.oci.snapshot import manifest as snapshot_manifest
from thaw.shim.lifecycle.importer import import_archive, open_store
from thaw.shim.node.config import Config, Trust
from thaw.shim.node.store import CorruptSnapshot, SnapshotNotFound, Store

A1 = SnapshotRef("a", "1")

# These tests are about the archive format: unsigned imports are accepted (tests/test_provenance.py
# covers signatures).
UNSIGNED_IMPORTS = Config(trust=Trust(unsigned=("import",)))


@pytest.fixture
def store(tmp_path):
    return Store(str(tmp_path / "store")).init()


@pytest.fixture
def small_parts(monkeypatch):
    """Files from 4 KiB up are stored as parts of 3 KiB: a few KiB exercise the part logic."""
    monkeypatch.setattr(snapshot_files, "PART_THRESHOLD", 4096)
    monkeypatch.setattr(snapshot_files, "PART_SIZE", 3072)


def test_publish_resolve_list(store):
    snap = fake_snapshot(store, "a:1", namespace="team-a")
    got = store.resolve(A1, "team-a")
    assert got.manifest.digest == snap.manifest.digest and got.namespace == "team-a"
    assert [(s.namespace, s.ref) for s in store.snapshots()] == [("team-a", "a:1")]
    assert store.deleted_paths(got) == ["etc/motd"]
    with store.image_dir(got) as path:
        assert sorted(os.listdir(path)) == ["descriptors.json", "inventory.img", "pages-1.img"]
    index = json.load(open(store.layout.index_path))
    ann = index["manifests"][0]["annotations"]
    assert ann["org.opencontainers.image.ref.name"] == "a:1" and ann["dev.thaw.namespace"] == "team-a"
    manifest = json.load(open(store.layout.blob_path(snap.manifest.digest)))
    assert manifest["artifactType"] == fmt.ARTIFACT_TYPE
    assert manifest["annotations"]["org.opencontainers.image.created"] == snap.config.created
    assert [m["mediaType"] for m in manifest["layers"]] == [fmt.CRIU_WHOLE_LAYER, fmt.ROOTFS_LAYER, fmt.DELETED_LAYER]
    assert json.load(open(store.layout.blob_path(snap.config_desc.digest)))["formatVersion"] == 2


def test_a_snapshot_belongs_to_its_namespace(store):
    a = fake_snapshot(store, "app:1", payload=b"A" * 100, namespace="team-a")
    b = fake_snapshot(store, "app:1", payload=b"B" * 100, namespace="team-b")
    assert store.resolve(SnapshotRef("app", "1"), "team-a").manifest.digest == a.manifest.digest
    assert store.resolve(SnapshotRef("app", "1"), "team-b").manifest.digest == b.manifest.digest
    with pytest.raises(SnapshotNotFound):
        store.resolve(SnapshotRef("app", "1"), "team-c")
    # shared by policy: team-c may read team-b's
    assert store.resolve(SnapshotRef("app", "1"), "team-c", ("team-b",)).namespace == "team-b"
    store.remove(SnapshotRef("app", "1"), "team-b")
    assert store.resolve(SnapshotRef("app", "1"), "team-a").manifest.digest == a.manifest.digest


def test_large_files_are_parts_of_the_one_copy(store, small_parts):
    payload = os.urandom(10_000)
    snap = fake_snapshot(store, "a:1", payload=payload)
    assert [(p.file, p.offset, p.desc.size) for p in snap.parts] == \
        [("pages-1.img", 0, 3072), ("pages-1.img", 3072, 3072), ("pages-1.img", 6144, 3072), ("pages-1.img", 9216, 784)]
    for p in snap.parts:
        assert p.desc.digest == "sha256:" + hashlib.sha256(payload[p.offset:p.offset + p.desc.size]).hexdigest()
        with store.open_blob(snap, p.desc) as f:
            assert f.read() == payload[p.offset:p.offset + p.desc.size]
        assert not os.path.exists(store.layout.blob_path(p.desc.digest))   # never a second copy
    with store.image_dir(snap) as path:
        assert open(os.path.join(path, "pages-1.img"), "rb").read() == payload
        assert os.stat(os.path.join(path, "pages-1.img")).st_mode & 0o777 == 0o400
    tar_names = tarfile.open(store.layout.blob_path(snap.criu_whole.digest)).getnames()
    assert tar_names == ["descriptors.json", "inventory.img"]


def test_parts_must_be_contiguous():
    d = Descriptor(fmt.CRIU_PART_LAYER, "sha256:" + "0" * 64, 10)
    with pytest.raises(fmt.SnapshotFormatError, match="contiguous"):
        snapshot_manifest._check_parts([fmt.FilePart("pages-1.img", 0, d), fmt.FilePart("pages-1.img", 11, d)])


def test_store_is_root_only(store):
    assert os.stat(store.root).st_mode & 0o077 == 0


def test_republish_replaces_tag_and_gc_removes_old_files(store):
    old = fake_snapshot(store, "a:1", b"old" * 100)
    new = fake_snapshot(store, "a:1", b"new" * 100)
    assert store.resolve(A1, "_local").manifest.digest == new.manifest.digest
    assert not os.path.exists(store.layout.blob_path(old.criu_whole.digest))
    assert not os.path.exists(store.image_path(old)) and os.path.isdir(store.image_path(new))
    store.remove(A1, "_local")
    assert store.snapshots() == [] and list(store.layout.all_blobs()) == []
    assert os.listdir(store.images_dir) == []


def test_gc_never_removes_an_image_a_restore_reads(store):
    snap = fake_snapshot(store, "a:1")
    with store.image_dir(snap) as path:
        store.remove(A1, "_local")                  # rm during a restore
        assert os.path.exists(os.path.join(path, "pages-1.img"))
    store.gc()
    assert not os.path.exists(store.image_path(snap))


def test_a_damaged_part_unpublishes_the_snapshot(store, small_parts):
    snap = fake_snapshot(store, "a:1", payload=os.urandom(9000))
    pages = os.path.join(store.image_path(snap), "pages-1.img")
    os.chmod(pages, 0o600)
    os.truncate(pages, 100)
    with pytest.raises(CorruptSnapshot, match="removed"), store.image_dir(snap):
        pass
    with pytest.raises(SnapshotNotFound):          # unpublished: a capture or pull can replace it
        store.resolve(A1, "_local")


def test_touched_but_intact_image_is_sealed_again(store):
    snap = fake_snapshot(store, "a:1")
    pages = os.path.join(store.image_path(snap), "pages-1.img")
    os.utime(pages, (1, 1))                         # an mtime change alone
    with store.image_dir(snap) as path:             # checked by digest, sealed again, restorable
        assert open(os.path.join(path, "pages-1.img"), "rb").read() == b"pages" * 1000
    with store.image_dir(snap):                     # and the new seal holds
        pass


def test_damaged_whole_file_is_rebuilt_from_its_verified_tar(store):
    snap = fake_snapshot(store, "a:1")
    inv = os.path.join(store.image_path(snap), "inventory.img")
    os.chmod(inv, 0o600)
    open(inv, "wb").write(b"XYZ")
    with store.image_dir(snap) as path:
        assert open(os.path.join(path, "inventory.img"), "rb").read() == b"inv"
    os.unlink(inv)                                  # a missing small file too
    with store.image_dir(snap) as path:
        assert open(os.path.join(path, "inventory.img"), "rb").read() == b"inv"


def test_digest_mode_catches_flip_with_mtime_restored(store, small_parts):
    snap = fake_snapshot(store, "a:1", payload=os.urandom(9000))
    pages = os.path.join(store.image_path(snap), "pages-1.img")
    st = os.stat(pages)
    os.chmod(pages, 0o600)
    with open(pages, "r+b") as f:
        f.write(b"Z")
    os.utime(pages, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.chmod(pages, 0o400)
    with store.image_dir(snap, "stat"):             # stat mode cannot see it: documented tradeoff
        pass
    with pytest.raises(CorruptSnapshot, match=r"pages-1\.img"), store.image_dir(snap, "digest"):
        pass


def test_rootfs_layer_is_digest_checked(store):
    snap = fake_snapshot(store, "a:1")
    blob = store.layout.blob_path(snap.rootfs.digest)
    os.chmod(blob, 0o600)
    with open(blob, "r+b") as f:
        f.seek(600)
        f.write(b"!")
    with pytest.raises(CorruptSnapshot):
        store.open_rootfs_layer(snap)


def test_export_import_round_trip(tmp_path, store, small_parts):
    payload = os.urandom(20_000)
    snap = fake_snapshot(store, "a:1", payload=payload, namespace="team-a")
    archive = str(tmp_path / "a.tar")
    store.export(A1, "team-a", archive)
    assert os.stat(archive).st_mode & 0o777 == 0o600
    with tarfile.open(archive) as tar:
        assert all(m.mode == 0o600 for m in tar.getmembers())
        assert tar.getnames()[:2] == ["oci-layout", "index.json"]
    other = Store(str(tmp_path / "other"))
    [imported] = import_archive(other, archive, UNSIGNED_IMPORTS, "team-a")
    assert imported.manifest.digest == snap.manifest.digest and imported.ref == "a:1"
    assert imported.namespace == "team-a"                    # the owner the importer named
    with other.image_dir(imported, "digest") as path:
        assert open(os.path.join(path, "pages-1.img"), "rb").read() == payload
    assert other.origin(imported) == "imported"


def test_export_verifies_what_it_writes(tmp_path, store, small_parts):
    snap = fake_snapshot(store, "a:1", payload=os.urandom(9000))
    pages = os.path.join(store.image_path(snap), "pages-1.img")
    st = os.stat(pages)
    os.chmod(pages, 0o600)
    with open(pages, "r+b") as f:
        f.seek(5000)
        old = f.read(1)
        f.seek(5000)
        f.write(bytes([old[0] ^ 0xFF]))     # changed whatever the random byte was
    os.utime(pages, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(CorruptSnapshot):
        store.export(A1, "_local", str(tmp_path / "a.tar"))
    assert not os.path.exists(tmp_path / "a.tar")


def test_concurrent_imports_of_one_archive(tmp_path, store):
    from concurrent.futures import ThreadPoolExecutor
    fake_snapshot(store, "a:1")
    archive = str(tmp_path / "a.tar")
    store.export(A1, "_local", archive)
    other = Store(str(tmp_path / "other")).init()
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda _: import_archive(other, archive, UNSIGNED_IMPORTS, "_local"), range(2)))
    assert results[0][0].manifest.digest == results[1][0].manifest.digest
    [snap] = other.snapshots()
    for verify in ("stat", "digest"):
        with other.image_dir(snap, verify):
            pass


def _archive_with(path: str, entries: list[tuple[tarfile.TarInfo, bytes]]) -> None:
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for info, data in entries:
            tar.addfile(info, io.BytesIO(data) if data else None)


@pytest.mark.parametrize("damage", ["flip", "truncate", "garbage", "traversal", "symlink", "bad-ref",
                                    "newline-ref", "huge-declared"])
def test_import_rejects_damaged_and_hostile_archives(tmp_path, store, damage):
    fake_snapshot(store, "a:1")
    archive = str(tmp_path / "a.tar")
    store.export(A1, "_local", archive)
    data = bytearray(open(archive, "rb").read())
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF
        open(archive, "wb").write(bytes(data))
    elif damage == "truncate":
        open(archive, "wb").write(bytes(data[: len(data) // 2]))
    elif damage == "garbage":
        open(archive, "wb").write(b"not a tar at all" * 100)
    elif damage == "traversal":
        info = tarfile.TarInfo("../../etc/evil")
        info.size = 1
        _archive_with(archive, [(info, b"x")])
    elif damage == "symlink":
        info = tarfile.TarInfo("blobs/sha256/" + "a" * 64)
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/shadow"
        _archive_with(archive, [(info, b"")])
    elif damage in ("bad-ref", "newline-ref"):
        bad = "../../etc/x:1" if damage == "bad-ref" else "a\nb:1"
        _rewrite_index(archive, bad)
    else:
        info = tarfile.TarInfo("blobs/sha256/" + "b" * 64)
        info.size = 1 << 50                   # declared, never stored: refused before writing
        archive = _append_member_header(archive, info)
    other = Store(str(tmp_path / "other"))
    with pytest.raises(CorruptSnapshot):
        import_archive(other, archive, UNSIGNED_IMPORTS, "_local")
    assert other.snapshots() == [] and json.load(open(other.layout.index_path))["manifests"] == []
    assert os.listdir(other.images_dir) == [] and os.listdir(other.staging_dir) == []
    # Nothing was written where a name from the archive points: not beside the store (where
    # "../../etc/evil" leads from its layout), not anywhere under this test's directory.
    written = [os.path.join(d, n) for d, _, names in os.walk(tmp_path) for n in names]
    assert not [p for p in written if os.path.basename(p) in ("evil", "x:1")], written


def _rewrite_index(archive: str, ref: str) -> None:
    members = []
    with tarfile.open(archive) as tar:
        for m in tar.getmembers():
            f = tar.extractfile(m)
            assert f is not None, m.name  # the archive holds regular files only
            members.append((m, f.read()))
    out = []
    for m, data in members:
        if m.name == "index.json":
            index = json.loads(data)
            index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"] = ref
            data = json.dumps(index).encode()
            m.size = len(data)
        out.append((m, data))
    _archive_with(archive, out)


def _concatenate(archive: str, more: str) -> None:
    """Append the members of the tar `more` to `archive` (its end-of-archive blocks dropped)."""
    raw = open(archive, "rb").read()
    end = len(raw)
    while end >= 512 and raw[end - 512:end] == b"\0" * 512:
        end -= 512
    with open(archive, "wb") as f:
        f.write(raw[:end] + open(more, "rb").read())


def _append_member_header(archive: str, info: tarfile.TarInfo) -> str:
    """An archive whose last member declares `info.size` bytes it does not hold."""
    raw = open(archive, "rb").read()
    end = len(raw)
    while end >= 512 and raw[end - 512:end] == b"\0" * 512:
        end -= 512                            # drop the end-of-archive blocks
    out = archive + ".huge"
    with open(out, "wb") as f:
        f.write(raw[:end] + info.tobuf(tarfile.GNU_FORMAT))
    return out


def _flip_in_blob(path: str) -> None:
    """Change one byte of a stored blob, keeping its size (and, for JSON, its validity)."""
    os.chmod(path, 0o600)
    data = bytearray(open(path, "rb").read())
    data[:] = _changed(bytes(data))
    with open(path, "wb") as f:
        f.write(data)


def _changed(data: bytes) -> bytes:
    """The same bytes with one changed where no parser notices: in a tar, a byte of its first
    file's content; in JSON, a digit of its creation time or a letter of a path; else the middle."""
    try:
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            at = next(m.offset_data for m in tar.getmembers() if m.size)
    except (tarfile.TarError, StopIteration):
        created = re.search(rb'created": "(\d)', data)
        at = created.start(1) if created else data.find(b"motd") if b"motd" in data else len(data) // 2
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1:]


BLOBS = {"criu-tar": lambda s: s.criu_whole, "rootfs": lambda s: s.rootfs, "deleted": lambda s: s.deleted}


@pytest.mark.parametrize("blob", BLOBS)
def test_export_refuses_a_damaged_blob(tmp_path, store, blob):
    snap = fake_snapshot(store, "a:1")
    _flip_in_blob(store.layout.blob_path(BLOBS[blob](snap).digest))
    with pytest.raises(CorruptSnapshot, match=BLOBS[blob](snap).digest):
        store.export(A1, "_local", str(tmp_path / "a.tar"))
    assert not os.path.exists(tmp_path / "a.tar") and os.listdir(tmp_path) == ["store"]


def _damage_member(archive: str, digest: str) -> None:
    """Change the content of the archive member holding blob `digest`, in place (the tar stays a
    valid tar: its checksums cover headers only)."""
    with tarfile.open(archive) as tar:
        member = tar.getmember("blobs/sha256/" + digest.split(":")[1])
    with open(archive, "r+b") as f:
        f.seek(member.offset_data)
        data = f.read(member.size)
        f.seek(member.offset_data)
        f.write(_changed(data))


IMPORTED = {"manifest": lambda s: s.manifest, "config": lambda s: s.config_desc, "criu-tar": lambda s: s.criu_whole,
            "part": lambda s: s.parts[1].desc, "rootfs": lambda s: s.rootfs, "deleted": lambda s: s.deleted}


@pytest.mark.parametrize("blob", IMPORTED)
def test_import_checks_every_blob_against_its_digest(tmp_path, store, small_parts, blob):
    """An archive whose blob was changed after export (the archive's index and manifest still name
    the old digest): the import fails, and nothing of that blob is kept under the digest it claims."""
    snap = fake_snapshot(store, "a:1", payload=os.urandom(9000))
    archive = str(tmp_path / "a.tar")
    store.export(A1, "_local", archive)
    digest = IMPORTED[blob](snap).digest
    _damage_member(archive, digest)
    other = Store(str(tmp_path / "other"))
    with pytest.raises(CorruptSnapshot):
        import_archive(other, archive, UNSIGNED_IMPORTS, "_local")
    assert other.snapshots() == [] and json.load(open(other.layout.index_path))["manifests"] == []
    assert not os.path.exists(other.layout.blob_path(digest))
    assert os.listdir(other.images_dir) == [] and os.listdir(other.staging_dir) == []


def _sparse_file(path: str, size: int) -> None:
    with open(path, "wb") as f:
        f.write(b"x" * 4096)
        f.truncate(size)                    # the rest is a hole


def test_import_refuses_a_sparse_member_before_writing(tmp_path, store):
    fake_snapshot(store, "a:1")
    archive = str(tmp_path / "a.tar")
    store.export(A1, "_local", archive)
    blobs = tmp_path / "src" / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    _sparse_file(str(blobs / ("c" * 64)), 1 << 30)
    sparse = str(tmp_path / "sparse.tar")       # GNU tar writes sparse members (tar -r would not)
    subprocess.run(["tar", "--sparse", "-cf", sparse, "-C", str(tmp_path / "src"), "blobs/sha256/" + "c" * 64],
                   check=True)
    _concatenate(archive, sparse)
    assert os.path.getsize(archive) < 1 << 20
    with tarfile.open(archive) as tar:
        assert tar.getmember("blobs/sha256/" + "c" * 64).issparse()
    other = Store(str(tmp_path / "other"))
    with pytest.raises(CorruptSnapshot, match="not a plain regular file"):
        import_archive(other, archive, UNSIGNED_IMPORTS, "_local")
    assert other.snapshots() == [] and list(other.layout.all_blobs()) == []


def test_a_sparse_criu_file_is_never_unpacked(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    _sparse_file(str(src / "pages-1.img"), 64 << 20)
    tar = tmp_path / "criu.tar"
    subprocess.run(["tar", "--sparse", "-cf", str(tar), "-C", str(src), "pages-1.img"], check=True)
    dest = tmp_path / "images"
    dest.mkdir()
    with open(tar, "rb") as f, pytest.raises(fmt.SnapshotFormatError, match="unexpected entry"):
        fmt.unpack_whole_files(f, str(dest), 1 << 40)      # no size bound helps here: only the type
    assert not (dest / "pages-1.img").exists()


def test_layout_rejects_bad_digests(tmp_path):
    layout = ImageLayout(str(tmp_path))
    with pytest.raises(LayoutError):
        layout.blob_path("sha256:../../x")
    with pytest.raises(LayoutError):
        layout.blob_path("md5:abc")


def test_killed_capture_leaves_no_snapshot_and_is_collected(store):
    # A capture that dies before publish: its staging area (with a temp blob and a committed,
    # unpublished blob) names an owner that is gone.
    dead, orphan = dead_capture(store)
    assert store.snapshots() == []
    fake_snapshot(store, "b:1")          # any publish collects garbage
    assert not os.path.exists(store.layout.blob_path(orphan.digest))
    assert not os.path.exists(dead)


def test_leftover_temp_blobs_of_older_versions_are_collected(store):
    stray = os.path.join(store.layout.root, "blobs", "sha256", ".tmp-abc")
    open(stray, "wb").write(b"x")
    store.gc()
    assert not os.path.exists(stray)


# --- format 1 -------------------------------------------------------------------------------------

def _v1_layout(root: str, ref: str = "old:1", namespace: str | None = "team-a") -> str:
    """A store as thaw 0.1 wrote it: format 1 manifest/config, one CRIU tar layer, and the
    unpacked cache under layers/."""
    layout = ImageLayout(os.path.join(root, "layout"))
    layout.init()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in (("inventory.img", b"inv1"), ("pages-1.img", b"P" * 5000), ("descriptors.json", b"[]")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    criu = layout.put_bytes(buf.getvalue(), fmt.CRIU_LAYER_V1)
    rbuf = io.BytesIO()
    with tarfile.open(fileobj=rbuf, mode="w"):
        pass
    rootfs = layout.put_bytes(rbuf.getvalue(), fmt.ROOTFS_LAYER)
    deleted = layout.put_bytes(fmt.deleted_blob([]), fmt.DELETED_LAYER)
    config = {"formatVersion": 1, "ref": ref, "created": "2026-11-24T10:00:00Z",
              "fingerprint": {"node": {"kernel": "k"}, "container": {"image": "img:1", "namespace": namespace}},
              "source": {}, "sizes": {}, "phases": {"total": 1.0}, "gpu": {}, "network": {}}
    cdesc = layout.put_bytes(json.dumps(config).encode(), fmt.CONFIG_MEDIA_TYPE)
    manifest = {"schemaVersion": 2, "mediaType": fmt.MANIFEST_MEDIA_TYPE, "artifactType": fmt.ARTIFACT_TYPE,
                "config": cdesc.to_json(), "layers": [criu.to_json(), rootfs.to_json(), deleted.to_json()]}
    mdesc = layout.put_bytes(json.dumps(manifest).encode(), fmt.MANIFEST_MEDIA_TYPE)
    layout.write_index([Descriptor(fmt.MANIFEST_MEDIA_TYPE, mdesc.digest, mdesc.size,
                                       {"org.opencontainers.image.ref.name": ref})])
    os.makedirs(os.path.join(root, "layers", criu.digest.split(":")[1]))
    return mdesc.digest


def test_a_format_1_store_is_converted_once(tmp_path):
    root = str(tmp_path / "store")
    _v1_layout(root)
    store = open_store(Store(root))
    [snap] = store.snapshots()
    assert (snap.ref, snap.namespace, snap.format_version) == ("old:1", "team-a", 2)
    assert store.origin(snap) == "migrated"
    assert not os.path.exists(os.path.join(root, "layers"))
    with store.image_dir(snap, "digest") as path:
        assert open(os.path.join(path, "pages-1.img"), "rb").read() == b"P" * 5000
    assert len(list(store.layout.all_blobs())) == len(snap.blobs) - len(snap.parts)   # the v1 tar is gone


def test_a_format_1_snapshot_without_a_namespace_becomes_local(tmp_path):
    _v1_layout(str(tmp_path / "store"), namespace=None)
    [snap] = open_store(Store(str(tmp_path / "store"))).snapshots()
    assert snap.namespace == "_local"


def test_format_1_with_a_hostile_ref_is_dropped_on_migration(tmp_path):
    _v1_layout(str(tmp_path / "store"), ref="../../etc/x:1")
    store = open_store(Store(str(tmp_path / "store")))
    assert store.snapshots() == [] and json.load(open(store.layout.index_path))["manifests"] == []


def test_a_format_1_archive_imports_as_format_2(tmp_path):
    src = str(tmp_path / "v1")
    digest = _v1_layout(src)
    shutil.rmtree(os.path.join(src, "layers"))
    archive = str(tmp_path / "v1.tar")
    with tarfile.open(archive, "w") as tar:
        for name in ("oci-layout", "index.json"):
            tar.add(os.path.join(src, "layout", name), arcname=name)
        for blob in os.listdir(os.path.join(src, "layout", "blobs", "sha256")):
            tar.add(os.path.join(src, "layout", "blobs", "sha256", blob), arcname="blobs/sha256/" + blob)
    [snap] = import_archive(Store(str(tmp_path / "new")), archive, UNSIGNED_IMPORTS, "team-a")
    assert snap.format_version == 2 and snap.namespace == "team-a" and snap.manifest.digest != digest
