"""Test helpers: runc bundles built from the host's busybox/python, and a caller that drives a
runtime exactly as containerd's runc v2 shim does (global flags, create/start/delete, stdio pipes,
log.json). Shared by the tests and the benchmarks."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass, field

BUSYBOX = shutil.which("busybox") or "/bin/busybox"
PYTHON = "/usr/bin/python3"   # Debian's, inside containers through a read-only /usr bind


def wait_for(pred, timeout: float, what: str, interval: float = 0.05, error: type[Exception] = AssertionError):
    """Poll pred() until it returns something truthy; raise `error` after timeout seconds."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise error(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def wait_http_ready(pid: int, url: str, timeout: float) -> float:
    """Poll a readiness URL inside pid's network namespace; perf_counter() when it answered 2xx."""
    from thaw.shim.drivers import engine
    wait_for(lambda: engine.ready(url, pid, timeout=5), timeout, f"{url} in pid {pid}", 0.02)
    return time.perf_counter()


def fake_snapshot(store, ref: str, payload: bytes = b"pages" * 1000, config=None, namespace: str = "_local",
                  origin: str = "captured"):
    """Publish a snapshot whose CRIU images are stand-ins (for tests of the store and of the
    restore decision, which never hand them to CRIU). `config`: a SnapshotConfig to record (its
    ref and namespace are replaced). `origin`: what the store records as its origin ("pulled:REF"
    for one a registry holds)."""
    import dataclasses
    import io
    import tarfile

    from thaw.oci import snapshot as fmt
    with store.staging("capture") as staging:
        images = staging.new_dir("images")
        for name, data in (("inventory.img", b"inv"), ("pages-1.img", payload), ("descriptors.json", b"[]")):
            with open(os.path.join(images, name), "wb") as f:
                f.write(data)

        def rootfs_tar(w):
            with tarfile.open(fileobj=w, mode="w|") as tar:
                info = tarfile.TarInfo("tmp/state.txt")
                info.size = 5
                tar.addfile(info, io.BytesIO(b"hello"))
        rootfs = staging.put_stream(rootfs_tar, fmt.ROOTFS_LAYER)
        deleted = staging.put_bytes(fmt.deleted_blob(["etc/motd"]), fmt.DELETED_LAYER)
        whole, parts, hashes, _ = staging.package_images(images)
        if config is None:
            config = fmt.SnapshotConfig(ref=ref, fingerprint=fmt.Fingerprint(), phases={"total": 1.0})
        config = dataclasses.replace(config, ref=ref, namespace=namespace)
        snap = staging.write_snapshot(config, whole, parts, rootfs, deleted)
        return store.publish(snap, images, origin, hashes)


def etc_image(path: str, owners: bool = False) -> str:
    """An image layer (an overlay's read-only lower) at PATH/rootfs: busybox, /etc/motd,
    /etc/app.conf and a directory /etc/conf.d of three files (owners: uid 1000-1002, mode 0640)."""
    rootfs = os.path.join(make_bundle(path, ["true"]), "rootfs")
    with open(os.path.join(rootfs, "etc", "motd"), "w") as f:
        f.write("welcome\n")
    with open(os.path.join(rootfs, "etc", "app.conf"), "w") as f:
        f.write("original\n")
    os.makedirs(os.path.join(rootfs, "etc", "conf.d"))
    for i in range(3):
        p = os.path.join(rootfs, "etc", "conf.d", f"{i}.conf")
        with open(p, "w") as f:
            f.write(f"conf {i}\n")
        if owners:
            os.chown(p, 1000 + i, 1000)
            os.chmod(p, 0o640)
    return rootfs


def dead_capture(store):
    """What a capture killed before publish leaves: its staging area (renamed to capture-dead),
    holding a temp blob of 1000 bytes and a committed, unpublished blob, with an owner handle that
    names no live process (our pid, another start time). Returns (that area, the blob's descriptor)."""
    with store.staging("capture") as staging:
        orphan = staging.put_bytes(b"half a snapshot", "application/octet-stream")
        with open(os.path.join(staging.path, ".blob-leftover"), "wb") as f:
            f.write(b"x" * 1000)
        dead = os.path.join(store.staging_dir, "capture-dead")
        os.rename(staging.path, dead)
        with open(os.path.join(dead, ".owner"), "w") as f:
            json.dump({"pid": os.getpid(), "start": 1}, f)
        os.mkdir(staging.path)
    return dead, orphan


def unique(prefix: str = "t") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def make_bundle(path: str, args: list[str], *, annotations: dict[str, str] | None = None,
                netns: str | None = None, python: bool = False, env: list[str] | None = None,
                cgroup: str | None = None, binds: dict[str, str] | None = None,
                image: str | None = "default") -> str:
    """A runc bundle at `path`: busybox rootfs (plus the host's /usr, read-only, when python),
    a new or joined (netns path) network namespace, the given process args and annotations."""
    rootfs = os.path.join(path, "rootfs")
    os.makedirs(os.path.join(rootfs, "bin"), exist_ok=True)
    for d in ("proc", "sys", "dev", "tmp", "etc", "root", "work"):
        os.makedirs(os.path.join(rootfs, d), exist_ok=True)
    mounts = [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
         "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
        {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
         "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
        {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
    ]
    if python:
        # Debian is merged-/usr: /bin, /lib, /lib64, /sbin are symlinks into /usr.
        os.rmdir(os.path.join(rootfs, "bin"))
        for link in ("bin", "lib", "lib64", "sbin"):
            if os.path.islink("/" + link):
                os.symlink(os.readlink("/" + link), os.path.join(rootfs, link))
        os.makedirs(os.path.join(rootfs, "usr"), exist_ok=True)
        mounts.append({"destination": "/usr", "type": "bind", "source": "/usr", "options": ["bind", "ro"]})
    else:
        shutil.copy2(BUSYBOX, os.path.join(rootfs, "bin", "busybox"))
        for applet in ("sh", "sleep", "echo", "cat", "nc", "httpd", "seq", "date", "touch", "rm", "ls", "true", "wget"):
            dst = os.path.join(rootfs, "bin", applet)
            if not os.path.lexists(dst):
                os.symlink("busybox", dst)
    for dest, src in (binds or {}).items():
        os.makedirs(os.path.join(rootfs, dest.lstrip("/")), exist_ok=True)
        mounts.append({"destination": dest, "type": "bind", "source": src, "options": ["rbind", "ro"]})
    with open(os.path.join(rootfs, "etc", "hostname"), "w") as f:
        f.write("thaw-test\n")
    namespaces = [{"type": t} for t in ("pid", "ipc", "uts", "mount")]
    namespaces.append({"type": "network", "path": netns} if netns else {"type": "network"})
    spec = {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False, "user": {"uid": 0, "gid": 0}, "args": args, "cwd": "/",
            "env": env or ["PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", "PYTHONUNBUFFERED=1"],
            "capabilities": {k: ["CAP_NET_BIND_SERVICE", "CAP_KILL", "CAP_AUDIT_WRITE"]
                             for k in ("bounding", "effective", "permitted")},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": True,
        },
        "root": {"path": "rootfs", "readonly": False},
        "hostname": "thaw-test",
        "mounts": mounts,
        "annotations": {**_image_annotation(image, python), **(annotations or {})},
        "linux": {
            "cgroupsPath": cgroup or f"/thaw-test/{os.path.basename(path)}-{uuid.uuid4().hex[:8]}",
            "resources": {"devices": [{"allow": False, "access": "rwm"}]},
            "namespaces": namespaces,
            "maskedPaths": ["/proc/kcore", "/proc/keys", "/proc/timer_list", "/sys/firmware"],
            "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"],
        },
    }
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(spec, f, indent=1)
    return path


def overlay_bundle(path: str, lower: str, args: list[str], **kw) -> str:
    """make_bundle, with the rootfs an overlay of `lower` (read-only, the image) and a fresh
    upper directory — the shape containerd's snapshotters give a container. Unmount with
    `umount_overlay(bundle)`."""
    b = make_bundle(path, args, **kw)
    rootfs = os.path.join(b, "rootfs")
    upper, work = os.path.join(path, "upper"), os.path.join(path, "work")
    os.makedirs(upper)
    os.makedirs(work)
    shutil.rmtree(rootfs)
    os.makedirs(rootfs)
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                    f"lowerdir={lower},upperdir={upper},workdir={work}", rootfs], check=True)
    return b


def umount_overlay(bundle: str) -> None:
    subprocess.run(["umount", "-l", os.path.join(bundle, "rootfs")], capture_output=True)


def tree_digest(root: str) -> dict[str, tuple]:
    """Everything a container sees of a file tree: per path its type, mode, owner, size and
    content digest or link target (not directory mtimes, which any change of a child moves)."""
    import hashlib
    import stat as st_mod
    out: dict[str, tuple] = {}
    for d, dirs, files in os.walk(root):
        for n in dirs + files:
            p = os.path.join(d, n)
            st = os.lstat(p)
            rel = os.path.relpath(p, root)
            if st_mod.S_ISREG(st.st_mode):
                with open(p, "rb") as f:
                    what = hashlib.sha256(f.read()).hexdigest()
            elif st_mod.S_ISLNK(st.st_mode):
                what = os.readlink(p)
            else:
                what = ""
            out[rel] = (st_mod.S_IFMT(st.st_mode), st_mod.S_IMODE(st.st_mode), st.st_uid, st.st_gid,
                        st.st_size if st_mod.S_ISREG(st.st_mode) else 0, what,
                        st.st_mtime_ns if not st_mod.S_ISDIR(st.st_mode) else 0)
    return out


def _image_annotation(image: str | None, python: bool) -> dict[str, str]:
    """An image name, as ctr or an image builder would set: without one (and without an overlay
    rootfs to identify the image by) thaw never restores a container. None: no name."""
    if image is None:
        return {}
    if image == "default":
        image = f"thaw-test/{'python' if python else 'busybox'}:1"
    return {"org.opencontainers.image.ref.name": image}


@dataclass
class ShimContainer:
    """A container created the way containerd's runc v2 shim creates one."""
    runtime: str
    root: str
    bundle: str
    id: str
    stdout: list[str] = field(default_factory=list)
    stderr: list[str] = field(default_factory=list)
    create_rc: int | None = None
    create_pid: int | None = None
    create_s: float = 0.0
    _threads: list[threading.Thread] = field(default_factory=list)

    @property
    def log_path(self) -> str:
        return os.path.join(self.bundle, "log.json")

    @property
    def pid_file(self) -> str:
        return os.path.join(self.bundle, "init.pid")

    def _global(self) -> list[str]:
        return [self.runtime, "--root", self.root, "--log", self.log_path, "--log-format", "json"]

    def create(self, env: dict[str, str] | None = None, timeout: float = 300, session: bool = False) -> int:
        """`create --bundle B --pid-file P ID` with stdin /dev/null and stdout/stderr pipes that
        this object drains (the container holds their write ends after create). `session`: in a
        process group of its own (a fault that kills its group must not kill the test)."""
        t = time.perf_counter()
        with self.pipes() as (out_w, err_w):
            proc = subprocess.Popen([*self._global(), "create", "--bundle", self.bundle, "--pid-file",
                                     self.pid_file, self.id],
                                    stdin=subprocess.DEVNULL, stdout=out_w, stderr=err_w,
                                    env={**os.environ, **(env or {})}, start_new_session=session)
        self.create_pid = proc.pid
        self.create_rc = proc.wait(timeout=timeout)
        self.create_s = time.perf_counter() - t
        return self.create_rc

    @contextlib.contextmanager
    def pipes(self):
        """stdout/stderr write ends for a runtime call, drained into self.stdout/self.stderr once
        the caller has handed them on (the container keeps them, as with containerd's shim)."""
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        try:
            yield out_w, err_w
        finally:
            os.close(out_w)
            os.close(err_w)
            for fd, sink in ((out_r, self.stdout), (err_r, self.stderr)):
                th = threading.Thread(target=_drain, args=(fd, sink), daemon=True)
                th.start()
                self._threads.append(th)

    def run(self, *args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(self._global() + list(args), capture_output=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"{args} failed ({proc.returncode}): {proc.stderr.decode()} "
                                 f"log: {self.log_text()[-1500:]}")
        return proc

    def start(self) -> None:
        self.run("start", self.id)

    def state(self) -> dict | None:
        proc = self.run("state", self.id, check=False)
        return json.loads(proc.stdout) if proc.returncode == 0 else None

    def pid(self) -> int:
        with open(self.pid_file) as f:
            return int(f.read())

    def destroy(self) -> None:
        self.run("kill", self.id, "KILL", check=False)
        for _ in range(50):
            st = self.state()
            if st is None or st.get("status") == "stopped":
                break
            time.sleep(0.05)
        self.run("delete", "--force", self.id, check=False)
        for th in self._threads:
            th.join(timeout=5)

    def log_text(self) -> str:
        try:
            with open(self.log_path) as f:
                return f.read()
        except OSError:
            return ""

    def log_entries(self) -> list[dict]:
        out = []
        for line in self.log_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
        return out

    def output(self) -> str:
        return "".join(self.stdout)

    def wait_output(self, predicate, timeout: float = 30) -> str:
        deadline = time.time() + timeout
        while time.time() < deadline:
            text = self.output()
            if predicate(text):
                return text
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for output; got {self.output()[-500:]!r} "
                             f"stderr {''.join(self.stderr)[-500:]!r} log {self.log_text()[-800:]}")


def _drain(fd: int, sink: list[str]) -> None:
    with os.fdopen(fd, "rb", buffering=0) as f:
        while chunk := f.read(65536):
            sink.append(chunk.decode(errors="replace"))


def netns(name: str) -> str:
    """Create a named network namespace with loopback up (pyroute2: no iproute2 needed, the GPU
    machine has none); returns its path."""
    from pyroute2 import NetNS
    from pyroute2 import netns as pnetns
    pnetns.create(name)
    with NetNS(name) as ns:
        ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")
    return f"/run/netns/{name}"


def netns_delete(name: str) -> None:
    from pyroute2 import netns as pnetns
    try:
        pnetns.remove(name)
    except OSError:
        pass


def tcp_in_netns(ns_path: str, port: int, payload: bytes = b"ping\n", timeout: float = 5) -> bytes:
    """Connect to 127.0.0.1:port inside a network namespace, send payload, return the answer."""
    code = ("import socket,sys;s=socket.create_connection(('127.0.0.1',%d),timeout=%f);"
            "s.sendall(%r);s.shutdown(socket.SHUT_WR);d=b''\n"
            "while True:\n c=s.recv(65536)\n if not c: break\n d+=c\n"
            "sys.stdout.buffer.write(d)") % (port, timeout, payload)
    proc = subprocess.run(["nsenter", f"--net={ns_path}", PYTHON, "-c", code],
                          capture_output=True, timeout=timeout + 5)
    if proc.returncode != 0:
        raise ConnectionError(proc.stderr.decode()[-500:])
    return proc.stdout
