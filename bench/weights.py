"""Weights outside vs inside the snapshot, on the CPU: the example worker (sleep mode, its weights on
a volume) in a runc container through thaw-runtime, captured twice from the same source —

  inside    today's quiesce (/quiesce: the KV cache leaves, the weights stay): the snapshot carries them
  outside   the vLLM preset (thaw.dev/engine: vllm: sleep level 2; at resume wake_up weights,
            reload_weights from the file, wake_up kv_cache): the snapshot holds no weights

— then each restored --runs times (hot page cache): snapshot size, CRIU bytes, the create (restore)
time and its phases, time to the first output, and that the output is the cold start's.

    sudo python3 bench/weights.py [--config small] [--runs 3]

A private store and state under a temporary directory (the node's are not touched). Writes
bench/results/weights-*.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import yaml

from common import ROOT, machine, save
from helpers import ShimContainer, make_bundle, netns, netns_delete, unique, wait_http_ready
from thaw.oci.annotations import SnapshotRef
from thaw.shim.drivers import engine
from thaw.shim.node.config import load
from thaw.shim.node.store import Store

SERVER = os.path.join(ROOT, "examples", "inference-server", "server.py")
URL = "http://127.0.0.1:8000"
PROMPT = {"prompt": "weights outside the snapshot", "max_tokens": 8}


def generate(pid: int) -> dict:
    with engine.ContainerView(pid) as view:
        status, body = view.request(f"{URL}/generate", "POST", 300, json_body=PROMPT)
    if status != 200:
        raise RuntimeError(f"/generate answered {status}: {body[:300]}")
    return json.loads(body)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="small")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="thaw-weights-bench-")
    cfg_path = os.path.join(tmp, "config.yaml")
    hook = shutil.which("thaw-hook")
    with open(cfg_path, "w") as f:
        yaml.safe_dump({"store_dir": os.path.join(tmp, "store"), "state_dir": os.path.join(tmp, "state"),
                        **({"hook": hook} if hook else {})}, f)
    os.environ["THAW_CONFIG"] = cfg_path
    root = os.path.join(tmp, "runc")
    work = os.path.join(tmp, "work")
    os.makedirs(work)
    os.chmod(tmp, 0o755)
    weights = os.path.join(work, "w.safetensors")
    subprocess.run([sys.executable, SERVER, "--init-weights-only", "--config", args.config, "--weights", weights],
                   check=True, capture_output=True)
    py = os.path.join(sys.prefix, "bin", "python3")

    def bundle(ns: str, annotations: dict) -> str:
        return make_bundle(os.path.join(tmp, unique("b")), [
            py, "/app/server.py", "--config", args.config, "--device", "cpu", "--host", "127.0.0.1",
            "--port", "8000", "--model", "/work/w.safetensors", "--enable-sleep-mode"],
            python=True, netns=ns, annotations=annotations,
            binds={"/work": work, "/app": os.path.dirname(SERVER), sys.prefix: sys.prefix})

    def thaw(*a: str) -> None:
        subprocess.run(["thaw", *a], check=True, capture_output=True, text=True, timeout=900)

    names = [unique("wbns") for _ in range(2)]
    paths = [netns(n) for n in names]
    store = Store.for_config(load(cfg_path))
    out: dict = {"machine": machine(), "config": args.config, "weight_bytes": os.path.getsize(weights),
                 "runs": args.runs, "variants": {}}
    try:
        src = ShimContainer("thaw-runtime", root, bundle(paths[0], {"thaw.dev/engine": "vllm"}), unique("src"))
        t0 = time.perf_counter()
        assert src.create() == 0, src.log_text()
        src.start()
        wait_http_ready(src.pid(), f"{URL}/health", 600)
        first = generate(src.pid())
        out["cold_first_output_s"] = round(time.perf_counter() - t0, 4)
        thaw("capture", src.id, "--name", "inside:1", "--root", root,
             "--quiesce", f"{URL}/quiesce", "--resume", f"{URL}/resume")
        thaw("capture", src.id, "--name", "outside:1", "--root", root)
        src.run("kill", src.id, "KILL", check=False)
        src.run("delete", "--force", src.id, check=False)
        for variant in ("inside", "outside"):
            snap = store.resolve(SnapshotRef.parse(f"{variant}:1"), "_local")
            runs = []
            for _ in range(args.runs):
                # inside: restored as today (one /resume: the KV cache back); outside: the preset.
                ann = {"thaw.dev/snapshot": f"{variant}:1", **({"thaw.dev/engine": "vllm"} if variant == "outside"
                                                              else {"thaw.dev/resume": f"{URL}/resume"})}
                dst = ShimContainer("thaw-runtime", root, bundle(paths[1], ann), unique("dst"))
                try:
                    t = time.perf_counter()
                    rc = dst.create()
                    create_s = time.perf_counter() - t
                    if rc != 0 or "cold start" in dst.log_text():
                        raise RuntimeError(f"{variant}: not restored: {dst.log_text()[-800:]}")
                    dst.start()
                    got = generate(dst.pid())
                    record = json.load(open(os.path.join(tmp, "state", "containers", dst.id + ".json")))
                    runs.append({"create_s": round(create_s, 4), "first_output_s": round(time.perf_counter() - t, 4),
                                 "identical": got["tokens"] == first["tokens"], "phases": record["phases"]})
                finally:
                    dst.run("kill", dst.id, "KILL", check=False)
                    dst.run("delete", "--force", dst.id, check=False)
            out["variants"][variant] = {
                "snapshot_bytes": snap.size, "criu_bytes": snap.config.sizes.criu_bytes,
                "weights": snap.config.weights.to_json(), "capture_phases": snap.config.phases,
                "create_s_median": statistics.median(r["create_s"] for r in runs),
                "first_output_s_median": statistics.median(r["first_output_s"] for r in runs),
                "identical": all(r["identical"] for r in runs), "restores": runs}
            v = out["variants"][variant]
            print(f"{variant}: snapshot {snap.size / 2**20:.1f} MiB (CRIU {v['criu_bytes'] / 2**20:.1f} MiB), "
                  f"create {v['create_s_median']:.3f}s, first output {v['first_output_s_median']:.3f}s, "
                  f"identical {v['identical']}", flush=True)
    finally:
        for n in names:
            netns_delete(n)
        subprocess.run(["runc", "--root", root, "list", "-q"], capture_output=True)
    print(save("weights", out))
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
