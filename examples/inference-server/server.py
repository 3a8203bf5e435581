#!/usr/bin/env python3
"""Example inference worker for thaw: a Qwen3-0.6B-shaped decoder with random weights.

It behaves like a small LLM engine (vLLM-style start-up phases) so that thaw's restore can be
measured against a cold start: import torch -> load safetensors weights onto the device ->
preallocate a paged KV-cache pool -> warm up -> capture the decode step as a CUDA graph -> READY.
Greedy decoding only, batch size 1, no randomness at request time: a request gives the same token
ids every time, across /quiesce + /resume, and across a CRIU + CUDA checkpoint/restore.

The HTTP server starts before torch is imported, so /health answers 503 while the engine loads.
"""

import argparse
import gc
import json
import math
import os
import signal
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

T_START = time.perf_counter()
BLOCK_SIZE = 16
SEED = 1234
CONFIGS = {
    "qwen3-0.6b": dict(hidden=1024, layers=28, heads=16, kv_heads=8, head_dim=128, inter=3072,
                       vocab=151936, rope_theta=1e6, eps=1e-6, dtype="bfloat16", max_len=2048),
    "tiny": dict(hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, inter=128,
                 vocab=512, rope_theta=1e6, eps=1e-6, dtype="float32", max_len=256),
}
torch = F = None  # imported in Engine.load(), after the HTTP server is up


def log(msg):
    print(f"[server {time.perf_counter() - T_START:8.3f}s] {msg}", flush=True)


class Unavailable(Exception):
    pass


def weight_shapes(c):
    h, hd = c["hidden"], c["head_dim"]
    shapes = {"model.embed_tokens.weight": (c["vocab"], h), "model.norm.weight": (h,)}
    for i in range(c["layers"]):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (c["heads"] * hd, h),
            p + "self_attn.k_proj.weight": (c["kv_heads"] * hd, h),
            p + "self_attn.v_proj.weight": (c["kv_heads"] * hd, h),
            p + "self_attn.o_proj.weight": (h, c["heads"] * hd),
            p + "self_attn.q_norm.weight": (hd,), p + "self_attn.k_norm.weight": (hd,),
            p + "mlp.gate_proj.weight": (c["inter"], h), p + "mlp.up_proj.weight": (c["inter"], h),
            p + "mlp.down_proj.weight": (h, c["inter"]),
        })
    return shapes


def init_weights(c, path):
    """Deterministic random weights (fixed seed, CPU generator), written once, atomically."""
    import torch
    from safetensors.torch import save_file
    gen = torch.Generator().manual_seed(SEED)
    dtype = getattr(torch, c["dtype"])
    tensors = {}
    for name, shape in weight_shapes(c).items():  # dict order is fixed -> same bytes every time
        if name.endswith("norm.weight"):
            tensors[name] = torch.ones(shape, dtype=dtype)
        else:
            std = 0.02 if "embed" in name else shape[1] ** -0.5  # O(1) block outputs: varied tokens
            tensors[name] = (torch.randn(shape, generator=gen) * std).to(dtype)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    save_file(tensors, tmp, metadata={"seed": str(SEED), "format": "pt"})
    os.chmod(tmp, 0o644)  # readable by whichever user the container runs as
    os.replace(tmp, path)


class Engine:
    def __init__(self, args):
        self.args, self.c = args, CONFIGS[args.config]
        self.lock = threading.Lock()  # one sequence at a time on the device
        self.state, self.phase = "loading", "start"
        self.timings, self.info = {}, {}
        self.pool = self.kv = self.graph = self.g_out = None

    # ---- start-up -----------------------------------------------------------------------
    def load(self):
        global torch, F
        a, c, tm = self.args, self.c, self.timings
        t = time.perf_counter()
        self.phase = "import"
        import torch as _torch
        import torch.nn.functional as _F
        from safetensors.torch import load_file
        torch, F = _torch, _F
        tm["import_s"] = time.perf_counter() - t
        dev = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.dev = torch.device("cuda:0" if dev == "cuda" else dev)
        self.cuda = self.dev.type == "cuda"
        self.dtype = getattr(torch, a.dtype or c["dtype"])
        torch.manual_seed(SEED)  # nothing should draw random numbers, but be sure anyway

        created = False
        if not os.path.exists(a.weights):
            self.phase, t = "init_weights", time.perf_counter()
            log(f"creating random weights {a.weights}")
            init_weights(c, a.weights)
            created, tm["init_weights_s"] = True, time.perf_counter() - t
        self.phase, t = "load", time.perf_counter()
        w = load_file(a.weights, device=str(self.dev))
        w = {k: v.to(self.dtype) for k, v in w.items()}
        self.emb, self.norm = w["model.embed_tokens.weight"], w["model.norm.weight"]
        names = ("input_layernorm", "post_attention_layernorm", "self_attn.q_proj", "self_attn.k_proj",
                 "self_attn.v_proj", "self_attn.o_proj", "self_attn.q_norm", "self_attn.k_norm",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
        self.layers = [[w[f"model.layers.{i}.{n}.weight"] for n in names] for i in range(c["layers"])]
        self.weight_bytes = sum(v.numel() * v.element_size() for v in w.values())
        inv = 1.0 / (c["rope_theta"] ** (torch.arange(0, c["head_dim"], 2, dtype=torch.float64) / c["head_dim"]))
        ang = torch.outer(torch.arange(a.max_model_len or c["max_len"], dtype=torch.float64), inv)
        self.cos, self.sin = ang.cos().float().to(self.dev), ang.sin().float().to(self.dev)
        self._sync()
        tm["load_s"] = time.perf_counter() - t

        self.phase, t = "kv_alloc", time.perf_counter()
        self.block_bytes = (c["layers"] * 2 * BLOCK_SIZE * c["kv_heads"] * c["head_dim"]
                            * torch.empty(0, dtype=self.dtype).element_size())
        if a.kv_blocks:
            self.num_blocks = a.kv_blocks
        elif self.cuda:
            free, _ = torch.cuda.mem_get_info(self.dev)
            self.num_blocks = int(free * a.kv_fraction) // self.block_bytes
        else:
            self.num_blocks = 64
        self.max_len = min(self.cos.shape[0], self.num_blocks * BLOCK_SIZE) // BLOCK_SIZE * BLOCK_SIZE
        if self.max_len < BLOCK_SIZE:
            raise RuntimeError(f"KV pool too small: {self.num_blocks} blocks")
        self._alloc_kv()
        tm["kv_alloc_s"] = time.perf_counter() - t

        self.phase, t = "warmup", time.perf_counter()
        with torch.inference_mode():
            self._run([(7 * i + 3) % c["vocab"] for i in range(min(32, self.max_len // 2))], 4, eager=True)
        tm["warmup_s"] = time.perf_counter() - t
        self.phase, t = "graph", time.perf_counter()
        self._capture()
        tm["graph_s"] = time.perf_counter() - t
        tm["total_s"] = time.perf_counter() - T_START
        self.info = dict(device=str(self.dev), dtype=str(self.dtype).replace("torch.", ""),
                         config=a.config, torch=torch.__version__, weights=a.weights,
                         weights_created=created, weight_bytes=self.weight_bytes,
                         num_blocks=self.num_blocks, block_size=BLOCK_SIZE, max_model_len=self.max_len,
                         kv_bytes=self.kv_bytes, cuda_graph=self.graph is not None)
        self._ready()
        print("READY " + json.dumps({**{k: round(v, 4) for k, v in tm.items()}, **self.info}), flush=True)

    def _sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.dev)

    def _alloc_kv(self):
        c = self.c
        # One big pool, as vLLM does; zero-filled so masked-out slots never hold NaN (0 * NaN = NaN).
        with torch.inference_mode():
            self.pool = torch.zeros((self.num_blocks, c["layers"], 2, BLOCK_SIZE, c["kv_heads"], c["head_dim"]),
                                    dtype=self.dtype, device=self.dev)
            self.kv = [(self.pool[:, i, 0], self.pool[:, i, 1]) for i in range(c["layers"])]
            self.kv_bytes = self.pool.numel() * self.pool.element_size()
            # static buffers for the decode step (the CUDA graph's inputs)
            self.tok_buf = torch.zeros(1, dtype=torch.long, device=self.dev)
            self.pos_buf = torch.zeros(1, dtype=torch.long, device=self.dev)
            self.ar = torch.arange(self.max_len, device=self.dev)
        self._sync()

    def _capture(self):
        if not self.cuda or self.args.no_cuda_graph:
            return
        with torch.inference_mode():
            self.tok_buf.fill_(0)
            self.pos_buf.fill_(self.max_len - 1)  # scribbles on the last slot only; harmless
            s = torch.cuda.Stream(self.dev)
            s.wait_stream(torch.cuda.current_stream(self.dev))
            with torch.cuda.stream(s):
                for _ in range(3):
                    self._step()
            torch.cuda.current_stream(self.dev).wait_stream(s)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, capture_error_mode="thread_local"):
                self.g_out = self._step()
            g.replay()
            self._sync()
            self.graph = g

    def _ready(self):
        self.state = "ready"
        if self.args.ready_file:
            tmp = self.args.ready_file + ".tmp"
            with open(tmp, "w") as f:
                f.write(json.dumps({"pid": os.getpid(), **self.info}) + "\n")
            os.replace(tmp, self.args.ready_file)

    # ---- model ----------------------------------------------------------------------------
    def _rms(self, x, w):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.c["eps"])).to(x.dtype) * w

    def _rope(self, x, cos, sin):  # x [T, n, hd]; cos/sin [T, hd/2]; Qwen/Llama "rotate half"
        h = x.shape[-1] // 2
        x1, x2 = x[..., :h].float(), x[..., h:].float()
        cos, sin = cos[:, None, :], sin[:, None, :]
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), -1).to(x.dtype)

    def _forward(self, ids, pos, decode):
        """ids/pos: [T] long tensors on the device. Prefill (decode=False) starts at position 0;
        decode (T=1) attends over the sequence's cache blocks 0..max_len/16-1, masked by pos."""
        c = self.c
        T, H, KV, hd = ids.shape[0], c["heads"], c["kv_heads"], c["head_dim"]
        g = H // KV
        x = self.emb[ids]
        cos, sin = self.cos[pos], self.sin[pos]
        blk, slot = pos // BLOCK_SIZE, pos % BLOCK_SIZE  # block table is the identity: 0..k
        nb, scale = self.max_len // BLOCK_SIZE, 1.0 / math.sqrt(hd)
        if decode:
            mask = self.ar <= pos
        for (ln1, ln2, wq, wk, wv, wo, qn, kn, wg, wu, wd), (kc, vc) in zip(self.layers, self.kv):
            h = self._rms(x, ln1)
            q = self._rope(self._rms(F.linear(h, wq).view(T, H, hd), qn), cos, sin)
            k = self._rope(self._rms(F.linear(h, wk).view(T, KV, hd), kn), cos, sin)
            v = F.linear(h, wv).view(T, KV, hd)
            kc[blk, slot] = k
            vc[blk, slot] = v
            if decode:
                K = kc[:nb].reshape(self.max_len, KV, hd).permute(1, 2, 0)  # [KV, hd, L]
                V = vc[:nb].reshape(self.max_len, KV, hd).transpose(0, 1)  # [KV, L, hd]
                s = torch.matmul(q.view(KV, g, hd), K).float() * scale  # [KV, g, L]
                p = torch.softmax(s.masked_fill(~mask, float("-inf")), -1).to(x.dtype)
                o = torch.matmul(p, V).reshape(1, H * hd)
            else:
                kk = k.repeat_interleave(g, dim=1).transpose(0, 1)
                vv = v.repeat_interleave(g, dim=1).transpose(0, 1)
                o = F.scaled_dot_product_attention(q.transpose(0, 1), kk, vv, is_causal=True)
                o = o.transpose(0, 1).reshape(T, H * hd)
            x = x + F.linear(o, wo)
            h = self._rms(x, ln2)
            x = x + F.linear(F.silu(F.linear(h, wg)) * F.linear(h, wu), wd)
        x = self._rms(x[-1:], self.norm)
        return F.linear(x, self.emb).argmax(-1)  # tied embeddings, greedy

    def _step(self):
        return self._forward(self.tok_buf, self.pos_buf, decode=True)

    def _run(self, ids, max_tokens, eager=False):
        t0 = time.perf_counter()
        ids_t = torch.tensor(ids, dtype=torch.long, device=self.dev)
        tok = int(self._forward(ids_t, torch.arange(len(ids), device=self.dev), decode=False).item())
        ttft, out = time.perf_counter() - t0, [tok]
        for i in range(max_tokens - 1):
            self.tok_buf.fill_(tok)
            self.pos_buf.fill_(len(ids) + i)
            if self.graph is not None and not eager:
                self.graph.replay()
                nxt = self.g_out
            else:
                nxt = self._step()
            tok = int(nxt.item())
            out.append(tok)
        return out, ttft, time.perf_counter() - t0

    # ---- requests ------------------------------------------------------------------------
    def generate(self, prompt, max_tokens):
        if self.state != "ready":  # also before the engine has loaded (no max_len, no torch yet)
            raise Unavailable(self.state)
        if isinstance(prompt, str):
            ids = [b % self.c["vocab"] for b in prompt.encode("utf-8")]
        elif isinstance(prompt, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in prompt):
            ids = prompt
        else:
            raise ValueError("prompt must be a string or a list of token ids")
        if not ids or any(i < 0 or i >= self.c["vocab"] for i in ids):
            raise ValueError(f"prompt must be non-empty with ids in [0, {self.c['vocab']})")
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError("max_tokens must be a positive integer")
        if len(ids) + max_tokens > self.max_len:
            raise ValueError(f"prompt + max_tokens exceeds max_model_len {self.max_len}")
        with self.lock:
            if self.state != "ready":
                raise Unavailable(self.state)
            with torch.inference_mode():
                out, ttft, total = self._run(ids, max_tokens)
        return {"tokens": out, "prompt_tokens": len(ids), "ttft_s": round(ttft, 6), "total_s": round(total, 6),
                "blocks_used": math.ceil((len(ids) + max_tokens) / BLOCK_SIZE)}

    def _mem(self):
        if not self.cuda:
            return {}
        free, total = torch.cuda.mem_get_info(self.dev)
        return {"allocated": torch.cuda.memory_allocated(self.dev), "reserved": torch.cuda.memory_reserved(self.dev),
                "gpu_free": free, "gpu_total": total}

    def quiesce(self):
        with self.lock:
            if self.state == "quiesced":  # idempotent, so that callers may retry
                return {"status": "quiesced", "noop": True, "after": self._mem()}
            if self.state != "ready":
                raise Unavailable(self.state)
            t, before = time.perf_counter(), self._mem()
            self.state = "quiesced"
            if self.args.ready_file and os.path.exists(self.args.ready_file):
                os.unlink(self.args.ready_file)
            released = self.kv_bytes
            self._sync()
            self.graph = self.g_out = self.pool = self.kv = self.tok_buf = self.pos_buf = self.ar = None
            gc.collect()
            if self.cuda:
                torch.cuda.empty_cache()
            return {"status": "quiesced", "kv_bytes_released": released, "num_blocks": self.num_blocks,
                    "before": before, "after": self._mem(), "quiesce_s": round(time.perf_counter() - t, 6)}

    def resume(self):
        with self.lock:
            if self.state == "ready":
                return {"status": "ready", "noop": True, "num_blocks": self.num_blocks}
            if self.state != "quiesced":
                raise Unavailable(self.state)
            t = time.perf_counter()
            self._alloc_kv()
            t_kv = time.perf_counter()
            self._capture()
            t_g = time.perf_counter()
            self._ready()
            return {"status": "ready", "num_blocks": self.num_blocks, "kv_bytes": self.kv_bytes,
                    "kv_alloc_s": round(t_kv - t, 6), "graph_s": round(t_g - t_kv, 6),
                    "total_s": round(t_g - t, 6), "mem": self._mem()}


class Handler(BaseHTTPRequestHandler):
    engine = None
    server_version = "thaw-example/0.1"

    def log_message(self, fmt, *args):
        log(f"{self.address_string()} {fmt % args}")

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
        except Exception as e:  # keep serving; report what broke
            log(f"error: {e!r}")
            self._send(500, {"error": repr(e)})

    def do_GET(self):
        url = urllib.parse.urlsplit(self.path)
        e = self.engine
        if url.path == "/health":
            body = {"status": e.state, "pid": os.getpid(), **e.info}
            if e.state == "loading":
                body["phase"] = e.phase
            self._send(200 if e.state == "ready" else 503, body)
        elif url.path == "/generate":
            q = urllib.parse.parse_qs(url.query)
            try:
                n = int(q.get("max_tokens", ["16"])[0])
            except ValueError:
                return self._send(400, {"error": "max_tokens must be an integer"})
            self._call(e.generate, q.get("prompt", ["hello"])[0], n)
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
            self._call(e.generate, req.get("prompt", "hello"), req.get("max_tokens", 16))
        elif path == "/quiesce":
            self._call(e.quiesce)
        elif path == "/resume":
            self._call(e.resume)
        else:
            self._send(404, {"error": "not found"})


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--config", choices=sorted(CONFIGS), default="qwen3-0.6b")
    p.add_argument("--weights", help="safetensors file (default /tmp/thaw-example-<config>.safetensors)")
    p.add_argument("--init-weights-only", action="store_true", help="create the weights file and exit")
    p.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda if available else cpu")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], help="default: from --config")
    p.add_argument("--kv-fraction", type=float, default=0.5, help="fraction of free GPU memory for the KV pool")
    p.add_argument("--kv-blocks", type=int, help="KV pool size in blocks (default: 64 on cpu, --kv-fraction on cuda)")
    p.add_argument("--max-model-len", type=int, help="max prompt+output tokens (default: from --config)")
    p.add_argument("--no-cuda-graph", action="store_true", help="run the decode step eagerly on cuda")
    p.add_argument("--ready-file", help="write this file (atomically) when ready; removed on /quiesce")
    a = p.parse_args(argv)
    a.weights = a.weights or f"/tmp/thaw-example-{a.config}.safetensors"
    return a


def main(argv=None):
    sys.stdout.reconfigure(line_buffering=True)
    a = parse_args(argv)
    if a.init_weights_only:
        if not os.path.exists(a.weights):
            init_weights(CONFIGS[a.config], a.weights)
        log(f"weights at {a.weights}")
        return 0

    def on_term(signum, _frame):
        raise SystemExit(0)
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)

    engine = Engine(a)
    Handler.engine = engine
    ThreadingHTTPServer.request_queue_size = 128  # listen backlog (default 5)
    httpd = ThreadingHTTPServer((a.host, a.port), Handler)
    threading.Thread(target=httpd.serve_forever, name="http", daemon=True).start()
    log(f"listening on {a.host}:{httpd.server_address[1]} pid {os.getpid()}")
    try:
        try:
            engine.load()
        except Exception as e:
            engine.state = "failed"
            log(f"load failed: {e!r}")
            raise
        threading.Event().wait()  # serve until SIGTERM/SIGINT
    except SystemExit:
        log("shutting down")
        httpd.shutdown()
        httpd.server_close()
        engine.lock.acquire(timeout=30)  # let an in-flight request finish with the device
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
