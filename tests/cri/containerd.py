"""A private containerd with the CRI plugin, for tests: any build of tests/cri/builds.py (1.6 and
1.7 with config version 2, 2.x with version 3).

Everything lives under one work directory (default /tmp/thaw-cri-XXXX): config, root, state,
grpc socket, CNI config, host-local IPAM data, pod logs, runc root. The system containerd,
/etc/containerd, /var/lib/containerd, /etc/cni, /opt/cni and /var/lib/cni/networks are never
touched. containerd and the shims run with the build's own directory first on PATH, so each
build uses its own containerd-shim-runc-v2. Three things cannot be moved and are shared with a
system containerd: shim sockets in /run/containerd/s/<sha256 of our socket path + ns + id> (no
clash), libcni's result cache /var/lib/cni/results/<network>-<sandbox id>-eth0 (our network is
named thawtestN; the file goes away on CNI DEL), and the bridge plugin's net.ipv4.ip_forward=1
(isGateway). On stop, ip_forward is restored and those directories are removed when this
instance created them and they are empty again (and no other instance runs). NRI, which would
listen on the host-wide /var/run/nri/nri.sock (2.x enables it), is disabled.

Each instance takes a "slot" N (flock on /run/thaw-cri-tests/slot-N.lock, held while it runs):
bridge thawtestN, pod subnet 10.233.N.0/24, pod cgroups under /thawtestN. A slot whose subnet
the host already routes (another network) is passed over. A slot whose lock is free but whose
record file is still there belongs to a crashed run: its leftovers (containerd, shims,
containers, mounts, bridge, cgroups, work dir) are reaped before the slot is reused.

The config is written in two steps, as on a node: the main config (below) and then thaw's
drop-in, by the production installer (thaw.shim.containerd.install), which adds the `thaw`
handler to what this config defines and checks the result with `containerd config dump`.

Runtime handlers (CRI runtime_handler / RuntimeClass handler):
  runc   default; io.containerd.runc.v2, BinaryName=runc
  thaw   written by thaw's installer: runc's entry with BinaryName=<thaw_binary>, annotations thaw.dev/*
  record io.containerd.runc.v2, BinaryName=<workdir>/record-runtime: a shell wrapper that appends
         its argv to <workdir>/record-runtime.log and execs runc (shows what the shim runs);
         annotations thaw.dev/* allowed
  + extra_handlers={name: {"binary": path, "annotations": [globs]}}
All handlers share options Root=<state>/runc (so the runtime gets --root <state>/runc/k8s.io) and
SystemdCgroup=false (cgroupfs; pods go under /thawtestN/pod<uid>/<container id>).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import tomlkit

from thaw.shim.containerd import dropin
from thaw.shim.containerd.install import install as register_thaw
from thaw.shim.containerd.merge import CRI_V2, CRI_V3

from . import images as _images

if TYPE_CHECKING:  # the client compiles the CRI stubs on import
    from .client import CriClient
from .builds import Build

REGISTRY_DIR = Path("/run/thaw-cri-tests")
NAMESPACE = "k8s.io"
SHIM_BINARY = "containerd-shim-runc-v2"
CNI_BIN_DIR = "/usr/lib/cni"
# Created by containerd (shim sockets, hard-coded) and libcni (result cache, not configurable
# through containerd's CRI config), deepest first.
SHIM_SOCKET_DIR = "/run/containerd/s"
CNI_CACHE_DIR = "/var/lib/cni/results"
HOST_DIRS_CREATED = [Path("/run/containerd/s"), Path("/run/containerd"),
                     Path("/var/lib/cni/results"), Path("/var/lib/cni")]
# Not needed by CRI: skipping them makes start-up quieter and faster. NRI would listen on the
# host-wide /var/run/nri/nri.sock.
DISABLED_PLUGINS = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
                    "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",
                    "io.containerd.snapshotter.v1.blockfile", "io.containerd.snapshotter.v1.erofs",
                    "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing",
                    "io.containerd.nri.v1.nri"]


def skip_reason(build: Build) -> str | None:
    """Why the containerd tests cannot run `build` here, or None."""
    if os.geteuid() != 0:
        return "needs root (runs a private containerd)"
    missing = build.missing()
    if missing:
        return missing
    if not shutil.which("runc"):
        return "runc not installed (Debian: apt-get install runc)"
    for p in ("bridge", "host-local", "loopback"):
        if not Path(CNI_BIN_DIR, p).exists():
            return f"CNI plugin {CNI_BIN_DIR}/{p} missing (apt-get install containernetworking-plugins)"
    if not (shutil.which("busybox") or Path("/bin/busybox").exists()):
        return "busybox missing (apt-get install busybox-static)"
    return None


# ------------------------------------------------------------------------------------------ helpers

def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def _pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie counts as dead
    try:
        st = Path(f"/proc/{pid}/stat").read_text()
        return st.rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _kill_wait(pids: list[int], sig=signal.SIGKILL, timeout: float = 5.0) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)


def _unescape_mount(s: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), s)


def mounts_under(prefix: str | os.PathLike) -> list[str]:
    """Mount points at or below `prefix` (from /proc/self/mountinfo), in mount order."""
    prefix = str(prefix).rstrip("/")
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = _unescape_mount(line.split()[4])
            if mp == prefix or mp.startswith(prefix + "/"):
                out.append(mp)
    return out


def unmount_all_under(prefix: str | os.PathLike) -> list[str]:
    """Lazily unmount everything below `prefix`, deepest/latest first; returns what is left."""
    for _ in range(5):
        mps = mounts_under(prefix)
        if not mps:
            return []
        for mp in reversed(mps):
            subprocess.run(["umount", "-l", mp], capture_output=True)
    return mounts_under(prefix)


def _link_exists(name: str) -> bool:
    return Path("/sys/class/net", name).exists()


def _delete_link(name: str) -> None:
    if _link_exists(name):
        subprocess.run(["ip", "link", "del", name], capture_output=True)


def _cgroup_hierarchies() -> list[Path]:
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fstype = right.split()[0] if right else ""
            if fstype in ("cgroup", "cgroup2"):
                out.append(Path(_unescape_mount(left.split()[4])))
    return out


def remove_cgroups(rel: str) -> list[str]:
    """rmdir <hierarchy>/<rel> and everything below it, in every cgroup hierarchy.
    Returns the directories that could not be removed (still populated)."""
    rel = rel.strip("/")
    if not rel:
        return []
    left = []
    for h in _cgroup_hierarchies():
        top = h / rel
        if not top.is_dir():
            continue
        for root, dirs, _files in os.walk(top, topdown=False):
            for d in dirs:
                try:
                    os.rmdir(os.path.join(root, d))
                except OSError:
                    left.append(os.path.join(root, d))
        try:
            os.rmdir(top)
        except OSError:
            left.append(str(top))
    return left


def has_cap_sys_resource() -> bool:
    """CAP_SYS_RESOURCE (bit 24) in our effective set. Without it nobody here may lower an
    oom_score_adj, and runc fails the pause container (oomScoreAdj -998) with
    "nsexec: failed to update /proc/self/oom_score_adj: Permission denied"."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> 24 & 1)
    return True


def _read_sysctl(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


# ------------------------------------------------------------------------------------------ purge

def purge(info: dict) -> list[str]:
    """Remove everything a (live or crashed) instance described by `info` may have left behind.

    Order matters: containerd, then shims (both SIGKILL), then the containers themselves through
    runc (processes keep running after their shim dies), then mounts, the bridge, cgroups, and
    finally the work directory (only when nothing is mounted below it). Returns problems found.
    """
    problems = []
    workdir = info.get("workdir", "")
    address = info.get("address", "")
    config = info.get("config", "")

    # 0. ids of every sandbox/container this instance knew (for host-wide leftovers below)
    ids: set[str] = set()
    for sub in ("root", "state"):
        for kind in ("sandboxes", "containers"):
            d = Path(workdir, sub, "io.containerd.grpc.v1.cri", kind)
            if workdir and d.is_dir():
                ids.update(x.name for x in d.iterdir())
    tasks = Path(workdir, "state", "io.containerd.runtime.v2.task", NAMESPACE)
    if workdir and tasks.is_dir():
        ids.update(x.name for x in tasks.iterdir())

    # 1. containerd
    cpid = info.get("containerd_pid")
    if cpid and _alive(cpid) and config and config in _cmdline(cpid):
        _kill_wait([cpid], signal.SIGKILL)

    # 2. shims of this containerd (they carry "-address <our socket>")
    if address:
        shims = [p for p in _pids() if (cl := _cmdline(p)) and cl[0].endswith(SHIM_BINARY)
                 and address in cl]
        for p in shims:
            cl = _cmdline(p)
            if "-id" in cl[:-1]:
                ids.add(cl[cl.index("-id") + 1])
        _kill_wait(shims, signal.SIGKILL)
        # a SIGKILLed shim leaves its socket: /run/containerd/s/sha256(<address>/<ns>/<id>)
        for i in ids:
            h = hashlib.sha256(os.path.join(address, NAMESPACE, i).encode()).hexdigest()
            Path(SHIM_SOCKET_DIR, h).unlink(missing_ok=True)

    # 3. containers left in our runc root
    runc_root = info.get("runc_root")
    if runc_root and Path(runc_root).is_dir():
        for ns_dir in Path(runc_root).iterdir():
            if not ns_dir.is_dir():
                continue
            for cdir in ns_dir.iterdir():
                if (cdir / "state.json").exists():
                    subprocess.run(["runc", "--root", str(ns_dir), "delete", "--force", cdir.name],
                                   capture_output=True, timeout=30)

    # 4. mounts (rootfs overlays, sandbox shm, netns bind mounts)
    if workdir:
        left = unmount_all_under(workdir)
        if left:
            problems.append(f"still mounted under {workdir}: {left}")

    # 5. libcni result cache of sandboxes that never got a CNI DEL
    if info.get("network"):
        for i in ids:
            Path(CNI_CACHE_DIR, f"{info['network']}-{i}-eth0").unlink(missing_ok=True)
            Path(CNI_CACHE_DIR, f"cni-loopback-{i}-lo").unlink(missing_ok=True)

    # 6. bridge (pod veths vanish with their netns)
    if info.get("bridge"):
        _delete_link(info["bridge"])

    # 7. cgroups
    if info.get("cgroup_root"):
        left = remove_cgroups(info["cgroup_root"])
        if left:
            problems.append(f"cgroups not removable: {left[:5]}")

    # 8. work dir
    if workdir and Path(workdir).exists() and not mounts_under(workdir):
        shutil.rmtree(workdir, ignore_errors=True)
    return problems


def _restore_host(info: dict, slot_n: int) -> None:
    """Undo the host-wide side effects (ip_forward, fixed dirs) unless another instance runs."""
    if _other_slots_alive(slot_n):
        return
    before = info.get("ip_forward_before")
    if before is not None and _read_sysctl("/proc/sys/net/ipv4/ip_forward") != before:
        Path("/proc/sys/net/ipv4/ip_forward").write_text(before + "\n")
    for d in info.get("created_host_dirs") or []:   # deepest first
        try:
            os.rmdir(d)
        except OSError:
            pass


# ------------------------------------------------------------------------------------------ slots

class _Slot:
    def __init__(self, n: int, fd: int):
        self.n, self.fd = n, fd
        self.record = REGISTRY_DIR / f"slot-{n}.json"

    def write(self, info: dict) -> None:
        tmp = self.record.with_suffix(".tmp")
        tmp.write_text(json.dumps(info, indent=1))
        tmp.replace(self.record)

    def release(self) -> None:
        try:
            self.record.unlink()
        except FileNotFoundError:
            pass
        os.close(self.fd)


def _other_slots_alive(mine: int) -> bool:
    for rec in REGISTRY_DIR.glob("slot-*.lock"):
        n = int(rec.stem.split("-")[1])
        if n == mine:
            continue
        fd = os.open(rec, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
        except OSError:
            return True
        finally:
            os.close(fd)
    return False


def slot_subnet(n: int) -> ipaddress.IPv4Network:
    return ipaddress.IPv4Network(f"10.233.{n}.0/24")


def _routed_elsewhere(subnet: ipaddress.IPv4Network, bridge: str) -> bool:
    """Does the host route part of `subnet` through anything but `bridge` (another network that
    happens to use it: pods there would be unreachable)?"""
    p = subprocess.run(["ip", "-j", "-4", "route", "show", "table", "all"], capture_output=True, text=True)
    for r in json.loads(p.stdout or "[]"):
        dst = r.get("dst", "")
        if r.get("dev") == bridge or dst in ("", "default") or r.get("type") == "broadcast":
            continue
        try:
            if ipaddress.ip_network(dst, strict=False).overlaps(subnet):
                return True
        except ValueError:
            continue
    return False


def _acquire_slot(first: int = 0) -> _Slot:
    REGISTRY_DIR.mkdir(parents=True, exist_ok=True)
    for n in range(first, 250):
        if _routed_elsewhere(slot_subnet(n), f"thawtest{n}"):
            continue
        fd = os.open(REGISTRY_DIR / f"slot-{n}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                continue
            raise
        slot = _Slot(n, fd)
        if slot.record.exists():            # a crashed run: clean its leftovers first
            try:
                stale = json.loads(slot.record.read_text())
                purge(stale)
                _restore_host(stale, n)
            except (ValueError, OSError):
                pass
            slot.record.unlink(missing_ok=True)
        _delete_link(f"thawtest{n}")
        remove_cgroups(f"thawtest{n}")
        return slot
    raise RuntimeError(f"no free slot in {REGISTRY_DIR}")


# ------------------------------------------------------------------------------------------ containerd

class Containerd:
    """A private containerd with CRI. Use as a context manager or call start()/stop().

    Attributes after start(): address (grpc socket), workdir, root, state, config_path, log_path,
    runc_root (<state>/runc/k8s.io: the --root the shim passes to the runtime), bridge,
    subnet (ipaddress.IPv4Network), cgroup_root ("/thawtestN"), log_root (pod log dirs),
    thaw_binary, thaw_is_real (False when the thaw handler falls back to runc), images (refs),
    build, layout (config version: 2 for 1.x, 3 for 2.x), conf_d (thaw's drop-in is written there).
    """

    def __init__(self, build: Build, thaw_binary: str | None = None, *, workdir_base: str | None = None,
                 runc_bin: str | None = None, cni_bin_dir: str = CNI_BIN_DIR, log_level: str = "debug",
                 extra_handlers: dict[str, dict] | None = None, env: dict[str, str] | None = None,
                 first_slot: int = 0):
        self.build = build
        self.containerd_bin = build.bin("containerd")
        self.ctr_bin = build.bin("ctr")
        self.layout = 3 if build.major >= 2 else 2
        self.runc_bin = runc_bin or shutil.which("runc") or "/usr/sbin/runc"
        found = thaw_binary or shutil.which("thaw-runtime")
        self.thaw_is_real = bool(found)
        self.thaw_binary = os.path.abspath(found) if found else self.runc_bin
        self.cni_bin_dir = cni_bin_dir
        self.log_level = log_level
        # name -> {"binary": path, "annotations": [globs]}: more io.containerd.runc.v2 handlers
        self.extra_handlers = dict(extra_handlers or {})
        # extra environment for containerd; shims and runtimes (BinaryName) inherit it
        self.env = dict(env or {})
        self.workdir_base = workdir_base or os.environ.get("THAW_CRI_WORKDIR_BASE")
        self.first_slot = first_slot
        self.proc: subprocess.Popen | None = None
        self.slot: _Slot | None = None
        self._clients: list[CriClient] = []
        self._forward_before: str | None = None
        self.images: list[str] = []
        self._created_host_dirs: list[Path] = []
        self.startup_seconds: dict[str, float] = {}

    # -------------------------------------------------------------- layout

    def _layout(self) -> None:
        assert self.slot is not None, "_layout runs after a slot is taken"
        n = self.slot.n
        self.workdir = Path(tempfile.mkdtemp(prefix=f"thaw-cri-{n}-", dir=self.workdir_base))
        os.chmod(self.workdir, 0o755)
        self.root = self.workdir / "root"
        self.state = self.workdir / "state"
        self.address = str(self.workdir / "containerd.sock")
        self.config_path = self.workdir / "config.toml"
        self.conf_d = self.workdir / "conf.d"
        self.log_path = self.workdir / "containerd.log"
        self.cni_conf_dir = self.workdir / "cni" / "net.d"
        self.ipam_dir = self.workdir / "cni" / "ipam"
        self.log_root = self.workdir / "pod-logs"
        self.runc_root_base = self.state / "runc"
        self.runc_root = self.runc_root_base / NAMESPACE
        self.record_runtime = self.workdir / "record-runtime"
        self.record_log = self.workdir / "record-runtime.log"
        self.bridge = f"thawtest{n}"
        self.network_name = f"thawtest{n}"
        self.subnet = slot_subnet(n)
        self.gateway = str(self.subnet.network_address + 1)
        self.cgroup_root = f"/thawtest{n}"
        for d in (self.root, self.state, self.cni_conf_dir, self.ipam_dir, self.log_root):
            d.mkdir(parents=True, exist_ok=True)

    def info(self) -> dict:
        return {
            "owner_pid": os.getpid(),
            "workdir": str(self.workdir), "address": self.address, "config": str(self.config_path),
            "containerd_pid": self.proc.pid if self.proc else None,
            "runc_root": str(self.runc_root_base), "bridge": self.bridge,
            "network": self.network_name,
            "cgroup_root": self.cgroup_root,
            "ip_forward_before": self._forward_before,
            "created_host_dirs": [str(d) for d in self._created_host_dirs],
        }

    def _runtime(self, binary: str, annotations: list[str]) -> dict:
        entry = {"runtime_type": "io.containerd.runc.v2",
                 "options": {"BinaryName": binary, "Root": str(self.runc_root_base), "SystemdCgroup": False}}
        if annotations:
            entry["pod_annotations"] = entry["container_annotations"] = list(annotations)
        return entry

    def main_config(self) -> dict:
        """containerd's config for this instance in its config version, without the thaw handler."""
        runtimes = {"runc": self._runtime(self.runc_bin, []),
                    "record": self._runtime(str(self.record_runtime), dropin.ANNOTATIONS),
                    **{n: self._runtime(h["binary"], list(h.get("annotations", [])))
                       for n, h in self.extra_handlers.items()}}
        handlers = {"default_runtime_name": "runc", "runtimes": runtimes}
        runtime = {"enable_selinux": False, "max_container_log_line_size": 16384,
                   "netns_mounts_under_state_dir": True,
                   # true when we lack CAP_SYS_RESOURCE: clamp oom_score_adj to containerd's own (see
                   # has_cap_sys_resource); kubelet's -998 for the sandbox cannot be applied then.
                   "restrict_oom_score_adj": not has_cap_sys_resource()}
        images = {"snapshotter": "overlayfs", "disable_snapshot_annotations": True, "discard_unpacked_layers": False}
        streaming = {"stream_server_address": "127.0.0.1", "stream_server_port": "0"}
        cni = {"conf_dir": str(self.cni_conf_dir), "max_conf_num": 1}
        plugins: dict[str, Any]
        if self.layout == 2:
            plugins = {CRI_V2: {**runtime, **streaming, "sandbox_image": _images.PAUSE_IMAGE,
                                "containerd": {**images, **handlers}, "cni": {**cni, "bin_dir": self.cni_bin_dir}}}
        else:
            plugins = {CRI_V3: {**runtime, "containerd": handlers, "cni": {**cni, "bin_dirs": [self.cni_bin_dir]}},
                       "io.containerd.cri.v1.images": {**images, "pinned_images": {"sandbox": _images.PAUSE_IMAGE}},
                       CRI_V2: streaming}
        plugins["io.containerd.internal.v1.opt"] = {"path": str(self.workdir / "opt")}
        return {"version": self.layout, "root": str(self.root), "state": str(self.state), "oom_score": 0,
                "disabled_plugins": DISABLED_PLUGINS, "grpc": {"address": self.address},
                "debug": {"level": self.log_level}, "plugins": plugins}

    def write_config(self) -> None:
        """The main config, then thaw's drop-in through the production installer (as on a node)."""
        self.config_path.write_text(tomlkit.dumps(self.main_config()))
        with open(self.workdir / "thaw-install.log", "w") as log:
            register_thaw(str(self.config_path), str(self.conf_d), self.containerd_bin, self.thaw_binary,
                          say=lambda m: print(m, file=log))
        conflist = {
            "cniVersion": "0.4.0",
            "name": self.network_name,
            "plugins": [{
                "type": "bridge",
                "bridge": self.bridge,
                "isGateway": True,
                "ipMasq": False,
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": str(self.subnet), "gateway": self.gateway}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": str(self.ipam_dir),
                },
            }],
        }
        (self.cni_conf_dir / "10-thawtest.conflist").write_text(json.dumps(conflist, indent=1))
        self.record_runtime.write_text(
            "#!/bin/sh\n"
            f'printf "%s\\n" "$*" >> {self.record_log}\n'
            f'exec {self.runc_bin} "$@"\n')
        self.record_runtime.chmod(0o755)

    # -------------------------------------------------------------- lifecycle

    def start(self, timeout: float = 30.0) -> Containerd:
        t0 = time.monotonic()
        self.slot = _acquire_slot(self.first_slot)
        try:
            self._layout()
            self.write_config()
            self._forward_before = _read_sysctl("/proc/sys/net/ipv4/ip_forward")
            # fixed paths containerd / libcni create no matter the config; removed on stop
            # when we created them and they are empty again
            self._created_host_dirs = [d for d in HOST_DIRS_CREATED if not d.exists()]
            self.slot.write(self.info())
            logf = open(self.log_path, "ab")
            self.proc = subprocess.Popen([self.containerd_bin, "--config", str(self.config_path)],
                                         stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                                         start_new_session=True, cwd=self.workdir,
                                         env=self.containerd_env())
            logf.close()
            self.slot.write(self.info())
            self._wait_ready(timeout)
            self.startup_seconds["containerd"] = time.monotonic() - t0
            t1 = time.monotonic()
            self.import_images(_images.standard_images())
            self.startup_seconds["images"] = time.monotonic() - t1
        except BaseException:
            self.stop()
            raise
        return self

    def containerd_env(self) -> dict[str, str]:
        """containerd's environment: the build's directory first on PATH, so that containerd starts
        the build's own containerd-shim-runc-v2 (shims and runtimes inherit it)."""
        return {**os.environ, **self.env, "PATH": f"{self.build.bin_dir}:{os.environ.get('PATH', '')}"}

    def _wait_ready(self, timeout: float) -> None:
        from .client import CriClient
        deadline = time.monotonic() + timeout
        last = None
        assert self.proc is not None, "_wait_ready runs after containerd is started"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"containerd exited with {self.proc.returncode}\n{self.log_tail()}")
            if os.path.exists(self.address):
                try:
                    with CriClient(self.address, timeout=2) as c:
                        c.version(timeout=2)
                    return
                except Exception as e:  # noqa: BLE001 - keep polling
                    last = e
            time.sleep(0.05)
        raise TimeoutError(f"containerd CRI not ready after {timeout}s ({last})\n{self.log_tail()}")

    def stop(self) -> list[str]:
        """Remove all pods, stop containerd, purge leftovers. Returns problems (also logged)."""
        problems = []
        if self.proc is not None and self.proc.poll() is None and os.path.exists(self.address):
            try:
                problems += self.remove_all_pods()
            except Exception as e:  # noqa: BLE001
                problems.append(f"removing pods: {e}")
        for c in self._clients:
            try:
                c.close()
            except Exception:  # noqa: BLE001
                pass
        self._clients.clear()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.slot is not None:
            if getattr(self, "workdir", None) is not None:
                problems += purge(self.info())
            _restore_host(self.info(), self.slot.n)
            self.slot.release()
            self.slot = None
        self.proc = None
        return problems

    def __enter__(self) -> Containerd:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -------------------------------------------------------------- tools

    def client(self, **kw):
        """A new CriClient on this containerd (pod logs under log_root, cgroups under cgroup_root)."""
        from .client import CriClient
        c = CriClient(self.address, log_root=self.log_root, cgroup_root=self.cgroup_root, **kw)
        self._clients.append(c)
        return c

    def remove_all_pods(self, timeout: float = 30) -> list[str]:
        problems = []
        c = self.client(timeout=timeout)
        for pod in c.list_pods():
            try:
                c.remove_pod_fully(pod.id)
            except Exception as e:  # noqa: BLE001
                problems.append(f"pod {pod.id[:12]}: {e}")
        return problems

    def ctr(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        cmd = [self.ctr_bin, "--address", self.address, "--namespace", NAMESPACE, *args]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if check and p.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} -> {p.returncode}\n{p.stdout}\n{p.stderr}")
        return p

    def import_images(self, defs: list, wait: float = 30.0) -> list:
        """Build one OCI archive from ImageDefs, `ctr images import` it (unpacks into overlayfs),
        and wait until the CRI image service lists every ref (it learns about images from events)."""
        archive = self.workdir / f"images-{len(self.images)}.oci.tar"
        built = _images.write_oci_archive(defs, archive)
        _images.import_archive(self.address, archive, NAMESPACE, "overlayfs", self.ctr_bin)
        archive.unlink()
        c = self.client(timeout=5)
        deadline = time.monotonic() + wait
        for b in built:
            while c.image_status(b.ref) is None:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"CRI does not see imported image {b.ref}\n{self.log_tail()}")
                time.sleep(0.05)
            self.images.append(b.ref)
        return built

    def log_tail(self, n: int = 60) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no containerd log)"
        return f"--- last {min(n, len(lines))} lines of {self.log_path} ---\n" + "\n".join(lines[-n:])

    def bundle_dir(self, container_id: str) -> Path:
        """The OCI bundle the shim passes to the runtime (config.json, rootfs/, log.json...)."""
        return self.state / "io.containerd.runtime.v2.task" / NAMESPACE / container_id

    def bundle_config(self, container_id: str) -> dict:
        return json.loads((self.bundle_dir(container_id) / "config.json").read_text())

    def shim_pids(self, sandbox_id: str | None = None) -> list[int]:
        """containerd-shim-runc-v2 processes of this containerd (one per pod: -id <sandbox id>).
        Raises if one runs another build's shim binary: each build must use its own."""
        out = []
        own = os.path.realpath(self.build.bin(SHIM_BINARY))
        for p in _pids():
            cl = _cmdline(p)
            if not cl or not cl[0].endswith(SHIM_BINARY) or self.address not in cl:
                continue
            if sandbox_id is not None and sandbox_id not in cl:
                continue
            if _alive(p):
                exe = os.path.realpath(f"/proc/{p}/exe")
                if exe != own and _alive(p):
                    raise AssertionError(f"shim {p} of {self.build.id} runs {exe}, not {own}")
                out.append(p)
        return out

    def mounts(self) -> list[str]:
        """Mount points under the work dir (rootfs overlays, sandbox shm, netns files)."""
        return mounts_under(self.workdir)

    def runc_list(self) -> list[dict]:
        """Containers in the runc root the shim uses (`runc --root <runc_root> list`)."""
        if not self.runc_root.is_dir():
            return []
        p = subprocess.run([self.runc_bin, "--root", str(self.runc_root), "list", "--format", "json"],
                           capture_output=True, text=True, timeout=30)
        return json.loads(p.stdout or "null") or []

    def record_lines(self) -> list[str]:
        """argv lines the `record` handler's wrapper saw (global flags included)."""
        try:
            return self.record_log.read_text().splitlines()
        except FileNotFoundError:
            return []

    def wait_tcp(self, ip: str, port: int, timeout: float = 10.0) -> socket.socket:
        """Connect to ip:port, retrying until the server inside the pod listens."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return socket.create_connection((ip, port), timeout=2)
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
