"""CPU test of examples/inference-server/server.py with the tiny config (no root, no GPU).

torch and safetensors are test dependencies: if they cannot be imported the tests FAIL.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

SERVER = Path(__file__).resolve().parent.parent / "examples" / "inference-server" / "server.py"
READY_TIMEOUT_S = 60
PROMPT = [5, 9, 100, 3, 77, 42, 1, 0, 511, 256, 17, 18, 19]  # crosses no block boundary at first
MAX_TOKENS = 24  # 13 + 24 tokens span 3 KV blocks of 16


def _require_torch():
    try:
        import torch  # noqa: F401
        import safetensors.torch  # noqa: F401
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
    def __init__(self, tmp_path: Path, weights: Path, name: str, ready_file: Path | None = None):
        self.port = _free_port()
        self.log_path = tmp_path / f"{name}.log"
        cmd = [sys.executable, str(SERVER), "--config", "tiny", "--device", "cpu", "--host", "127.0.0.1",
               "--port", str(self.port), "--weights", str(weights)]
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
            except (urllib.error.URLError, ConnectionError, socket.timeout):
                pass
            time.sleep(0.1)
        pytest.fail(f"server not ready within {READY_TIMEOUT_S}s:\n{self.log()}")

    def ready_line(self) -> dict:
        lines = [ln for ln in self.log().splitlines() if ln.startswith("READY ")]
        assert len(lines) == 1, self.log()
        return json.loads(lines[0][len("READY "):])

    def generate(self, prompt=PROMPT, max_tokens=MAX_TOKENS):
        return _http(self.port, "POST", "/generate", {"prompt": prompt, "max_tokens": max_tokens})

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
    assert ready["weights_created"] is True and ready["cuda_graph"] is False
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
