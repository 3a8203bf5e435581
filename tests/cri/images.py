"""Build small OCI images locally (no registry) and import them into a containerd.

Pure Python: each layer is an uncompressed tar (media type ``application/vnd.oci.image.layer.v1.tar``,
so its digest is also its diff_id), plus an image config, a manifest, and an OCI image-layout tar
(``oci-layout``, ``index.json``, ``blobs/sha256/...``) that ``ctr images import`` reads.
Every tar is built deterministically (fixed mtime, uid/gid 0, sorted entries), so the same inputs
always give the same digests.

The index entries carry the full reference in ``org.opencontainers.image.ref.name`` (and in
``io.containerd.image.name``). ctr 1.6 keeps a full reference as the image name when no
``--base-name`` is given (see containerd images/archive/reference.go: refTranslator).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import platform
import posixpath
import shutil
import stat
import subprocess
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

MT_LAYER = "application/vnd.oci.image.layer.v1.tar"
MT_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_INDEX = "application/vnd.oci.image.index.v1+json"

# Names as containerd's CRI normalises them ("thaw-test/busybox:1" -> "docker.io/thaw-test/busybox:1").
PAUSE_IMAGE = "docker.io/thaw-test/pause:1"
BUSYBOX_IMAGE = "docker.io/thaw-test/busybox:1"

DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# The pause container: PID 1 of the sandbox. Exits 0 on TERM/INT (containerd SIGKILLs it anyway on
# StopPodSandbox); `sleep & wait` keeps the shell interruptible and reaps children.
PAUSE_SCRIPT = b"""#!/bin/sh
trap 'exit 0' TERM INT
while :; do sleep 3600 & wait $!; done
"""

_FIXED_MTIME = 1_700_000_000


def oci_arch() -> str:
    m = platform.machine()
    return {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "ppc64le": "ppc64le",
            "s390x": "s390x", "riscv64": "riscv64"}.get(m, m)


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------------------------------ layers

class LayerBuilder:
    """Collect entries for one layer tar; parent directories are added automatically."""

    def __init__(self) -> None:
        self._entries: dict[str, tuple[tarfile.TarInfo, bytes | None]] = {}

    def _info(self, path: str, type_: bytes, mode: int) -> tarfile.TarInfo:
        name = path.strip("/")
        if not name:
            raise ValueError("empty path")
        ti = tarfile.TarInfo(name)
        ti.type = type_
        ti.mode = mode
        ti.mtime = _FIXED_MTIME
        ti.uid = ti.gid = 0
        ti.uname = ti.gname = "root"
        return ti

    def _parents(self, path: str) -> None:
        parts = path.strip("/").split("/")[:-1]
        for i in range(1, len(parts) + 1):
            p = "/".join(parts[:i])
            if p not in self._entries:
                self._entries[p] = (self._info(p, tarfile.DIRTYPE, 0o755), None)

    def dir(self, path: str, mode: int = 0o755) -> LayerBuilder:
        self._parents(path)
        self._entries[path.strip("/")] = (self._info(path, tarfile.DIRTYPE, mode), None)
        return self

    def file(self, path: str, data: bytes, mode: int = 0o644) -> LayerBuilder:
        self._parents(path)
        ti = self._info(path, tarfile.REGTYPE, mode)
        ti.size = len(data)
        self._entries[path.strip("/")] = (ti, data)
        return self

    def symlink(self, path: str, target: str) -> LayerBuilder:
        self._parents(path)
        ti = self._info(path, tarfile.SYMTYPE, 0o777)
        ti.linkname = target
        self._entries[path.strip("/")] = (ti, None)
        return self

    def add_tree(self, src: str | os.PathLike, dest: str = "/") -> LayerBuilder:
        """Add a host directory tree (files, dirs, symlinks; modes kept, owner forced to root)."""
        src = Path(src)
        for root, dirs, files in os.walk(src):
            dirs.sort()
            rel_root = Path(root).relative_to(src)
            for name in sorted(dirs) + sorted(files):
                p = Path(root) / name
                dst = posixpath.normpath(posixpath.join("/", dest, str(rel_root), name))
                st = p.lstat()
                if stat.S_ISLNK(st.st_mode):
                    self.symlink(dst, os.readlink(p))
                elif stat.S_ISDIR(st.st_mode):
                    self.dir(dst, stat.S_IMODE(st.st_mode))
                elif stat.S_ISREG(st.st_mode):
                    self.file(dst, p.read_bytes(), stat.S_IMODE(st.st_mode))
        return self

    def tar_bytes(self) -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
            for name in sorted(self._entries):
                ti, data = self._entries[name]
                tf.addfile(ti, io.BytesIO(data) if data is not None else None)
        return buf.getvalue()


def busybox_layer(busybox: str | os.PathLike | None = None) -> LayerBuilder:
    """A minimal root filesystem: static busybox in /bin with one symlink per applet."""
    busybox = Path(busybox or shutil.which("busybox") or "/bin/busybox")
    if not busybox.exists():
        raise FileNotFoundError("busybox not found (Debian: apt-get install busybox-static)")
    data = busybox.read_bytes()
    out = subprocess.run([str(busybox), "--list"], check=True, capture_output=True, text=True).stdout
    applets = sorted({a.strip() for a in out.split() if a.strip() and "/" not in a})
    lb = LayerBuilder()
    for d in ("bin", "dev", "etc", "proc", "sys", "tmp", "var", "var/tmp", "root", "run",
              "usr", "usr/bin", "usr/sbin", "sbin"):
        lb.dir(d, 0o1777 if d in ("tmp", "var/tmp") else 0o755)
    lb.file("bin/busybox", data, 0o755)
    for a in applets:
        if a != "busybox":
            lb.symlink(f"bin/{a}", "busybox")
    lb.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n")
    lb.file("etc/group", b"root:x:0:\nnogroup:x:65534:\n")
    return lb


def pause_layer() -> LayerBuilder:
    return LayerBuilder().file("pause", PAUSE_SCRIPT, 0o755)


# ------------------------------------------------------------------------------------------ images

@dataclass
class ImageDef:
    ref: str                                   # full reference, e.g. docker.io/thaw-test/busybox:1
    layers: list[bytes]                        # uncompressed layer tars, bottom first
    cmd: list[str] | None = None
    entrypoint: list[str] | None = None
    env: list[str] = field(default_factory=lambda: [DEFAULT_PATH])
    working_dir: str = "/"
    labels: dict[str, str] = field(default_factory=dict)
    user: str = ""


@dataclass
class BuiltImage:
    ref: str
    manifest_digest: str
    config_digest: str
    layer_digests: list[str]


def write_oci_archive(images: list[ImageDef], out: str | os.PathLike) -> list[BuiltImage]:
    """Write one OCI image-layout tar holding all `images` (shared layers stored once)."""
    blobs: dict[str, bytes] = {}
    index_entries = []
    built = []
    arch = oci_arch()

    def put(data: bytes) -> str:
        d = _sha256(data)
        blobs[d] = data
        return d

    for img in images:
        layer_descs, diff_ids = [], []
        for layer in img.layers:
            d = put(layer)
            layer_descs.append({"mediaType": MT_LAYER, "digest": d, "size": len(layer)})
            diff_ids.append(d)
        cfg: dict = {"Env": list(img.env), "WorkingDir": img.working_dir}
        if img.cmd is not None:
            cfg["Cmd"] = list(img.cmd)
        if img.entrypoint is not None:
            cfg["Entrypoint"] = list(img.entrypoint)
        if img.labels:
            cfg["Labels"] = dict(img.labels)
        if img.user:
            cfg["User"] = img.user
        config = {
            "created": "2023-11-14T22:13:20Z",
            "architecture": arch,
            "os": "linux",
            "config": cfg,
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            "history": [{"created": "2023-11-14T22:13:20Z", "created_by": "thaw tests/cri/images.py"}
                        for _ in diff_ids],
        }
        config_bytes = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
        config_digest = put(config_bytes)
        manifest = {
            "schemaVersion": 2,
            "mediaType": MT_MANIFEST,
            "config": {"mediaType": MT_CONFIG, "digest": config_digest, "size": len(config_bytes)},
            "layers": layer_descs,
        }
        manifest_bytes = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
        manifest_digest = put(manifest_bytes)
        index_entries.append({
            "mediaType": MT_MANIFEST,
            "digest": manifest_digest,
            "size": len(manifest_bytes),
            "platform": {"architecture": arch, "os": "linux"},
            "annotations": {
                "org.opencontainers.image.ref.name": img.ref,
                "io.containerd.image.name": img.ref,
            },
        })
        built.append(BuiltImage(img.ref, manifest_digest, config_digest, diff_ids))

    index = {"schemaVersion": 2, "mediaType": MT_INDEX, "manifests": index_entries}
    files = {
        "oci-layout": json.dumps({"imageLayoutVersion": "1.0.0"}).encode(),
        "index.json": json.dumps(index, sort_keys=True, separators=(",", ":")).encode(),
    }
    for d, data in blobs.items():
        files["blobs/sha256/" + d.split(":", 1)[1]] = data

    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tf:
        for dname in ("blobs", "blobs/sha256"):
            ti = tarfile.TarInfo(dname)
            ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, 0o755, _FIXED_MTIME
            tf.addfile(ti)
        for name in sorted(files):
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode, ti.mtime = len(files[name]), 0o644, _FIXED_MTIME
            tf.addfile(ti, io.BytesIO(files[name]))
    tmp.replace(out)
    return built


def standard_images(busybox: str | os.PathLike | None = None) -> list[ImageDef]:
    """The standard test images: the sandbox (pause) image and thaw-test/busybox:1.

    Both share the busybox layer (unpacked once); pause adds a second layer with /pause.
    """
    base = busybox_layer(busybox).tar_bytes()
    return [
        ImageDef(ref=PAUSE_IMAGE, layers=[base, pause_layer().tar_bytes()], entrypoint=["/pause"]),
        ImageDef(ref=BUSYBOX_IMAGE, layers=[base], cmd=["sh"]),
    ]


def import_archive(address: str, archive: str | os.PathLike, namespace: str = "k8s.io",
                   snapshotter: str = "overlayfs", ctr: str = "ctr", timeout: float = 120) -> str:
    """`ctr images import` (which also unpacks into `snapshotter`); returns ctr's output."""
    cmd = [ctr, "--address", address, "--namespace", namespace, "images", "import",
           "--snapshotter", snapshotter, str(archive)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p.stdout + p.stderr
