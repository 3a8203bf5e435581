"""The thaw demo (no GPU needed): a service with a slow warm-up, cold-started, captured, and
restored into a new container through thaw-runtime, the way containerd's shim would call it.

    python bench/demo.py [--warm-work 40000000] [--keep]

Prints cold vs restored time-to-ready and evidence that the restored process kept its memory,
and saves the numbers under bench/results/demo-*.json.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from common import ROOT, machine, save
from helpers import PYTHON, make_bundle, netns, netns_delete, unique, wait_http_ready
from thaw.shim.drivers import engine

PORT = 8080
SNAPSHOT = "demo-warm-server:latest"


def wait_ready(pid: int, timeout: float) -> float:
    return wait_http_ready(pid, f"http://127.0.0.1:{PORT}/health", timeout)


def get_state(pid: int) -> dict:
    with engine.ContainerView(pid) as view:
        status, body = view.request(f"http://127.0.0.1:{PORT}/state", "GET")
    assert status == 200, body
    return json.loads(body)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--warm-work", type=int, default=40_000_000, help="SHA-256 rounds of warm-up")
    ap.add_argument("--keep", action="store_true", help="leave the restored container running")
    args = ap.parse_args()

    tmp = tempfile.mkdtemp(prefix="thaw-demo-")
    root = "/run/thaw-demo"
    ns = [unique("thaw-demo"), unique("thaw-demo")]
    containers = []
    try:
        ns_paths = [netns(n) for n in ns]
        app = os.path.join(ROOT, "examples", "warm-server")
        env = [f"WARM_WORK={args.warm_work}", f"PORT={PORT}", "PYTHONUNBUFFERED=1", "PATH=/usr/bin:/bin"]
        from helpers import ShimContainer

        def serve(name: str, ns_path: str, annotations: dict | None = None, timeout: float = 600):
            """Create + start the service through thaw-runtime, as the shim would; seconds to ready."""
            b = make_bundle(os.path.join(tmp, name), [PYTHON, "/app/server.py"], python=True,
                            netns=ns_path, env=env, binds={"/app": app}, annotations=annotations)
            c = ShimContainer("thaw-runtime", root, b, unique(f"demo-{name}"))
            containers.append(c)
            t0 = time.perf_counter()
            assert c.create() == 0, c.log_text()
            c.start()
            return c, wait_ready(c.pid(), timeout) - t0

        print(f"1. cold start: {os.path.join(app, 'server.py')} warming up ({args.warm_work} SHA-256 rounds)")
        cold, cold_ready = serve("cold", ns_paths[0])
        before = get_state(cold.pid())
        print(f"   ready after {cold_ready:.2f} s (warm-up inside took {before['warmup_s']} s)")

        print(f"2. capture as {SNAPSHOT} (the source keeps running)")
        t = time.perf_counter()
        cap = subprocess.run(["thaw", "capture", cold.id, "--name", SNAPSHOT, "--root", root],
                             capture_output=True, text=True)
        if cap.returncode != 0:
            raise SystemExit(f"capture failed: {cap.stderr}")
        capture_s = time.perf_counter() - t
        info = json.loads(subprocess.run(["thaw", "inspect", SNAPSHOT], capture_output=True, text=True,
                                         check=True).stdout)
        print(f"   {cap.stdout.strip()}")

        print("3. restore into a new container (another network namespace) through thaw-runtime")
        restored, restored_ready = serve("restored", ns_paths[1], {"thaw.dev/snapshot": SNAPSHOT}, 120)
        after = get_state(restored.pid())
        record = json.loads(open(os.path.join("/run/thaw/containers", restored.id + ".json")).read())
        print(f"   ready after {restored_ready:.2f} s")

        same = after["digest"] == before["digest"] and after["seed"] == before["seed"]
        print()
        print(f"   {'':24}{'cold start':>14}{'restored':>14}")
        print(f"   {'time to ready (s)':24}{cold_ready:>14.2f}{restored_ready:>14.2f}")
        print(f"   {'speed-up':24}{'':>14}{cold_ready / restored_ready:>13.1f}x")
        print(f"   {'host pid':24}{cold.pid():>14}{restored.pid():>14}")
        print(f"   {'state digest':24}{before['digest'][:12]:>14}{after['digest'][:12]:>14}")
        print(f"   {'requests served so far':24}{before['served']:>14}{after['served']:>14}")
        print(f"   restored process kept its memory: {'YES' if same else 'NO'} (the table is seeded from "
              f"os.urandom, so a cold start could not reproduce digest {before['digest'][:12]})")
        print(f"   thaw restore phases (s): {record['phases']}")
        result = {
            "benchmark": "demo", "machine": machine(), "warm_work": args.warm_work,
            "cold_ready_s": cold_ready, "restored_ready_s": restored_ready,
            "speedup": cold_ready / restored_ready, "capture_s": capture_s,
            "snapshot_bytes": info["size"], "state_preserved": same,
            "restore_phases_s": record["phases"], "capture_phases_s": info["config"]["phases"],
        }
        print(f"   saved {save('demo', result)}")
        if not same:
            sys.exit(1)
        if args.keep:
            containers.remove(restored)
            print(f"   left running: runc --root {root} list   (snapshot stays: thaw ls)")
    finally:
        for c in containers:
            c.destroy()
        for n in ns:
            netns_delete(n)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
