"""What proving a restore's credentials costs (shim/confinement.py): the image check (every
task and thread of the CRIU images decoded and compared with the spec) and the kernel check
(every restored thread's /proc status read while CRIU leaves them stopped, then SIGCONT), on a
snapshot of a process with 200 threads, restored for real through thaw-runtime.

    python bench/confinement.py [--threads 200] [--restores 10]

Reports, from the `restored` events: the image_check and kernel_check phases (medians) beside
runc_restore and the total; and, in this process, the image check alone with its imports paid
(warm) and in a fresh interpreter (cold: importing protobuf and the generated classes).
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from common import machine, save
from conftest import ThawEnv
from helpers import PYTHON, make_bundle, unique

WORKLOAD = r"""
import sys, threading, time
for _ in range(int(sys.argv[1]) - 1):
    threading.Thread(target=time.sleep, args=(10**6,), daemon=True).start()
print("up", flush=True)
time.sleep(10**6)
"""

COLD = r"""
import json, sys, time
t = time.perf_counter()
from thaw.shim import confinement
t_import = time.perf_counter()
spec = json.load(open(sys.argv[2]))
confinement.check_images(sys.argv[1], spec, confinement.Grant.of(spec))
print(json.dumps({"import_s": t_import - t, "first_check_s": time.perf_counter() - t_import}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=200)
    ap.add_argument("--restores", type=int, default=10)
    args = ap.parse_args()
    load_before = os.getloadavg()[0]          # shared 2-core machine: say how busy it was
    tmp = tempfile.mkdtemp(prefix="thaw-bench-conf-")
    env = ThawEnv.in_dir(tmp)
    os.environ["THAW_CONFIG"] = env.config
    try:
        argv = [PYTHON, "-c", WORKLOAD, str(args.threads)]
        src = env.container(make_bundle(os.path.join(tmp, "src"), argv, python=True))
        assert src.create() == 0, src.log_text()
        src.start()
        src.wait_output(lambda t: "up" in t, timeout=60)
        env.thaw("capture", src.id, "--name", "threads:1", "--root", env.root)
        src.destroy()

        phases: dict[str, list[float]] = {}
        for _ in range(args.restores):
            dst = env.container(make_bundle(os.path.join(tmp, unique("dst")), argv, python=True,
                                            annotations={"thaw.dev/snapshot": "threads:1"}))
            assert dst.create() == 0, dst.log_text()
            events = [json.loads(line) for line in open(os.path.join(env.state, "events.log"))]
            [ev] = [e for e in events if e.get("container") == dst.id]
            assert ev["kind"] == "restored", ev
            for k, v in ev["phases"].items():
                phases.setdefault(k, []).append(v)
            dst.destroy()
            shutil.rmtree(dst.bundle, ignore_errors=True)

        from thaw.oci.annotations import SnapshotRef
        from thaw.shim import confinement, criu_images
        from thaw.shim.store import Store
        store = Store(env.store)
        snap = store.resolve(SnapshotRef("threads", "1"), "_local")
        spec_path = os.path.join(tmp, "src", "config.json")
        with open(spec_path) as f:
            spec = json.load(f)
        with store.image_dir(snap) as image_dir:
            cold = [json.loads(subprocess.run([sys.executable, "-c", COLD, image_dir, spec_path], check=True,
                                              capture_output=True, text=True).stdout) for _ in range(5)]
            warm = []
            for _ in range(30):
                t = time.perf_counter()
                images = confinement.check_images(image_dir, spec, confinement.Grant.of(spec))
                warm.append(time.perf_counter() - t)
        threads = sum(len(t.threads) for t in images.tasks)
        assert threads >= args.threads, threads
        med = {k: statistics.median(v) for k, v in phases.items()}
        added = med["image_check"] + med["kernel_check"]
        result = {
            "benchmark": "confinement", "machine": machine(), "threads": threads, "restores": args.restores,
            "image_files": len(criu_images.read(store.image_path(snap), confinement.spec_namespaces(spec)).files),
            "restore_phases_median_s": med,
            "restore_phases_max_s": {k: max(v) for k, v in phases.items()},
            "added_by_checks_median_s": added,
            "image_check_warm_median_s": statistics.median(warm),
            "image_check_cold_median_s": statistics.median(c["first_check_s"] for c in cold),
            "import_cold_median_s": statistics.median(c["import_s"] for c in cold),
            "goal_added_s": 0.030,
            "load_average_1m_before_after": [load_before, os.getloadavg()[0]],
        }
        path = save("confinement", result)
        print(f"{threads} threads, {args.restores} restores through thaw-runtime (medians):")
        print(f"  image_check {med['image_check'] * 1000:.1f} ms + kernel_check {med['kernel_check'] * 1000:.1f} ms"
              f" = {added * 1000:.1f} ms added (goal <= 30 ms); runc_restore {med['runc_restore'] * 1000:.0f} ms,"
              f" total {med['total'] * 1000:.0f} ms")
        print(f"  image check in-process: warm {result['image_check_warm_median_s'] * 1000:.1f} ms; fresh interpreter:"
              f" imports {result['import_cold_median_s'] * 1000:.1f} ms + check "
              f"{result['image_check_cold_median_s'] * 1000:.1f} ms")
        print(f"  load average (1 min) before/after: {result['load_average_1m_before_after']}")
        print(f"saved {path}")
    finally:
        for cid in env.runc_ids():
            subprocess.run(["runc", "--root", env.root, "delete", "--force", cid], capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
