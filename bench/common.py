"""Shared by the benchmarks: where results go, and the test helpers (bundles, shim emulation)."""

import json
import os
import platform
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")
sys.path.insert(0, os.path.join(ROOT, "tests"))


def machine() -> dict:
    return {"host": platform.node(), "kernel": platform.release(), "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "runc": subprocess.run(["runc", "--version"], capture_output=True, text=True).stdout.split("\n")[0]}


def save(name: str, data: dict) -> str:
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json")
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
    latest = os.path.join(RESULTS, f"{name}-latest.json")
    with open(latest, "w") as f:
        json.dump(data, f, indent=1)
    return path
