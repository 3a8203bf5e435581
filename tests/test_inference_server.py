"""CPU test of examples/inference-server/server.py with the tiny config (no root, no GPU).

torch and safetensors are test dependencies: if they cannot be imported the tests FAIL.
"""

from __future__ import annotations

import ctypes
import enum
import importlib.util
import json
import signal
import socket
import struct
import subprocess
import sys
import time
import types
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

# The example server's own behaviour (examples/inference-server), not thaw's: counted apart.
pytestmark = pytest.mark.example

SERVER = Path(__file__).resolve().parent.parent / "examples" / "inference-server" / "server.py"
READY_TIMEOUT_S = 60
PROMPT = [5, 9, 100, 3, 77, 42, 1, 0, 511, 256, 17, 18, 19]  # crosses no block boundary at first
MAX_TOKENS = 24  # 13 + 24 tokens span 3 KV blocks of 16


def _require_torch():
    try:
        import safetensors.torch  # noqa: F401
        import torch  # noqa: F401
    except ImportError as e:  # a test dependency, not an optional feature: fail, never skip
        pytest.fail(f"torch and safetensors are required to test the inference server "
                    f"(pip install torch==2.13.0 safetensors): {e}", pytrace=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http(port, method, path, body=None, timeout=30):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method,
                                 headers={"Content-Type": "application/json"} if data else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


class Server:
    def __init__(self, tmp_path: Path, weights: Path, name: str, ready_file: Path | None = None, extra=(),
                 config: str = "tiny"):
        self.port = _free_port()
        self.log_path = tmp_path / f"{name}.log"
        cmd = [sys.executable, str(SERVER), "--config", config, "--device", "cpu", "--host", "127.0.0.1",
               "--port", str(self.port), "--weights", str(weights), *extra]
        if ready_file:
            cmd += ["--ready-file", str(ready_file)]
        self._log = open(self.log_path, "w")
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT)

    def log(self) -> str:
        return self.log_path.read_text()

    def wait_ready(self) -> dict:
        deadline = self.t0 + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                code, body = _http(self.port, "GET", "/health", timeout=2)
                if code == 200:
                    self.ready_s = time.monotonic() - self.t0
                    return body
                assert code == 503 and body["status"] == "loading", (code, body)
            except (TimeoutError, urllib.error.URLError, ConnectionError):
                pass
            time.sleep(0.1)
        pytest.fail(f"server not ready within {READY_TIMEOUT_S}s:\n{self.log()}")

    def ready_line(self) -> dict:
        lines = [ln for ln in self.log().splitlines() if ln.startswith("READY ")]
        assert len(lines) == 1, self.log()
        return json.loads(lines[0][len("READY "):])

    def generate(self, prompt=PROMPT, max_tokens=MAX_TOKENS, **extra):
        return _http(self.port, "POST", "/generate", {"prompt": prompt, "max_tokens": max_tokens, **extra})

    def terminate(self, timeout=15) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


def test_torch_is_installed():
    _require_torch()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    _require_torch()
    tmp = tmp_path_factory.mktemp("inference-server")
    weights, ready_file = tmp / "w.safetensors", tmp / "ready"
    srv = Server(tmp, weights, "first", ready_file)
    try:
        srv.wait_ready()
        yield srv, tmp, weights, ready_file
    finally:
        srv.terminate()


def test_ready(env):
    srv, _, weights, ready_file = env
    code, body = _http(srv.port, "GET", "/health")
    assert code == 200 and body["status"] == "ready" and body["device"] == "cpu"
    ready = srv.ready_line()
    for k in ("import_s", "load_s", "kv_alloc_s", "warmup_s", "graph_s", "total_s", "kv_bytes", "device"):
        assert k in ready, ready
    assert ready["weights_created"] is True and ready["cuda_graph"] is False and ready["graphs"] == 0
    assert ready["kv_allocator"] == "torch" and ready["max_batch"] == 256  # vLLM's largest capture size
    assert ready["kv_bytes"] == 64 * 2 * 2 * 16 * 2 * 16 * 4  # 64 blocks, 2 layers, K+V, fp32
    assert weights.is_file() and ready_file.is_file()
    print(f"\ntiny/cpu: ready in {srv.ready_s:.2f}s (client view); READY {json.dumps(ready)}")


def test_generate_deterministic(env):
    srv = env[0]
    code, a = srv.generate()
    assert code == 200, a
    code, b = srv.generate()
    assert code == 200, b
    assert len(a["tokens"]) == MAX_TOKENS and a["tokens"] == b["tokens"]
    assert all(isinstance(t, int) and 0 <= t < 512 for t in a["tokens"])
    assert a["ttft_s"] <= a["total_s"]
    # Text prompts map to ids deterministically (bytes mod vocab); GET and POST agree.
    code, c = _http(srv.port, "GET", "/generate?prompt=hello&max_tokens=8")
    assert code == 200 and len(c["tokens"]) == 8
    assert srv.generate("hello", 8)[1]["tokens"] == c["tokens"] == srv.generate(list(b"hello"), 8)[1]["tokens"]
    print(f"\ntiny/cpu: {MAX_TOKENS} tokens ttft {a['ttft_s'] * 1e3:.1f} ms total {a['total_s'] * 1e3:.1f} ms")


def test_bad_requests(env):
    srv = env[0]
    assert srv.generate([1, 512], 4)[0] == 400  # id out of vocab
    assert srv.generate([1, 2], 0)[0] == 400
    assert srv.generate([1, 2], 10_000)[0] == 400  # beyond max_model_len
    assert _http(srv.port, "GET", "/nope")[0] == 404


def test_batch(env):
    """n copies of the prompt decode together (padded to the next batch size; eagerly on CPU)."""
    srv = env[0]
    single = srv.generate()[1]["tokens"]
    code, r = srv.generate(batch=3)
    assert code == 200, r
    assert r["batch"] == 3 and r["batch_size_run"] == 4 and r["cuda_graph"] is False  # 3 -> 4 of 1,2,4,8,...
    assert len(r["batch_tokens"]) == 3 and all(row == r["tokens"] for row in r["batch_tokens"])
    assert len(r["tokens"]) == MAX_TOKENS and r["blocks_used"] == 3 * 3
    # identical rows within a batch are the contract; equality with batch 1 is likely but not promised
    print(f"\ntiny/cpu: batch 3 first row == batch 1: {r['tokens'] == single}")
    assert srv.generate(batch=1)[1]["batch_tokens"] == [srv.generate(batch=1)[1]["tokens"]]
    code, g = _http(srv.port, "GET", "/generate?prompt=hello&max_tokens=4&batch=2")
    assert code == 200 and g["batch_size_run"] == 2 and g["batch_tokens"][0] == g["batch_tokens"][1]
    for bad in (0, 257, "2", True, 1.5):
        assert srv.generate(batch=bad)[0] == 400, bad
    assert srv.generate(batch=32)[0] == 400  # 32 x 3 blocks > the 63 usable blocks of the pool
    assert _http(srv.port, "GET", "/generate?batch=x")[0] == 400


def test_graph_batch_sizes(env):
    """--graph-batch-sizes sets the batch sizes (and so the largest batch); unsorted input is fine."""
    _, tmp, weights, _ = env
    srv = Server(tmp, weights, "sizes", extra=["--graph-batch-sizes", "5,2"])
    try:
        srv.wait_ready()
        ready = srv.ready_line()
        assert ready["max_batch"] == 5 and ready["graphs"] == 0 and ready["graph_batch_sizes"] == []
        assert srv.generate(batch=1)[1]["batch_size_run"] == 2
        code, r = srv.generate(batch=3)
        assert code == 200 and r["batch_size_run"] == 5 and len(set(map(tuple, r["batch_tokens"]))) == 1
        assert srv.generate(batch=6)[0] == 400
        assert srv.generate()[0] == 200  # no "batch": a single sequence, padded to 2 here
    finally:
        assert srv.terminate() == 0, srv.log()


def test_quiesce_resume(env):
    srv, _, _, ready_file = env
    code, before = srv.generate()
    assert code == 200
    code, q = _http(srv.port, "POST", "/quiesce")
    assert code == 200 and q["status"] == "quiesced" and q["kv_bytes_released"] > 0, q
    assert _http(srv.port, "GET", "/health")[0] == 503
    assert srv.generate()[0] == 503
    assert _http(srv.port, "GET", "/generate?prompt=hello&max_tokens=4")[0] == 503
    assert not ready_file.exists()
    assert _http(srv.port, "POST", "/quiesce")[1].get("noop") is True  # idempotent
    code, r = _http(srv.port, "POST", "/resume")
    assert code == 200 and r["status"] == "ready" and r["num_blocks"] == q["num_blocks"], r
    assert _http(srv.port, "GET", "/health")[0] == 200
    assert ready_file.is_file()
    code, after = srv.generate()
    assert code == 200 and after["tokens"] == before["tokens"]
    assert _http(srv.port, "POST", "/resume") == (200, {"status": "ready", "noop": True, "num_blocks": 64})


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("Rss:"))


def test_sleep_mode_vllm_endpoints(env):
    """--enable-sleep-mode: vLLM's /sleep, /wake_up, /collective_rpc reload_weights, /is_sleeping;
    the weights leave at level 2 (the process's memory falls by their size) and come back from the
    file with identical outputs, with our loader and with --loader fastsafetensors. Without the flag
    /sleep is refused."""
    srv, tmp, _, _ = env
    assert _http(srv.port, "POST", "/sleep?level=2")[0] == 400           # not in sleep mode
    s = Server(tmp, tmp / "small.safetensors", "sleep", extra=["--enable-sleep-mode"], config="small")
    try:
        s.wait_ready()
        ready = s.ready_line()
        assert ready["sleep_mode"] is True and ready["config"] == "small" and ready["weight_bytes"] > 40 << 20
        code, before = s.generate()
        assert code == 200
        rss = _rss(s.proc.pid)
        code, r = _http(s.port, "POST", "/sleep?level=2")
        assert code == 200 and r["weight_bytes_released"] == ready["weight_bytes"] and r["weights"] == "released", r
        assert rss - _rss(s.proc.pid) >= 0.9 * ready["weight_bytes"]
        assert _http(s.port, "GET", "/is_sleeping") == (200, {"is_sleeping": True})
        assert s.generate()[0] == 503
        assert _http(s.port, "POST", "/wake_up?tags=weights")[1]["weights"] == "empty"
        assert _http(s.port, "POST", "/wake_up?tags=kv_cache")[1]["status"] == "sleeping"   # weights not loaded
        assert s.generate()[0] == 503 and _http(s.port, "GET", "/is_sleeping")[1]["is_sleeping"] is True
        assert _http(s.port, "POST", "/collective_rpc", {"method": "other"})[0] == 400
        code, r = _http(s.port, "POST", "/collective_rpc", {"method": "reload_weights"})
        assert code == 200 and r["status"] == "ready" and r["bytes"] == ready["weight_bytes"], r
        assert _http(s.port, "GET", "/is_sleeping")[1]["is_sleeping"] is False
        assert s.generate()[1]["tokens"] == before["tokens"]
        # /quiesce and /resume stay: the KV cache only, or a full wake after a level-2 sleep.
        assert _http(s.port, "POST", "/quiesce")[1]["status"] == "quiesced"
        assert _http(s.port, "POST", "/resume")[1]["status"] == "ready"
        assert _http(s.port, "POST", "/sleep?level=2")[0] == 200
        assert _http(s.port, "POST", "/resume")[1]["status"] == "ready"
        assert s.generate()[1]["tokens"] == before["tokens"]
        assert _http(s.port, "POST", "/sleep?level=3")[0] == 400
    finally:
        assert s.terminate() == 0, s.log()
    # The same worker with fastsafetensors as its loader (start and reload): the same outputs.
    f = Server(tmp, tmp / "small.safetensors", "sleep-fst", config="small",
               extra=["--enable-sleep-mode", "--loader", "fastsafetensors"])
    try:
        f.wait_ready()
        assert f.generate()[1]["tokens"] == before["tokens"]
        assert _http(f.port, "POST", "/sleep?level=2")[1]["weights"] == "released"
        assert _http(f.port, "POST", "/wake_up?tags=weights")[1]["weights"] == "empty"
        code, r = _http(f.port, "POST", "/collective_rpc", {"method": "reload_weights"})
        assert code == 200 and r["loader"] == "fastsafetensors" and r["bytes"] == ready["weight_bytes"], r
        assert _http(f.port, "POST", "/wake_up?tags=kv_cache")[1]["status"] == "ready"
        assert f.generate()[1]["tokens"] == before["tokens"]
    finally:
        assert f.terminate() == 0, f.log()


def test_restart_reuses_weights_and_sigterm(env):
    srv, tmp, weights, _ = env
    expected = srv.generate()[1]["tokens"]
    st = weights.stat()
    second = Server(tmp, weights, "second")
    try:
        second.wait_ready()
        assert second.ready_line()["weights_created"] is False
        after = weights.stat()
        assert (after.st_mtime_ns, after.st_size, after.st_ino) == (st.st_mtime_ns, st.st_size, st.st_ino)
        code, body = second.generate()
        assert code == 200 and body["tokens"] == expected  # same weights file, same tokens, new process
    finally:
        rc = second.terminate()
    assert rc == 0, second.log()
    assert srv.terminate() == 0, srv.log()
    assert "Traceback" not in srv.log() + second.log()


# ---- pieces of server.py, imported (it imports torch only when the engine loads) ----------------
@pytest.fixture(scope="module")
def server_mod():
    _require_torch()
    spec = importlib.util.spec_from_file_location("thaw_example_server", SERVER)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_parse_graph_batch_sizes(server_mod):
    sizes = server_mod.parse_args([]).graph_batch_sizes
    assert len(sizes) == 35 and sizes[:5] == [1, 2, 4, 8, 16] and sizes[-1] == 256
    assert server_mod.parse_args(["--graph-batch-sizes", "1"]).graph_batch_sizes == [1]
    assert server_mod.parse_args(["--graph-batch-sizes", "8,1 4,4"]).graph_batch_sizes == [1, 4, 8]
    for bad in ("0", "x", "", "2,-4"):
        with pytest.raises(SystemExit):
            server_mod.parse_args(["--graph-batch-sizes", bad])


def test_dlpack_tensor_is_zero_copy(server_mod):
    import torch
    buf = ctypes.create_string_buffer(4096)
    t = server_mod.dlpack_tensor(ctypes.addressof(buf), 4096, (server_mod.DL_CPU, 0))
    assert t.dtype == torch.uint8 and t.numel() == 4096 and t.data_ptr() == ctypes.addressof(buf)
    f = t.view(torch.float32)
    f[:2] = torch.tensor([1.5, -2.0])
    assert buf.raw[:8] == struct.pack("=ff", 1.5, -2.0)  # written through torch, read from the buffer
    t.zero_()
    assert buf.raw == bytes(4096)


def _fake_driver(base: int, calls: list, fail: set):
    """The few cuda.bindings.driver names VmmRegion uses: each call returns (CUresult, *values)."""
    class CUresult(enum.IntEnum):
        CUDA_SUCCESS = 0
        CUDA_ERROR_OUT_OF_MEMORY = 2

    def fn(name, *values):
        def call(*args):
            calls.append((name, args))
            return (CUresult.CUDA_ERROR_OUT_OF_MEMORY, *[None] * len(values)) if name in fail \
                else (CUresult.CUDA_SUCCESS, *values)
        return call

    ns = types.SimpleNamespace
    d: Any = types.ModuleType("cuda.bindings.driver")  # a stand-in, built attribute by attribute
    d.CUresult, d.CUdeviceptr = CUresult, int
    d.CUmemAllocationProp = d.CUmemAccessDesc = lambda: ns(location=ns())
    d.CUmemAllocationType = ns(CU_MEM_ALLOCATION_TYPE_PINNED="PINNED")
    d.CUmemLocationType = ns(CU_MEM_LOCATION_TYPE_DEVICE="DEVICE")
    d.CUmemAllocationGranularity_flags = ns(CU_MEM_ALLOC_GRANULARITY_MINIMUM="MIN")
    d.CUmemAccess_flags = ns(CU_MEM_ACCESS_FLAGS_PROT_READWRITE="RW")
    d.cuGetErrorName = lambda e: (CUresult.CUDA_SUCCESS, e.name.encode())
    d.cuGetErrorString = lambda e: (CUresult.CUDA_SUCCESS, b"out of memory")
    answers: list[tuple[str, *tuple[int, ...]]] = [("cuInit",), ("cuDeviceGet", 0), ("cuDevicePrimaryCtxRetain", 0xC0), ("cuCtxGetCurrent", 0),
                          ("cuCtxSetCurrent",), ("cuMemGetAllocationGranularity", 4096), ("cuMemAddressReserve", base),
                          ("cuMemCreate", 77), ("cuMemMap",), ("cuMemSetAccess",), ("cuCtxSynchronize",),
                          ("cuMemUnmap",), ("cuMemRelease",), ("cuMemAddressFree",)]
    for name, *values in answers:
        setattr(d, name, fn(name, *values))
    return d


def test_vmm_region_with_a_fake_driver(server_mod, monkeypatch):
    """The VMM bookkeeping (no GPU here; `server.py --selftest-vmm` checks the real driver)."""
    buf = ctypes.create_string_buffer(3 * 4096)
    calls: list[tuple[Any, ...]] = []
    fail: set[str] = set()
    base = ctypes.addressof(buf)
    drv = _fake_driver(base, calls, fail)
    bindings: Any = types.ModuleType("cuda.bindings")   # given the attributes a package would have
    bindings.driver = drv
    cuda: Any = types.ModuleType("cuda")
    cuda.bindings = bindings
    for name, mod in (("cuda", cuda), ("cuda.bindings", bindings), ("cuda.bindings.driver", drv)):
        monkeypatch.setitem(sys.modules, name, mod)
    names = lambda: [c[0] for c in calls]  # noqa: E731

    r = server_mod.VmmRegion(10_000, 0, dl_device=(server_mod.DL_CPU, 0))
    assert names() == ["cuInit", "cuDeviceGet", "cuDevicePrimaryCtxRetain", "cuCtxGetCurrent", "cuCtxSetCurrent",
                       "cuMemGetAllocationGranularity", "cuMemAddressReserve", "cuCtxGetCurrent", "cuCtxSetCurrent",
                       "cuMemCreate", "cuMemMap", "cuMemSetAccess"]
    args = dict(calls)
    assert args["cuMemAddressReserve"] == (3 * 4096, 4096, 0, 0)
    prop = args["cuMemCreate"][1]
    assert args["cuMemCreate"] == (3 * 4096, prop, 0) and (prop.type, prop.location.type, prop.location.id) == (
        "PINNED", "DEVICE", 0)
    assert args["cuMemMap"] == (base, 3 * 4096, 0, 77, 0)
    (desc,), count = args["cuMemSetAccess"][2:]
    assert count == 1 and (desc.location.type, desc.location.id, desc.flags) == ("DEVICE", 0, "RW")
    assert r.size == 3 * 4096 and r.ptr == base and r.mapped
    assert r.tensor.data_ptr() == base and r.tensor.numel() == r.size
    r.tensor.fill_(7)
    assert buf.raw == b"\x07" * r.size

    calls.clear()
    assert r.release() == r.size and not r.mapped and r.release() == 0  # idempotent
    assert names()[2:] == ["cuCtxSynchronize", "cuMemUnmap", "cuMemRelease"]
    assert dict(calls)["cuMemUnmap"] == (base, r.size) and dict(calls)["cuMemRelease"] == (77,)
    fail.add("cuMemMap")
    with pytest.raises(RuntimeError, match="cuMemMap failed: CUDA_ERROR_OUT_OF_MEMORY"):
        r.map()
    assert not r.mapped and names()[-1] == "cuMemRelease"  # the new handle is not leaked
    fail.clear()
    r.map()
    assert r.mapped and r.tensor.data_ptr() == base  # same address, same tensor
    calls.clear()
    r.free()
    assert names()[-3:] == ["cuMemUnmap", "cuMemRelease", "cuMemAddressFree"]
    fail.add("cuMemAddressReserve")
    with pytest.raises(RuntimeError, match="cuMemAddressReserve failed"):
        server_mod.VmmRegion(10_000, 0, dl_device=(server_mod.DL_CPU, 0))


def test_qwen3_8b_shapes(server_mod):
    """The 8B class is Qwen3-8B's shape: 8,190,735,360 parameters with its own output head."""
    shapes = server_mod.weight_shapes(server_mod.CONFIGS["qwen3-8b"])
    assert sum(__import__("math").prod(s) for s in shapes.values()) == 8_190_735_360
    assert shapes["lm_head.weight"] == (151936, 4096)
    assert "lm_head.weight" not in server_mod.weight_shapes(server_mod.CONFIGS["qwen3-0.6b"])   # tied


def test_untied_head_is_the_one_used(server_mod, tmp_path, monkeypatch):
    """A config with its own head draws lm_head.weight and decodes through it, not the embedding."""
    monkeypatch.setitem(server_mod.CONFIGS, "tiny-untied", {**server_mod.CONFIGS["tiny"], "tied": False})
    weights = tmp_path / "w.safetensors"
    a = server_mod.parse_args(["--config", "tiny-untied", "--device", "cpu", "--weights", str(weights),
                               "--graph-batch-sizes", "1"])
    engine = server_mod.Engine(a)
    engine.load()
    assert engine.lm_head is not engine.emb
    first = engine.generate(PROMPT, 8)["tokens"]
    assert engine.generate(PROMPT, 8)["tokens"] == first
    engine.lm_head.zero_()   # every token now scores 0: greedy picks token 0, unless the embedding decides
    assert engine.generate(PROMPT, 8)["tokens"] == [0] * 8 != first


def test_fastsafetensors_reload_matches_own_loader(server_mod, tmp_path):
    """--loader fastsafetensors (IBM's loader, on the CPU without GDS) fills the weight arena with the
    same bytes as our own parallel-pread loader: the file's data section, byte for byte."""
    import torch
    from safetensors.torch import save_file
    try:
        import fastsafetensors  # noqa: F401
    except ImportError as e:  # installed by install/node.sh --dev (pyproject's test extra): fail, never skip
        pytest.fail(f"fastsafetensors is required to test --loader fastsafetensors: {e}", pytrace=False)
    gen = torch.Generator().manual_seed(7)
    tensors = {f"layer{i}.w": torch.randn(shape, generator=gen).to(torch.bfloat16)
               for i, shape in enumerate([(3, 5), (64, 129), (1,), (257, 33), (2, 2, 2)])}
    path = tmp_path / "w.safetensors"
    save_file(tensors, str(path))
    server_mod.torch = torch  # the module imports torch in Engine.load(); the arena reads the global
    arena = server_mod.WeightArena(str(path), torch.device("cpu"), torch.bfloat16, vmm=False)
    raw = path.read_bytes()[arena.data_start:arena.data_start + arena.nbytes]
    out = arena.load(streams=2, chunk=1000, loader="own")    # several ranges
    own = bytes(arena.buf.numpy())
    assert own == raw and out["loader"] == "own"
    arena.buf.fill_(0xA5)
    assert bytes(arena.buf.numpy()) != raw
    out = arena.load(streams=2, loader="fastsafetensors")
    assert out["loader"] == "fastsafetensors" and out["bytes"] == len(raw)
    assert bytes(arena.buf.numpy()) == own
    views = arena.views()
    assert all(torch.equal(views[k], v) for k, v in tensors.items())
