"""On a GPU machine: thaw's CUDA module checkpoints a live CUDA process's GPU memory away and
restores it intact. Skips with a reason elsewhere (CI has no GPU; bench/gpu_e2e.py is the full
container run on the GPU machine), even under THAW_TEST_STRICT=1 unless THAW_TEST_GPU=1."""

import os
import subprocess
import sys

import pytest

from conftest import gpu_skip
from thaw.shim.drivers import cuda
from thaw.shim.timing import PhaseTimer

pytestmark = pytest.mark.gpu

WORKER = r"""
import sys, time, torch
x = torch.arange(64 << 20, device="cuda", dtype=torch.int32).remainder_(977)
want = int(x.sum().item())
print("ready", want, flush=True)
for line in sys.stdin:
    print("sum", int(x.sum().item()), want, flush=True)
"""


def _skip_reason():
    if not os.path.exists("/dev/nvidiactl"):
        return "no NVIDIA GPU on this machine (/dev/nvidiactl missing)"
    if not cuda.available():
        return "cuda-python (cuda-bindings) not installed"
    try:
        import torch  # noqa: F401
    except ImportError:
        return "torch not installed"
    return None


@pytest.fixture
def worker(request):
    reason = _skip_reason()
    if reason:
        gpu_skip(request.node, reason)
    p = subprocess.Popen([sys.executable, "-c", WORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None
    assert p.stdout.readline().startswith("ready")
    yield p
    p.kill()


def test_checkpoint_and_restore_keep_gpu_data(worker):
    pid = worker.pid
    assert cuda.state(pid) == "RUNNING"
    assert cuda.cuda_pids(pid, ("RUNNING",)) == [pid]
    session = cuda.CaptureSession(pid, [pid])
    session.checkpoint()
    assert cuda.state(pid) == "CHECKPOINTED"
    assert not any(os.readlink(f"/proc/{pid}/fd/{fd}").startswith("/dev/nvidia")
                   for fd in os.listdir(f"/proc/{pid}/fd"))
    phases = PhaseTimer()
    assert cuda.restore_tree(pid, None, phases) == [pid]
    assert cuda.state(pid) == "RUNNING" and phases.times["cuda_restore"] > 0
    worker.stdin.write("go\n")
    worker.stdin.flush()
    _, got, want = worker.stdout.readline().split()
    assert got == want


def test_errors_name_pid_and_step(worker):
    with pytest.raises(cuda.CudaError) as exc:
        cuda.restore(worker.pid)            # not checkpointed: the driver refuses
    assert str(worker.pid) in str(exc.value) and "restore" in str(exc.value)
