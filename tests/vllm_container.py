"""vLLM's CPU build in a runc container through thaw-runtime: shared by tests/test_vllm.py and
bench/vllm_cpu.py.

The vLLM virtualenv is made by bench/vllm/install.sh (never by the node install); the model by
bench/vllm/make_model.py. The container runs the stock OpenAI-compatible server command
(`python -m vllm.entrypoints.openai.api_server`) with the venv and the model bind-mounted
read-only and the host's /usr (Debian's python3, which the venv uses) as every python test
container here has it. Requests come from a client run with nsenter in the container's network
namespace (standard library only).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time

from helpers import PYTHON, make_bundle

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INSTALL = os.path.join(ROOT, "bench", "vllm", "install.sh")
LOCK = os.path.join(ROOT, "bench", "vllm", "requirements.lock")
MAKE_MODEL = os.path.join(ROOT, "bench", "vllm", "make_model.py")
PORT = 8000
MODEL_NAME = "tiny-qwen3"
# Greedy prompts: words of the tiny tokenizer ("w<N>" is token N).
PROMPTS = ["w17 w230 w5 w999 w42", "w3 w3 w3 w3", "w1000 w2000 w3000 w4000 w12 w13", "w77", "w512 w256 w128"]
MAX_TOKENS = 16
ENV = [
    "PATH=/opt/vllm/bin:/usr/local/bin:/usr/bin:/bin", "HOME=/root", "PYTHONUNBUFFERED=1",
    # vLLM's CPU KV cache (GiB); most of the snapshot.
    "VLLM_CPU_KVCACHE_SPACE=1",
    # No network: no usage reports, no hub.
    "VLLM_NO_USAGE_STATS=1", "DO_NOT_TRACK=1", "HF_HUB_OFFLINE=1", "TRANSFORMERS_OFFLINE=1",
]
SERVE = ["/opt/vllm/bin/python", "-m", "vllm.entrypoints.openai.api_server", "--model", "/model",
         "--served-model-name", MODEL_NAME, "--host", "127.0.0.1", "--port", str(PORT),
         "--dtype", "float32", "--max-model-len", "512", "--seed", "0"]
SHM = "1g"   # vLLM's shared-memory broadcast needs more than runc's usual 64 MiB /dev/shm


def venv_path() -> str:
    return os.environ.get("THAW_VLLM_VENV") or os.path.join(
        os.environ.get("THAW_BUILD_CACHE") or "/var/cache/thaw", "vllm-cpu")


def venv_missing(venv: str) -> str | None:
    """Why the vLLM venv cannot be used (None: it can): absent, or installed from another lock."""
    if not os.access(os.path.join(venv, "bin", "python"), os.X_OK):
        return f"no vLLM CPU virtualenv at {venv} (bash bench/vllm/install.sh makes it)"
    with open(LOCK, "rb") as f:
        want = hashlib.sha256(f.read()).hexdigest()[:16]
    try:
        with open(os.path.join(venv, ".thaw-lock")) as f:
            have = f.read().strip()
    except OSError:
        have = ""
    if have != want:
        return f"{venv} was not installed from the current bench/vllm/requirements.lock (run bench/vllm/install.sh)"
    return None


def make_model(venv: str, out: str) -> dict:
    proc = subprocess.run([os.path.join(venv, "bin", "python"), MAKE_MODEL, out], capture_output=True,
                          text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode != 0:
        raise RuntimeError(f"make_model failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bundle(path: str, venv: str, model: str, netns: str, annotations: dict[str, str]) -> str:
    b = make_bundle(path, SERVE, python=True, netns=netns, env=ENV, annotations=annotations,
                    binds={"/opt/vllm": venv, "/model": model})
    cfg = os.path.join(b, "config.json")
    with open(cfg) as f:
        spec = json.load(f)
    for m in spec["mounts"]:
        if m["destination"] == "/dev/shm":
            m["options"] = [o for o in m["options"] if not o.startswith("size=")] + [f"size={SHM}"]
    with open(cfg, "w") as f:
        json.dump(spec, f, indent=1)
    return b


_CLIENT = r"""
import json, sys, threading, time, urllib.request
port, prompts, max_tokens, concurrent = json.loads(sys.argv[1])
out = [None] * len(prompts)
def one(i):
    body = json.dumps({"model": %r, "prompt": prompts[i], "max_tokens": max_tokens, "temperature": 0,
                       "ignore_eos": True}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    t = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            res = json.loads(r.read())
        out[i] = {"text": res["choices"][0]["text"], "tokens": res["usage"]["completion_tokens"],
                  "s": time.perf_counter() - t}
    except Exception as exc:
        out[i] = {"error": f"{type(exc).__name__}: {exc}"}
if concurrent:
    ts = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    [t.start() for t in ts]; [t.join() for t in ts]
else:
    for i in range(len(prompts)):
        one(i)
print(json.dumps(out))
""" % MODEL_NAME


def complete(netns: str, prompts: list[str], max_tokens: int = MAX_TOKENS, concurrent: bool = False) -> list[dict]:
    """Greedy completions of `prompts` from the server in network namespace `netns`."""
    proc = subprocess.run(["nsenter", f"--net={netns}", PYTHON, "-c", _CLIENT,
                           json.dumps([PORT, prompts, max_tokens, concurrent])],
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"client failed: {proc.stderr[-1500:]}")
    return json.loads(proc.stdout)


_FIRST = r"""
import json, sys, time, urllib.request
port, deadline_s, body = json.loads(sys.argv[1])
deadline = time.monotonic() + deadline_s
while True:
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
        break
    except Exception:
        if time.monotonic() > deadline:
            raise SystemExit("not ready")
        time.sleep(0.05)
ready = time.monotonic()
req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=json.dumps(body).encode(),
                             headers={"Content-Type": "application/json"})
with urllib.request.urlopen(req, timeout=300) as r:
    res = json.loads(r.read())
print(json.dumps({"ready": ready, "first": time.monotonic(), "text": res["choices"][0]["text"]}))
"""


def ready_and_first(netns: str, alive, timeout: float) -> dict:
    """Wait in the container's network namespace for /health, then ask for the first greedy
    completion at once: {"ready", "first"} (time.monotonic(), which the host shares), "text".
    Raises if `alive()` turns false first."""
    body = {"model": MODEL_NAME, "prompt": PROMPTS[0], "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}
    proc = subprocess.Popen(["nsenter", f"--net={netns}", PYTHON, "-c", _FIRST, json.dumps([PORT, timeout, body])],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        while proc.poll() is None:
            if not alive():
                raise RuntimeError("the vLLM container stopped before it answered")
            time.sleep(0.5)
        out, err = proc.communicate()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.returncode != 0:
        raise RuntimeError(f"no first completion: {err[-1500:]}")
    return json.loads(out)


def shm_entries(pid: int) -> list[str]:
    return sorted(os.listdir(f"/proc/{pid}/root/dev/shm"))


def _thaw(config: str, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run(["thaw", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "THAW_CONFIG": config})
    if proc.returncode != 0:
        raise RuntimeError(f"thaw {' '.join(args)} failed ({proc.returncode}): {proc.stdout}\n{proc.stderr}")
    return proc


def run(tmp: str, venv: str, config: str, root: str, netns_paths: list[str], containers: list,
        snapshot: str = "vllm-tiny:1", ready_timeout: float = 900) -> dict:
    """Cold start -> greedy completions -> `thaw capture` -> a second container of the same spec
    restored -> the same completions, new and concurrent ones. Containers created are appended to
    `containers` (the caller destroys them). Returns what was measured and seen."""
    from helpers import ShimContainer, unique
    from thaw.shim.lifecycle import capture
    model = make_model(venv, os.path.join(tmp, "model"))
    annotations = {"thaw.dev/snapshot": snapshot}
    env = {"THAW_CONFIG": config}
    os.environ["THAW_CONFIG"] = config     # start, kill, delete: thaw-runtime reads the same config
    out: dict = {"model": model, "prompts": PROMPTS, "max_tokens": MAX_TOKENS, "command": SERVE}

    def serve(name: str, ns: str) -> tuple[ShimContainer, float, float, list[dict]]:
        b = bundle(os.path.join(tmp, name), venv, model["model"], ns, annotations)
        c = ShimContainer("thaw-runtime", root, b, unique(f"vllm-{name}"))
        containers.append(c)
        t0 = time.monotonic()
        rc = c.create(env=env, timeout=600)
        if rc != 0:
            raise RuntimeError(f"create of {name} failed: {c.log_text()[-2000:]}")
        c.start()
        first = ready_and_first(ns, lambda: (c.state() or {}).get("status") == "running", ready_timeout)
        return c, first["ready"] - t0, first["first"] - t0, first["text"]

    cold, out["cold_ready_s"], out["cold_first_token_s"], cold_first = serve("cold", netns_paths[0])
    out["cold_outputs"] = complete(netns_paths[0], PROMPTS)
    out["cold_io_uring_holders"] = capture.io_uring_holders(cold.pid())
    out["cold_shm"] = shm_entries(cold.pid())

    t = time.perf_counter()
    _thaw(config, "capture", cold.id, "--name", snapshot, "--root", root)
    out["capture_s"] = round(time.perf_counter() - t, 2)
    info = json.loads(_thaw(config, "inspect", snapshot).stdout)
    out["snapshot"] = info
    out["cold_after_capture"] = complete(netns_paths[0], PROMPTS[:2])   # the source keeps serving
    cold.destroy()                                                      # one engine at a time in memory

    restored, out["restore_ready_s"], out["restore_first_token_s"], restored_first = serve("restored", netns_paths[1])
    out["restore_log"] = [e.get("msg", "") for e in restored.log_entries()]
    out["restored_outputs"] = complete(netns_paths[1], PROMPTS)
    out["restored_new"] = complete(netns_paths[1], ["w9 w8 w7 w6 w5 w4 w3 w2"], max_tokens=24)
    out["restored_concurrent"] = complete(netns_paths[1], PROMPTS[:4], concurrent=True)
    out["restored_shm"] = shm_entries(restored.pid())
    out["restored_after"] = complete(netns_paths[1], PROMPTS[:1])
    out["first_outputs"] = {"cold": cold_first, "restored": restored_first}
    out["events"] = _thaw(config, "events", "--json").stdout.splitlines()
    out["cold_output_tail"] = ("".join(cold.stdout) + "".join(cold.stderr))[-4000:]
    out["restored_output"] = ("".join(restored.stdout) + "".join(restored.stderr))[-4000:]
    texts = lambda rs: [r.get("text") for r in rs]  # noqa: E731
    out["outputs_identical"] = (texts(out["cold_outputs"]) == texts(out["restored_outputs"])
                                and None not in texts(out["cold_outputs"]) and cold_first == restored_first)
    return out
