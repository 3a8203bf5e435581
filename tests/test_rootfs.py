import io
import os
import subprocess
import tarfile
import uuid

import pytest

from thaw.shim.drivers import rootfs
from thaw.shim.drivers.rootfs import RootfsApplier, RootfsError, lexists_beneath


def tar_of(entries):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, kind, data in entries:
            info = tarfile.TarInfo(name)
            info.mtime = 1700000000
            if kind == "dir":
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            elif kind == "sym":
                info.type, info.linkname = tarfile.SYMTYPE, data
                tar.addfile(info)
            else:
                info.size, info.mode = len(data), 0o640
                tar.addfile(info, io.BytesIO(data))
    buf.seek(0)
    return buf


def tree(root):
    out = {}
    for d, dirs, files in os.walk(root):
        for n in dirs + files:
            p = os.path.join(d, n)
            rel = os.path.relpath(p, root)
            out[rel] = os.readlink(p) if os.path.islink(p) else (open(p, "rb").read() if os.path.isfile(p) else "dir")
    return out


@pytest.fixture
def fs(tmp_path):
    r = tmp_path / "rootfs"
    (r / "etc").mkdir(parents=True)
    (r / "etc" / "motd").write_text("welcome")
    (r / "etc" / "app.conf").write_text("original")
    os.symlink("/", r / "hostlink")
    return r


def test_apply_then_undo_restores_original(fs, tmp_path):
    before = tree(fs)
    a = RootfsApplier(str(fs), str(tmp_path / "undo"))
    a.delete(["etc/motd", "does/not/exist"])
    n = a.apply_tar(tar_of([("var", "dir", None), ("var/cache/x.bin", "file", b"123"),
                            ("etc/app.conf", "file", b"changed"), ("etc/link", "sym", "app.conf")]))
    assert n == 4
    assert (fs / "etc" / "app.conf").read_text() == "changed" and not (fs / "etc" / "motd").exists()
    assert (fs / "var" / "cache" / "x.bin").read_bytes() == b"123"
    assert oct((fs / "var" / "cache" / "x.bin").stat().st_mode & 0o777) == oct(0o640)
    a.undo()
    assert tree(fs) == before


def test_commit_keeps_changes(fs, tmp_path):
    a = RootfsApplier(str(fs), str(tmp_path / "undo"))
    a.apply_tar(tar_of([("etc/app.conf", "file", b"changed")]))
    a.commit()
    assert (fs / "etc" / "app.conf").read_text() == "changed" and not (tmp_path / "undo").exists()


@pytest.mark.parametrize("name, lands", [("../escape", "escape"), ("/abs/../../escape", "escape"),
                                         ("hostlink/tmp/owned", "/tmp/owned")])
def test_refuses_escapes(fs, tmp_path, name, lands):
    """`lands`: where a write that followed the name would go (beside the rootfs, or through its
    symlink to / on the host)."""
    target = os.path.join(str(tmp_path), lands) if not lands.startswith("/") else lands
    token = uuid.uuid4().hex[:12]
    name, target = name.replace("owned", f"owned-{token}"), target.replace("owned", f"owned-{token}")
    assert not os.path.lexists(target)
    a = RootfsApplier(str(fs), str(tmp_path / "undo"))
    with pytest.raises(RootfsError):
        a.apply_tar(tar_of([(name, "file", b"x")]))
    a.undo()
    assert not os.path.lexists(target)
    assert tree(fs) == {"etc": "dir", "etc/motd": b"welcome", "etc/app.conf": b"original", "hostlink": "/"}


def diff_of(root: str, exclude=(), created_after=None) -> tuple[rootfs.Diff, dict[str, tarfile.TarInfo], bytes]:
    buf = io.BytesIO()
    d = rootfs.write_diff(root, list(exclude), buf, created_after)
    raw = buf.getvalue()
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        members = {m.name: m for m in tar.getmembers()}
    return d, members, raw


def test_plain_dir_diff_by_time(tmp_path):
    r = tmp_path / "r"
    (r / "old").mkdir(parents=True)
    (r / "old" / "a").write_text("a")
    import time
    t = time.time() + 0.5
    time.sleep(1)
    (r / "new").mkdir()
    (r / "new" / "b").write_text("b")
    (r / "proc").mkdir()
    (r / "proc" / "x").write_text("x")
    d, members, _ = diff_of(str(r), ["/proc"], created_after=t)
    assert list(members) == ["new", "new/b"] and d.entries == 2     # parents first, only what changed
    assert members["new"].isdir() and members["new/b"].size == 1


def test_diff_records_symlinks_and_never_follows_them(tmp_path):
    r = tmp_path / "r"
    (r / "d").mkdir(parents=True)
    secret = tmp_path / "host-secret"
    secret.mkdir()
    (secret / "shadow").write_text("host bytes")
    os.symlink(str(secret), r / "d" / "link")                  # absolute: the host's path
    os.symlink(str(secret / "shadow"), r / "file-link")
    _d, members, raw = diff_of(str(r))
    assert members["d/link"].issym() and members["d/link"].linkname == str(secret)
    assert members["file-link"].issym()
    assert b"host bytes" not in raw


def test_a_directory_swapped_for_a_symlink_is_refused(tmp_path, monkeypatch):
    """The race a container can run during capture, made deterministic: between listing `d` and
    opening it, `d` becomes a symlink to a host directory. The open refuses it."""
    r = tmp_path / "r"
    (r / "d").mkdir(parents=True)
    (r / "d" / "f").write_text("container bytes")
    secret = tmp_path / "host"
    secret.mkdir()
    (secret / "f").write_text("host bytes")
    real_stat = os.stat

    def stat_then_swap(path, *a, **kw):
        st = real_stat(path, *a, **kw)
        if path == "d":
            os.rename(r / "d", tmp_path / "moved")
            os.symlink(str(secret), r / "d")
        return st
    monkeypatch.setattr(os, "stat", stat_then_swap)
    with pytest.raises(rootfs.RootfsError, match="no longer a directory"):
        diff_of(str(r))


def test_a_file_swapped_for_a_symlink_is_refused(tmp_path, monkeypatch):
    """As above, for a file: between the listing's stat and the open, `f` becomes a symlink to a
    host file. The open refuses it; no byte of the host file reaches the diff."""
    r = tmp_path / "r"
    r.mkdir()
    (r / "f").write_text("container bytes")
    secret = tmp_path / "host-secret"
    secret.write_text("host bytes")
    real_stat = os.stat

    def stat_then_swap(path, *a, **kw):
        st = real_stat(path, *a, **kw)
        if path == "f":
            os.unlink(r / "f")
            os.symlink(str(secret), r / "f")
        return st
    monkeypatch.setattr(os, "stat", stat_then_swap)
    buf = io.BytesIO()
    with pytest.raises(rootfs.RootfsError, match="cannot be opened as a file"):
        rootfs.write_diff(str(r), [], buf)
    assert b"host bytes" not in buf.getvalue()


def test_sparse_members_are_refused_on_apply(fs, tmp_path):
    big = tmp_path / "big"
    with open(big, "wb") as f:
        f.truncate(1 << 30)                                       # 1 GiB of hole
    archive = tmp_path / "bomb.tar"
    subprocess.run(["tar", "--sparse", "-cf", str(archive), "-C", str(tmp_path), "big"], check=True)
    assert archive.stat().st_size < 1 << 20
    applier = RootfsApplier(str(fs), str(tmp_path / "undo"))
    with open(archive, "rb") as f, pytest.raises(RootfsError, match="sparse"):
        applier.apply_tar(f)
    assert not (fs / "big").exists()                 # refused before anything was written (not undone)
    applier.undo()


@pytest.mark.root                     # mounts overlayfs
def test_overlay_diff_sees_upper_and_whiteouts(tmp_path):
    lower, upper, work, merged = (tmp_path / n for n in ("lower", "upper", "work", "merged"))
    for d in (lower, upper, work, merged):
        d.mkdir()
    (lower / "keep").write_text("k")
    (lower / "gone").write_text("g")
    (lower / "dir").mkdir()
    (lower / "dir" / "old").write_text("o")
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                    f"lowerdir={lower},upperdir={upper},workdir={work}", str(merged)], check=True)
    try:
        (merged / "gone").unlink()
        (merged / "added").write_text("a")
        for f in (merged / "dir").iterdir():
            f.unlink()
        (merged / "dir").rmdir()
        (merged / "dir").mkdir()                                 # opaque: replaces the lower dir
        assert rootfs.overlay_dirs(str(merged)) == (str(upper), [str(lower)])
        d, members, _ = diff_of(str(merged))
        assert sorted(members) == ["added", "dir"] and sorted(d.deleted) == ["dir", "gone"]
    finally:
        subprocess.run(["umount", str(merged)], check=True)


def test_lexists_beneath_never_follows_the_containers_links(tmp_path):
    """The rootfs is the container's: a link in it must not send the lookup to the host (here /etc,
    which exists there: followed, it would say the masked path exists for the wrong reason, or,
    for a path the host lacks, that it is absent)."""
    root = tmp_path / "rootfs"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "hostname").write_text("x")
    os.symlink("/etc", root / "hostetc")
    os.symlink("/no/such/target", root / "etc" / "dangling")
    assert lexists_beneath(str(root), "/etc/hostname") is True
    assert lexists_beneath(str(root), "/etc/dangling") is True          # the link itself is there
    assert lexists_beneath(str(root), "/etc/absent") is False
    assert lexists_beneath(str(root), "/etc/hostname/below") is False   # a file on the way
    assert lexists_beneath(str(root), "/hostetc/passwd") is None        # a link on the way
    assert lexists_beneath(str(root), "/etc/../hostetc") is None
    assert lexists_beneath(str(root), "/") is True
