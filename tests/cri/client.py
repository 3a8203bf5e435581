"""A small CRI (runtime.v1) client that talks to containerd the way kubelet does.

`api.proto` (next to this file) is compiled with grpc_tools.protoc on first import into
`tests/cri/_gen/` (git-ignored); it is recompiled whenever api.proto or grpcio-tools changes.
The generated modules are named `thaw_cri_api_pb2*` so they cannot clash with another `api.proto`.

Request shapes follow what kubelet (1.2x) sends: pod labels io.kubernetes.pod.{name,namespace,uid},
log directory <log_root>/<ns>_<name>_<uid>, log path <container>/<attempt>.log, cgroup parent
<cgroup_root>/pod<uid> (cgroupfs driver), namespace options network=POD pid=CONTAINER ipc=POD,
seccomp Unconfined (kubelet's default without SeccompDefault).
"""

from __future__ import annotations

import hashlib
import importlib
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

import grpc

_HERE = Path(__file__).resolve().parent
_PROTO = _HERE / "api.proto"
_MODNAME = "thaw_cri_api"


def _gen_dir_candidates() -> list[Path]:
    return [_HERE / "_gen", Path(tempfile.gettempdir()) / f"thaw-cri-gen-{os.getuid()}"]


def _generate(gen: Path) -> None:
    import grpc_tools
    from grpc_tools import protoc

    src = _PROTO.read_bytes()
    stamp = hashlib.sha256(src + getattr(grpc_tools, "__version__", "?").encode()
                           + str(Path(grpc_tools.__file__).resolve()).encode()).hexdigest()
    if (gen / "STAMP").is_file() and (gen / "STAMP").read_text().strip() == stamp \
            and (gen / f"{_MODNAME}_pb2.py").is_file() and (gen / f"{_MODNAME}_pb2_grpc.py").is_file():
        return
    gen.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="._gen.", dir=gen.parent))
    os.chmod(tmp, 0o755)
    try:
        shutil.copy(_PROTO, tmp / f"{_MODNAME}.proto")
        include = Path(grpc_tools.__file__).resolve().parent / "_proto"
        rc = protoc.main(["grpc_tools.protoc", f"-I{tmp}", f"-I{include}",
                          f"--python_out={tmp}", f"--grpc_python_out={tmp}",
                          str(tmp / f"{_MODNAME}.proto")])
        if rc != 0:
            raise RuntimeError(f"grpc_tools.protoc failed on {_PROTO} (rc={rc})")
        (tmp / f"{_MODNAME}.proto").unlink()
        (tmp / ".gitignore").write_text("*\n")
        (tmp / "STAMP").write_text(stamp + "\n")
        old = None
        if gen.exists():
            old = gen.with_name(gen.name + f".old.{os.getpid()}")
            gen.rename(old)
        tmp.rename(gen)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _load():
    err = None
    for gen in _gen_dir_candidates():
        try:
            _generate(gen)
        except OSError as e:  # read-only checkout: use the temp dir
            err = e
            continue
        if str(gen) not in sys.path:
            sys.path.insert(0, str(gen))
        return (importlib.import_module(f"{_MODNAME}_pb2"),
                importlib.import_module(f"{_MODNAME}_pb2_grpc"))
    raise RuntimeError(f"cannot generate CRI stubs: {err}")


pb, pb_grpc = _load()

# Re-exported enum values, for readable tests.
CONTAINER_CREATED = pb.CONTAINER_CREATED
CONTAINER_RUNNING = pb.CONTAINER_RUNNING
CONTAINER_EXITED = pb.CONTAINER_EXITED
CONTAINER_UNKNOWN = pb.CONTAINER_UNKNOWN
SANDBOX_READY = pb.SANDBOX_READY
SANDBOX_NOTREADY = pb.SANDBOX_NOTREADY


def state_name(state: int) -> str:
    return pb.ContainerState.Name(state)


def _seccomp(profile: str | None):
    if profile is None:
        return None
    if profile in ("unconfined", "Unconfined"):
        return pb.SecurityProfile(profile_type=pb.SecurityProfile.Unconfined)
    if profile in ("runtime/default", "RuntimeDefault"):
        return pb.SecurityProfile(profile_type=pb.SecurityProfile.RuntimeDefault)
    if profile.startswith("localhost/"):
        return pb.SecurityProfile(profile_type=pb.SecurityProfile.Localhost,
                                  localhost_ref=profile[len("localhost/"):])
    raise ValueError(f"seccomp profile {profile!r}")


class CriClient:
    """CRI client over a unix socket.

    log_root: where pod log directories go when run_pod gets no log_dir (kubelet: /var/log/pods).
    cgroup_root: cgroupfs parent of pod cgroups (kubelet: /kubepods/besteffort); "" = let containerd
    put containers at /<id> of each hierarchy.
    """

    def __init__(self, address: str, *, log_root: str | os.PathLike | None = None,
                 cgroup_root: str = "", timeout: float = 60.0):
        self.address = address
        target = address if address.startswith("unix:") else "unix://" + os.path.abspath(address)
        self.channel = grpc.insecure_channel(target, options=[
            ("grpc.max_receive_message_length", 16 << 20),
            ("grpc.max_send_message_length", 16 << 20),
        ])
        self.runtime = pb_grpc.RuntimeServiceStub(self.channel)
        self.image = pb_grpc.ImageServiceStub(self.channel)
        self.timeout = timeout
        self.log_root = Path(log_root) if log_root else Path(tempfile.gettempdir()) / "thaw-cri-logs"
        self.cgroup_root = cgroup_root.rstrip("/")
        self.pod_configs: dict[str, pb.PodSandboxConfig] = {}

    def close(self) -> None:
        self.channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _call(self, stub, method: str, req, timeout: float | None = None):
        return getattr(stub, method)(req, timeout=timeout or self.timeout)

    # ------------------------------------------------------------------ runtime info

    def version(self, timeout: float | None = None) -> pb.VersionResponse:
        return self._call(self.runtime, "Version", pb.VersionRequest(version="v1"), timeout)

    # ------------------------------------------------------------------ pods

    def pod_sandbox_config(self, name: str, namespace: str = "default", *, uid: str | None = None,
                           annotations: dict[str, str] | None = None,
                           labels: dict[str, str] | None = None,
                           log_dir: str | os.PathLike | None = None,
                           cgroup_parent: str | None = None, hostname: str | None = None,
                           attempt: int = 0, seccomp: str | None = "unconfined",
                           share_pid: bool = False, dns_servers: list[str] | None = None,
                           sysctls: dict[str, str] | None = None) -> pb.PodSandboxConfig:
        uid = uid or str(uuid.uuid4())
        if log_dir is None:
            log_dir = self.log_root / f"{namespace}_{name}_{uid}"
        if cgroup_parent is None:
            cgroup_parent = f"{self.cgroup_root}/pod{uid}" if self.cgroup_root else ""
        all_labels = {
            "io.kubernetes.pod.name": name,
            "io.kubernetes.pod.namespace": namespace,
            "io.kubernetes.pod.uid": uid,
        }
        all_labels.update(labels or {})
        sc = pb.LinuxSandboxSecurityContext(namespace_options=pb.NamespaceOption(
            network=pb.POD, pid=pb.POD if share_pid else pb.CONTAINER, ipc=pb.POD))
        sp = _seccomp(seccomp)
        if sp is not None:
            sc.seccomp.CopyFrom(sp)
        cfg = pb.PodSandboxConfig(
            metadata=pb.PodSandboxMetadata(name=name, uid=uid, namespace=namespace, attempt=attempt),
            hostname=hostname or name[:63],
            log_directory=str(log_dir),
            labels=all_labels,
            annotations=dict(annotations or {}),
            linux=pb.LinuxPodSandboxConfig(cgroup_parent=cgroup_parent, security_context=sc,
                                           sysctls=dict(sysctls or {})),
        )
        if dns_servers:
            cfg.dns_config.CopyFrom(pb.DNSConfig(servers=dns_servers))
        return cfg

    def run_pod(self, name: str, namespace: str = "default", annotations: dict[str, str] | None = None,
                runtime_handler: str = "", log_dir: str | os.PathLike | None = None, *,
                timeout: float | None = None, **kw) -> str:
        """RunPodSandbox; returns the pod sandbox id. Extra keywords go to pod_sandbox_config()."""
        cfg = self.pod_sandbox_config(name, namespace, annotations=annotations, log_dir=log_dir, **kw)
        os.makedirs(cfg.log_directory, exist_ok=True)  # kubelet creates it before RunPodSandbox
        resp = self._call(self.runtime, "RunPodSandbox",
                          pb.RunPodSandboxRequest(config=cfg, runtime_handler=runtime_handler), timeout)
        self.pod_configs[resp.pod_sandbox_id] = cfg
        return resp.pod_sandbox_id

    def pod_status(self, pod_id: str, verbose: bool = False) -> pb.PodSandboxStatusResponse:
        return self._call(self.runtime, "PodSandboxStatus",
                          pb.PodSandboxStatusRequest(pod_sandbox_id=pod_id, verbose=verbose))

    def pod_ip(self, pod_id: str) -> str:
        return self.pod_status(pod_id).status.network.ip

    def pod_info(self, pod_id: str) -> dict:
        """containerd's verbose info (JSON): pid, netns path, runtimeHandler, runtimeSpec..."""
        import json
        return json.loads(self.pod_status(pod_id, verbose=True).info.get("info", "{}"))

    def list_pods(self, labels: dict[str, str] | None = None) -> list[pb.PodSandbox]:
        f = pb.PodSandboxFilter(label_selector=dict(labels or {}))
        return list(self._call(self.runtime, "ListPodSandbox", pb.ListPodSandboxRequest(filter=f)).items)

    def stop_pod(self, pod_id: str, timeout: float | None = None) -> None:
        self._call(self.runtime, "StopPodSandbox", pb.StopPodSandboxRequest(pod_sandbox_id=pod_id),
                   timeout)

    def remove_pod(self, pod_id: str, timeout: float | None = None) -> None:
        self._call(self.runtime, "RemovePodSandbox", pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id),
                   timeout)
        self.pod_configs.pop(pod_id, None)

    # ------------------------------------------------------------------ containers

    def container_config(self, name: str, image: str, command: list[str] | None = None,
                         args: list[str] | None = None, *, env: dict[str, str] | None = None,
                         annotations: dict[str, str] | None = None,
                         labels: dict[str, str] | None = None, log_path: str | None = None,
                         attempt: int = 0, working_dir: str = "",
                         mounts: list[dict | pb.Mount] | None = None, privileged: bool = False,
                         seccomp: str | None = "unconfined", pod_config: pb.PodSandboxConfig | None = None,
                         share_pid: bool = False, memory_limit: int = 0,
                         tty: bool = False) -> pb.ContainerConfig:
        all_labels = {"io.kubernetes.container.name": name}
        if pod_config is not None:
            all_labels.update({k: v for k, v in pod_config.labels.items()
                               if k.startswith("io.kubernetes.pod.")})
        all_labels.update(labels or {})
        pb_mounts = []
        for m in mounts or []:
            pb_mounts.append(m if isinstance(m, pb.Mount) else pb.Mount(**m))
        sc = pb.LinuxContainerSecurityContext(
            privileged=privileged,
            namespace_options=pb.NamespaceOption(network=pb.POD,
                                                 pid=pb.POD if share_pid else pb.CONTAINER,
                                                 ipc=pb.POD))
        sp = _seccomp(seccomp)
        if sp is not None:
            sc.seccomp.CopyFrom(sp)
        res = pb.LinuxContainerResources(cpu_period=100000, cpu_shares=2, oom_score_adj=1000,
                                         memory_limit_in_bytes=memory_limit)
        return pb.ContainerConfig(
            metadata=pb.ContainerMetadata(name=name, attempt=attempt),
            image=pb.ImageSpec(image=image),
            command=list(command or []),
            args=list(args or []),
            working_dir=working_dir,
            envs=[pb.KeyValue(key=k, value=v) for k, v in (env or {}).items()],
            mounts=pb_mounts,
            labels=all_labels,
            annotations=dict(annotations or {}),
            log_path=log_path if log_path is not None else f"{name}/{attempt}.log",
            tty=tty,
            linux=pb.LinuxContainerConfig(resources=res, security_context=sc),
        )

    def create_container(self, pod_id: str, pod_config: pb.PodSandboxConfig | None, name: str,
                         image: str, command: list[str] | None = None,
                         annotations: dict[str, str] | None = None, log_path: str | None = None,
                         *, timeout: float | None = None, **kw) -> str:
        """CreateContainer; returns the container id. pod_config=None: the one run_pod used.
        Extra keywords go to container_config() (args, env, labels, mounts, working_dir...)."""
        if pod_config is None:
            pod_config = self.pod_configs[pod_id]
        cfg = self.container_config(name, image, command, annotations=annotations, log_path=log_path,
                                    pod_config=pod_config, **kw)
        resp = self._call(self.runtime, "CreateContainer",
                          pb.CreateContainerRequest(pod_sandbox_id=pod_id, config=cfg,
                                                    sandbox_config=pod_config), timeout)
        return resp.container_id

    def start_container(self, cid: str, timeout: float | None = None) -> None:
        self._call(self.runtime, "StartContainer", pb.StartContainerRequest(container_id=cid), timeout)

    def stop_container(self, cid: str, grace: int = 0, timeout: float | None = None) -> None:
        """StopContainer with `grace` seconds before SIGKILL (CRI's `timeout` field)."""
        self._call(self.runtime, "StopContainer",
                   pb.StopContainerRequest(container_id=cid, timeout=grace),
                   timeout or (self.timeout + grace))

    def remove_container(self, cid: str, timeout: float | None = None) -> None:
        self._call(self.runtime, "RemoveContainer", pb.RemoveContainerRequest(container_id=cid), timeout)

    def container_status(self, cid: str, verbose: bool = False) -> pb.ContainerStatus:
        return self._call(self.runtime, "ContainerStatus",
                          pb.ContainerStatusRequest(container_id=cid, verbose=verbose)).status

    def container_info(self, cid: str) -> dict:
        """containerd's verbose info (JSON): pid, sandboxID, runtimeSpec, snapshotKey, ..."""
        import json
        resp = self._call(self.runtime, "ContainerStatus",
                          pb.ContainerStatusRequest(container_id=cid, verbose=True))
        return json.loads(resp.info.get("info", "{}"))

    def list_containers(self, pod_id: str | None = None, state: int | None = None,
                        labels: dict[str, str] | None = None) -> list[pb.Container]:
        f = pb.ContainerFilter(pod_sandbox_id=pod_id or "", label_selector=dict(labels or {}))
        if state is not None:
            f.state.CopyFrom(pb.ContainerStateValue(state=state))
        return list(self._call(self.runtime, "ListContainers",
                               pb.ListContainersRequest(filter=f)).containers)

    def exec_sync(self, cid: str, cmd: list[str], timeout: int = 10) -> pb.ExecSyncResponse:
        return self._call(self.runtime, "ExecSync",
                          pb.ExecSyncRequest(container_id=cid, cmd=cmd, timeout=timeout),
                          timeout + 10)

    def wait_container_state(self, cid: str, state: int, timeout: float = 30.0,
                             interval: float = 0.05) -> pb.ContainerStatus:
        deadline = time.monotonic() + timeout
        while True:
            st = self.container_status(cid)
            if st.state == state:
                return st
            if time.monotonic() > deadline:
                raise TimeoutError(f"container {cid[:12]} is {state_name(st.state)} "
                                   f"(reason={st.reason!r} message={st.message!r}), "
                                   f"wanted {state_name(state)}")
            time.sleep(interval)

    def run_container(self, pod_id: str, name: str, image: str, command: list[str] | None = None,
                      **kw) -> str:
        """Create + start (kubelet's sequence); returns the container id."""
        cid = self.create_container(pod_id, None, name, image, command, **kw)
        self.start_container(cid)
        return cid

    def remove_pod_fully(self, pod_id: str) -> None:
        """Kubelet's teardown: stop + remove every container, then stop + remove the pod."""
        for c in self.list_containers(pod_id=pod_id):
            self.stop_container(c.id, grace=0)
            self.remove_container(c.id)
        self.stop_pod(pod_id)
        self.remove_pod(pod_id)

    # ------------------------------------------------------------------ images

    def image_status(self, image: str) -> pb.Image | None:
        resp = self._call(self.image, "ImageStatus",
                          pb.ImageStatusRequest(image=pb.ImageSpec(image=image)))
        return resp.image if resp.HasField("image") else None

    def list_images(self) -> list[pb.Image]:
        return list(self._call(self.image, "ListImages", pb.ListImagesRequest()).images)
