import io
import os
import subprocess
import tarfile

import pytest

from thaw.shim import rootfs
from thaw.shim.rootfs import RootfsApplier, RootfsError


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


@pytest.mark.parametrize("name", ["../escape", "/abs/../../escape", "hostlink/tmp/owned"])
def test_refuses_escapes(fs, tmp_path, name):
    a = RootfsApplier(str(fs), str(tmp_path / "undo"))
    with pytest.raises(RootfsError):
        a.apply_tar(tar_of([(name, "file", b"x")]))
    a.undo()
    assert not os.path.exists("/tmp/owned")


def test_plain_dir_diff_by_time(tmp_path):
    r = tmp_path / "r"
    (r / "old").mkdir(parents=True)
    (r / "old" / "a").write_text("a")
    os.utime(r / "old" / "a", (1000, 1000))
    os.utime(r / "old", (1000, 1000))
    import time
    t = time.time() - 1
    (r / "new").mkdir()
    (r / "new" / "b").write_text("b")
    (r / "proc").mkdir()
    d = rootfs.compute_diff(str(r), ["/proc"], created_after=t)
    assert "new/b" in d.entries and "new" in d.entries
    assert "proc" not in d.entries
    # ctime of old/a is recent too (utime changes ctime), so it counts as changed: conservative.


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to mount overlayfs")
@pytest.mark.root
def test_overlay_diff_sees_upper_and_whiteouts(tmp_path):
    lower, upper, work, merged = (tmp_path / n for n in ("lower", "upper", "work", "merged"))
    for d in (lower, upper, work, merged):
        d.mkdir()
    (lower / "keep").write_text("k")
    (lower / "gone").write_text("g")
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                    f"lowerdir={lower},upperdir={upper},workdir={work}", str(merged)], check=True)
    try:
        (merged / "gone").unlink()
        (merged / "added").write_text("a")
        assert rootfs.overlay_upperdir(str(merged)) == str(upper)
        d = rootfs.compute_diff(str(merged), [])
        assert d.entries == ["added"] and d.deleted == ["gone"]
        buf = io.BytesIO()
        rootfs.write_diff_tar(d, buf)
        buf.seek(0)
        assert tarfile.open(fileobj=buf).getnames() == ["added"]
    finally:
        subprocess.run(["umount", str(merged)], check=True)
