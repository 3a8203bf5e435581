#!/usr/bin/env python3
"""A worker closer to what users run, for thaw's GPU benchmark: transformers' own Qwen3 model
(random weights from a fixed seed, Qwen3-0.6B's widths, fewer layers by default so that its
compilation stays short), answering through two paths that real engines use:

  graphs    the eager model's decode step captured as CUDA graphs at several batch sizes
            (torch.cuda.graph, one shared memory pool, as vLLM does), replayed per token
  compiled  the same step through torch.compile (inductor: generated Triton kernels), batch 1

It speaks the example inference worker's protocol (/health, POST /generate {prompt, max_tokens,
batch}, /quiesce, /resume, a READY line), so `bench/gpu_e2e.py --worker
examples/transformers-worker/worker.py` captures and restores it unchanged. A request's tokens are
the graph path's row 0 followed by the compiled path's: the benchmark's identity check then covers
both, and a /generate with `batch` also returns every row.

Decoding is greedy over a fixed window (no KV cache): the step reads the whole window and takes
the hidden state at the current position, so a graph (static shapes) serves every step; the
causal mask makes what lies beyond the position irrelevant."""

import argparse
import json
import os
import queue
import signal
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

T_START = time.perf_counter()
SEED = 1234
torch = None


def log(msg):
    print(f"[worker {time.perf_counter() - T_START:8.3f}s] {msg}", flush=True)


class Unavailable(Exception):
    pass


class Engine:
    """Every device call runs on one thread (the engine loop), as in real engines: CUDA graphs
    and torch.compile's state are per thread."""

    def __init__(self, a):
        self.a, self.state, self.phase, self.info, self.tm = a, "loading", "start", {}, {}
        self.jobs = queue.Queue()

    def call(self, fn, *args):
        done, box = threading.Event(), {}

        def job():
            try:
                box["ok"] = fn(*args)
            except BaseException as e:  # noqa: BLE001 - handed back to the caller's thread
                box["err"] = e
            done.set()
        self.jobs.put(job)
        done.wait()
        if "err" in box:
            raise box["err"]
        return box["ok"]

    def loop(self):
        try:
            self.load()
        except BaseException as e:  # noqa: BLE001 - any load failure ends the worker, said in its log
            self.state = "failed"
            log(f"load failed: {e!r}")
            os._exit(1)
        while True:
            self.jobs.get()()

    def load(self):
        global torch
        a, tm = self.a, self.tm
        t = time.perf_counter()
        self.phase = "import"
        # Where inductor and Triton write their kernels: the container's /tmp (its rootfs is read-only).
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", "/tmp/inductor")
        os.environ.setdefault("TRITON_CACHE_DIR", "/tmp/triton")
        # Inductor compiles in a pool of worker processes by default; on the H100 those held device
        # mappings the CUDA checkpoint does not cover, and CRIU refused them at capture ("Can't
        # handle non-regular mapping", 2026-12-05). Compiling in this process keeps the tree
        # checkpointable (not yet re-run on a GPU).
        os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
        import torch as _torch
        torch = _torch
        from transformers import Qwen3Config, Qwen3ForCausalLM
        tm["import_s"] = time.perf_counter() - t
        self.dev = torch.device("cuda" if a.device == "cuda" or (a.device is None and torch.cuda.is_available()) else "cpu")
        self.cuda = self.dev.type == "cuda"
        t, self.phase = time.perf_counter(), "init"
        cfg = Qwen3Config(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=a.layers,
                          num_attention_heads=16, num_key_value_heads=8, head_dim=128, rope_theta=1e6,
                          rms_norm_eps=1e-6, max_position_embeddings=a.window, tie_word_embeddings=True)
        cfg._attn_implementation = "sdpa"
        torch.manual_seed(SEED)
        dtype = torch.bfloat16 if self.cuda else torch.float32
        with torch.device(self.dev):
            self.model = Qwen3ForCausalLM(cfg).to(dtype).eval()
        self.vocab = cfg.vocab_size
        tm["init_s"] = time.perf_counter() - t
        W = a.window
        self.sizes = sorted(set(a.graph_batch_sizes))
        self.ids = {b: torch.zeros(b, W, dtype=torch.long, device=self.dev) for b in self.sizes}
        self.pos = {b: torch.zeros(1, dtype=torch.long, device=self.dev) for b in self.sizes}
        t, self.phase = time.perf_counter(), "graphs"
        self.graphs = {}
        if self.cuda:
            with torch.inference_mode():
                pool, cur, side = torch.cuda.graph_pool_handle(), torch.cuda.current_stream(), torch.cuda.Stream()
                for b in reversed(self.sizes):
                    side.wait_stream(cur)
                    with torch.cuda.stream(side):
                        self.step(self.ids[b], self.pos[b])
                    cur.wait_stream(side)
                    g = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(g, pool=pool, capture_error_mode="thread_local"):
                        out = self.step(self.ids[b], self.pos[b])
                    self.graphs[b] = (g, out)
            torch.cuda.synchronize()
        tm["graph_s"] = time.perf_counter() - t
        t, self.phase = time.perf_counter(), "compile"
        compiled = self.cuda and not a.no_compile
        self.compiled = torch.compile(self.step, dynamic=False) if compiled else self.step
        with torch.inference_mode():
            self.compiled(self.ids[1], self.pos[1])   # compiles: inductor writes and loads its Triton kernels
        if self.cuda:
            torch.cuda.synchronize()
        tm["compile_s"] = time.perf_counter() - t
        tm["total_s"] = time.perf_counter() - T_START
        self.info = {"worker": "transformers", "layers": a.layers, "window": W, "device": str(self.dev),
                     "torch": torch.__version__, "graphs": sorted(self.graphs), "compiled": compiled,
                     "weight_bytes": sum(p.numel() * p.element_size() for p in self.model.parameters())}
        self.state = "ready"
        print("READY " + json.dumps({**{k: round(v, 4) for k, v in tm.items()}, **self.info}), flush=True)

    def step(self, ids, pos):
        """[B, W] token ids, [1] position -> the greedy next token of each row at that position, [B]."""
        h = self.model.model(input_ids=ids, use_cache=False).last_hidden_state
        return self.model.lm_head(h.index_select(1, pos)).argmax(-1).squeeze(1)

    def _decode(self, prompt, max_tokens, b, path):
        ids, pos = self.ids[b], self.pos[b]
        ids.zero_()
        ids[:, :len(prompt)] = torch.tensor(prompt, device=self.dev)
        t0, ttft = time.perf_counter(), None
        for i in range(max_tokens):
            pos.fill_(len(prompt) - 1 + i)
            if path == "graphs" and b in self.graphs:
                g, out = self.graphs[b]
                g.replay()
            else:
                out = (self.compiled if path == "compiled" else self.step)(ids, pos)
            ids[:, len(prompt) + i] = out
            if ttft is None:
                if self.cuda:
                    torch.cuda.synchronize()
                ttft = time.perf_counter() - t0
        rows = ids[:, len(prompt):len(prompt) + max_tokens].tolist()
        return rows, ttft

    def generate(self, prompt, max_tokens, batch=None):
        if self.state != "ready":
            raise Unavailable(self.state)
        ids = [b % self.vocab for b in prompt.encode("utf-8")] if isinstance(prompt, str) else prompt
        if not isinstance(ids, list) or not ids or not all(isinstance(i, int) and 0 <= i < self.vocab for i in ids):
            raise ValueError(f"prompt must be a string or a non-empty list of ids in [0, {self.vocab})")
        if not isinstance(max_tokens, int) or max_tokens < 1 or len(ids) + max_tokens > self.a.window:
            raise ValueError(f"max_tokens must be >= 1 with prompt + max_tokens <= {self.a.window}")
        b = 1 if batch is None else batch
        if b not in self.sizes:
            raise ValueError(f"batch must be one of {self.sizes}")

        def run():
            with torch.inference_mode():
                rows, ttft = self._decode(ids, max_tokens, b, "graphs")
                compiled, _ = self._decode(ids, max_tokens, 1, "compiled")
            return rows, ttft, compiled[0]
        rows, ttft, compiled = self.call(run)
        out = {"tokens": rows[0] + compiled, "graph_tokens": rows[0], "compiled_tokens": compiled,
               "ttft_s": round(ttft, 6), "prompt_tokens": len(ids)}
        if batch is not None:
            out.update(batch=b, batch_tokens=rows)
        return out

    def quiesce(self):
        """Nothing to give back (no KV pool): stop serving, let the device go idle."""
        if self.state == "ready":
            self.state = "quiesced"
            if self.cuda:
                self.call(torch.cuda.synchronize)
        return {"status": self.state}

    def resume(self):
        if self.state == "quiesced":
            self.state = "ready"
        return {"status": self.state}


class Handler(BaseHTTPRequestHandler):
    engine = None

    def log_message(self, fmt, *args):
        pass

    def _send(self, code, obj):
        body = (json.dumps(obj) + "\n").encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _call(self, fn, *a):
        try:
            self._send(200, fn(*a))
        except Unavailable as e:
            self._send(503, {"status": str(e), "error": "engine not ready"})
        except (ValueError, TypeError) as e:
            self._send(400, {"error": str(e)})
        except Exception as e:  # noqa: BLE001 - keep serving; report what broke
            log(f"error: {e!r}")
            self._send(500, {"error": repr(e)})

    def do_GET(self):
        e = self.engine
        if urllib.parse.urlsplit(self.path).path == "/health":
            self._send(200 if e.state == "ready" else 503, {"status": e.state, "phase": e.phase, "pid": os.getpid(), **e.info})
        else:
            self._send(404, {"error": "not found"})

    def do_POST(self):
        e, path = self.engine, urllib.parse.urlsplit(self.path).path
        try:
            n = int(self.headers.get("Content-Length") or 0)
            req = json.loads(self.rfile.read(n) or b"{}") if n else {}
            if not isinstance(req, dict):
                raise ValueError("body must be a JSON object")
        except ValueError as err:
            return self._send(400, {"error": f"bad request body: {err}"})
        if path == "/generate":
            self._call(e.generate, req.get("prompt", "hello"), req.get("max_tokens", 16), req.get("batch"))
        elif path == "/quiesce":
            self._call(e.quiesce)
        elif path == "/resume":
            self._call(e.resume)
        else:
            self._send(404, {"error": "not found"})


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--window", type=int, default=96, help="prompt + generated tokens at most")
    p.add_argument("--graph-batch-sizes", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4, 8])
    p.add_argument("--device", choices=["cuda", "cpu"])
    p.add_argument("--no-compile", action="store_true")
    a, _ = p.parse_known_args(argv)   # the example worker's other options (--config, --weights...) do not apply
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    engine = Engine(a)
    Handler.engine = engine
    httpd = ThreadingHTTPServer((a.host, a.port), Handler)
    threading.Thread(target=httpd.serve_forever, name="http", daemon=True).start()
    log(f"listening on {a.host}:{httpd.server_address[1]} pid {os.getpid()}")
    engine.loop()


if __name__ == "__main__":
    sys.exit(main())
