"""The one module that drives CUDA: the driver's checkpoint API through cuda-python
(`cuda.bindings.driver`), and what thaw needs to know about a container's GPUs.

Per process: lock (with timeout) -> checkpoint (device memory moves into the process's host
memory, GPU resources are released) -> [CRIU] -> restore (optionally onto other GPUs of the same
model, by UUID pairs) -> unlock. `cuInit` runs once per thaw process (each costs ~0.3 s).

Which GPUs a container has comes from its spec (the /dev/nvidiaN device nodes NVIDIA's CDI spec
or device plugin put there) and the driver's /proc/driver/nvidia/gpus/*/information; that needs
no CUDA call and is what the fingerprint compares.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import psutil

from thaw.oci import ThawError
from thaw.oci import snapshot as fmt

from ..timing import PhaseTimer

LOCK_TIMEOUT_MS = 10_000
NVIDIA_MAJOR = 195
PROC_GPUS = "/proc/driver/nvidia/gpus"
PROC_VERSION = "/proc/driver/nvidia/version"


class CudaError(ThawError):
    def __init__(self, pid: int | None, step: str, detail: str):
        self.pid, self.step = pid, step
        super().__init__(f"CUDA {step} of pid {pid}: {detail}" if pid else f"CUDA {step}: {detail}")


# --- the driver ---------------------------------------------------------------------------------

_driver = None


def available() -> bool:
    """True if this node has an NVIDIA driver and cuda-python. Neither imports the bindings (a
    third of a second) nor calls CUDA: a restore starts that in the background (init_quietly)."""
    if not os.path.exists("/dev/nvidiactl"):
        return False
    try:
        return importlib.util.find_spec("cuda.bindings.driver") is not None
    except ImportError:
        return False


def driver() -> Any:
    """cuda.bindings.driver, initialised once per process (untyped: Any)."""
    global _driver
    if _driver is None:
        try:
            from cuda.bindings import driver as d  # noqa: PLC0415 - cuda-python: GPU nodes only, optional, and ~0.5 s with cuInit
        except ImportError as exc:
            raise CudaError(None, "init", "cuda-python (cuda-bindings) is not installed") from exc
        err, = d.cuInit(0)
        if err != d.CUresult.CUDA_SUCCESS:
            raise CudaError(None, "init", f"cuInit failed: {_name(d, err)}")
        _driver = d
    return _driver


def init_quietly() -> None:
    """Initialise the driver ahead of need (in a thread); errors surface on first real use."""
    try:
        driver()
    except CudaError:
        pass


def _name(d: Any, err: object) -> str:
    try:
        _e, s = d.cuGetErrorName(err)
        return s.decode() if isinstance(s, bytes) else str(s)
    except Exception:  # noqa: BLE001
        return str(err)


def _check(result: Any, pid: int | None, step: str) -> Any:
    d = driver()
    err = result[0] if isinstance(result, tuple) else result
    if err != d.CUresult.CUDA_SUCCESS:
        raise CudaError(pid, step, _name(d, err))
    return result[1] if isinstance(result, tuple) and len(result) > 1 else None


def state(pid: int) -> str | None:
    """RUNNING, LOCKED, CHECKPOINTED or FAILED; None if pid is not a CUDA process."""
    d = driver()
    err, st = d.cuCheckpointProcessGetState(pid)
    if err != d.CUresult.CUDA_SUCCESS:
        return None
    name: str = st.name
    return name.replace("CU_PROCESS_STATE_", "")


def lock(pid: int, timeout_ms: int = LOCK_TIMEOUT_MS) -> None:
    d = driver()
    args = d.CUcheckpointLockArgs()
    args.timeoutMs = timeout_ms
    _check(d.cuCheckpointProcessLock(pid, args), pid, "lock")


def checkpoint(pid: int) -> None:
    d = driver()
    _check(d.cuCheckpointProcessCheckpoint(pid, d.CUcheckpointCheckpointArgs()), pid, "checkpoint")


def restore(pid: int, gpu_pairs: list[tuple[str, str]] | None = None) -> None:
    d = driver()
    args = d.CUcheckpointRestoreArgs()
    if gpu_pairs:
        pairs = []
        for old, new in gpu_pairs:
            p = d.CUcheckpointGpuPair()
            p.oldUuid = _uuid(d, old)
            p.newUuid = _uuid(d, new)
            pairs.append(p)
        args.gpuPairs = pairs
        args.gpuPairsCount = len(pairs)
    _check(d.cuCheckpointProcessRestore(pid, args), pid, "restore")


def unlock(pid: int) -> None:
    d = driver()
    _check(d.cuCheckpointProcessUnlock(pid, d.CUcheckpointUnlockArgs()), pid, "unlock")


def _uuid(d: Any, text: str) -> Any:
    u = d.CUuuid()
    u.bytes = uuid_bytes(text)
    return u


def uuid_bytes(text: str) -> bytes:
    """'GPU-xxxxxxxx-xxxx-...' (as nvidia-smi and the driver's proc files print it) -> 16 bytes."""
    hexd = text.removeprefix("GPU-").replace("-", "")
    if not re.fullmatch(r"[0-9a-fA-F]{32}", hexd):
        raise ValueError(f"not a GPU UUID: {text!r}")
    return bytes.fromhex(hexd)


# --- processes ----------------------------------------------------------------------------------

def process_tree(root_pid: int) -> list[int]:
    """root_pid and all its descendants, parents first."""
    try:
        root = psutil.Process(root_pid)
        return [root_pid] + [c.pid for c in root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def maps_cuda(pid: int) -> bool:
    """Cheap pre-filter: the process has the CUDA driver library mapped."""
    try:
        with open(f"/proc/{pid}/maps") as f:
            return any("libcuda.so" in line for line in f)
    except OSError:
        return False


def cuda_pids(root_pid: int, want: Iterable[str], get_state: Callable[[int], str | None] | None = None,
              prefilter: Callable[[int], bool] = maps_cuda) -> list[int]:
    """The processes of root_pid's tree that the driver reports in one of the `want` states."""
    get_state = get_state or state
    wanted = set(want)
    return [pid for pid in process_tree(root_pid) if prefilter(pid) and get_state(pid) in wanted]


# --- GPUs of a container ------------------------------------------------------------------------

@dataclass(frozen=True)
class Gpu:
    minor: int
    uuid: str
    model: str


def node_gpus(proc_gpus: str = PROC_GPUS) -> dict[int, Gpu]:
    """minor number -> GPU, from the driver's proc files."""
    out = {}
    for info in glob.glob(os.path.join(proc_gpus, "*", "information")):
        fields = {}
        with open(info) as f:
            for line in f:
                k, _, v = line.partition(":")
                fields[k.strip()] = v.strip()
        try:
            minor = int(fields["Device Minor"])
        except (KeyError, ValueError):
            continue
        out[minor] = Gpu(minor, fields.get("GPU UUID", ""), fields.get("Model", ""))
    return out


def driver_version(path: str = PROC_VERSION) -> str | None:
    try:
        with open(path) as f:
            m = re.search(r"Kernel Module\s+(?:for\s+\S+\s+)?([0-9.]+)", f.read())
        return m.group(1) if m else None
    except OSError:
        return None


def spec_gpu_minors(spec: dict[str, Any]) -> list[int]:
    """Minor numbers of the /dev/nvidiaN devices a runtime spec gives the container."""
    minors = []
    for dev in (spec.get("linux") or {}).get("devices") or []:
        if re.fullmatch(r"/dev/nvidia\d+", dev.get("path", "")) and dev.get("major", NVIDIA_MAJOR) == NVIDIA_MAJOR:
            minors.append(int(dev.get("minor", dev["path"][len("/dev/nvidia"):])))
    return sorted(minors)


def container_gpus(spec: dict[str, Any], gpus: dict[int, Gpu] | None = None) -> list[Gpu]:
    gpus = node_gpus() if gpus is None else gpus
    return [gpus[m] for m in spec_gpu_minors(spec) if m in gpus]


def gpu_fingerprint(gpus: list[Gpu], driver: str | None = None,
                    cuda_version: int | None = None) -> fmt.GpuFingerprint:
    if not gpus:
        return fmt.GpuFingerprint()
    return fmt.GpuFingerprint(count=len(gpus), model=",".join(sorted({g.model for g in gpus})),
                              uuids=tuple(g.uuid for g in gpus), driver=driver or driver_version(),
                              cuda=cuda_version)


def cuda_driver_version() -> int | None:
    try:
        version: int | None = _check(driver().cuDriverGetVersion(), None, "version")
        return version
    except CudaError:
        return None


def gpu_pairs(snapshot_uuids: list[str], container_uuids: list[str]) -> list[tuple[str, str]]:
    """UUID pairs for restore: the i-th GPU of the snapshot becomes the i-th GPU of the container
    (both in device-minor order). Empty when they are the same GPUs."""
    if len(snapshot_uuids) != len(container_uuids):
        raise ValueError(f"snapshot has {len(snapshot_uuids)} GPUs, container {len(container_uuids)}")
    if list(snapshot_uuids) == list(container_uuids):
        return []
    return list(zip(snapshot_uuids, container_uuids))


# --- capture and restore of a container's process tree ------------------------------------------

def device_memory(pids: list[int]) -> int:
    """Device memory (bytes) the given host pids hold on any GPU, as the driver reports it
    (nvidia-smi's compute-apps query: NVML's per-process used memory)."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return 0
    try:
        out = subprocess.run([smi, "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    want, total = set(pids), 0
    for line in out.splitlines():
        pid, _, mib = line.partition(",")
        try:
            if int(pid) in want:
                total += int(mib.strip()) << 20
        except ValueError:
            continue
    return total


def _rss(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            total += psutil.Process(pid).memory_info().rss
        except psutil.Error:
            pass
    return total


@dataclass
class CaptureSession:
    """GPU side of one capture: the CUDA processes of a container, checkpointed around the dump."""
    root_pid: int
    pids: list[int]
    gpus: list[Gpu] = field(default_factory=list)
    gpu_bytes: int = 0
    _locked: list[int] = field(default_factory=list)
    _checkpointed: list[int] = field(default_factory=list)

    @classmethod
    def for_tree(cls, root_pid: int, spec: dict[str, Any] | None = None) -> CaptureSession:
        pids = cuda_pids(root_pid, ("RUNNING",))
        return cls(root_pid, pids, container_gpus(spec) if spec else [])

    @property
    def fingerprint(self) -> fmt.GpuFingerprint:
        return gpu_fingerprint(self.gpus, cuda_version=cuda_driver_version())

    def describe(self) -> fmt.GpuState:
        return fmt.GpuState(pids=len(self.pids), uuids=tuple(g.uuid for g in self.gpus))

    def checkpoint(self) -> None:
        before = _rss(self.pids)
        try:
            for pid in self.pids:
                lock(pid)
                self._locked.append(pid)
            for pid in self.pids:
                checkpoint(pid)
                self._checkpointed.append(pid)
        except CudaError:
            self.resume_source()
            raise
        self.gpu_bytes = max(0, _rss(self.pids) - before)

    def resume_source(self) -> None:
        """Give the source its GPUs back (after the dump, or after a failed checkpoint)."""
        errors = []
        for pid in self._checkpointed:
            try:
                restore(pid)
            except CudaError as exc:
                errors.append(str(exc))
        for pid in self._locked:
            try:
                unlock(pid)
            except CudaError as exc:
                errors.append(str(exc))
        self._locked, self._checkpointed = [], []
        if errors:
            raise CudaError(self.root_pid, "resume of the source", "; ".join(errors))


def restore_tree(root_pid: int, pairs: list[tuple[str, str]] | None, phases: PhaseTimer) -> list[int]:
    """After a CRIU restore: restore and unlock every checkpointed CUDA process of the tree."""
    pids = cuda_pids(root_pid, ("CHECKPOINTED",))
    for pid in pids:
        phases.run("cuda_restore", restore, pid, pairs)
    for pid in pids:
        phases.run("cuda_unlock", unlock, pid)
    return pids
