"""Passthrough overhead: create+start+delete of a container without thaw's annotation, through
thaw-runtime vs runc directly, interleaved in one run. Also the bare exec cost (`--version`).

    python bench/passthrough.py [--iterations 40] [--also NAME=PATH ...]

--also adds other runtimes to the same interleaved run, e.g. the thaw-runtime of an earlier
commit installed privately (THAW_PREFIX=/opt/thaw-before THAW_BIN_DIR=/opt/thaw-before/bin
bash install/node.sh), so that before and after are compared side by side on a loaded machine.
"""

import argparse
import os
import shutil
import statistics
import subprocess
import tempfile
import time

from common import machine, save
from helpers import make_bundle, unique


def lifecycle(runtime: str, root: str, bundle: str) -> float:
    cid = unique("pt")
    g = [runtime, "--root", root, "--log", os.path.join(bundle, "log.json"), "--log-format", "json"]
    t = time.perf_counter()
    subprocess.run([*g, "create", "--bundle", bundle, "--pid-file", os.path.join(bundle, "pid"), cid],
                   check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    subprocess.run([*g, "start", cid], check=True)
    t_started = time.perf_counter()
    while b'"stopped"' not in subprocess.run([*g, "state", cid], capture_output=True).stdout:
        pass
    t_wait = time.perf_counter()
    subprocess.run([*g, "delete", cid], check=True)
    return (t_started - t) + (time.perf_counter() - t_wait)


def version(runtime: str) -> float:
    t = time.perf_counter()
    subprocess.run([runtime, "--version"], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iterations", type=int, default=40)
    ap.add_argument("--also", action="append", default=[], metavar="NAME=PATH",
                    help="another runtime to measure in the same run")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="thaw-bench-")
    try:
        bundle = make_bundle(os.path.join(tmp, "b"), ["true"], annotations={"io.kubernetes.cri.container-name": "x"})
        root = os.path.join(tmp, "root")
        runtimes = {"runc": shutil.which("runc"), "thaw-runtime": shutil.which("thaw-runtime")}
        runtimes.update(dict(a.split("=", 1) for a in args.also))
        for rt in runtimes.values():          # warm page cache and thaw's config cache
            lifecycle(rt, root, bundle)
        life = {k: [] for k in runtimes}
        ver = {k: [] for k in runtimes}
        for _ in range(args.iterations):
            for name, rt in runtimes.items():
                life[name].append(lifecycle(rt, root, bundle))
                ver[name].append(version(rt))
        med = {k: statistics.median(v) for k, v in life.items()}
        vmed = {k: statistics.median(v) for k, v in ver.items()}
        result = {
            "benchmark": "passthrough", "iterations": args.iterations, "machine": machine(),
            "create_start_delete_median_s": med,
            "create_start_delete_p90_s": {k: sorted(v)[int(0.9 * len(v))] for k, v in life.items()},
            "ratio_thaw_over_runc": med["thaw-runtime"] / med["runc"],
            "added_ms_per_lifecycle": (med["thaw-runtime"] - med["runc"]) * 1000,
            "exec_version_median_s": vmed,
            "added_ms_per_call": (vmed["thaw-runtime"] - vmed["runc"]) * 1000,
            "ratio_over_runc": {k: v / med["runc"] for k, v in med.items()},
        }
        path = save("passthrough", result)
        print(f"create+start+delete, median of {args.iterations}:  runc {med['runc']*1000:.1f} ms   "
              f"thaw-runtime {med['thaw-runtime']*1000:.1f} ms   ratio {result['ratio_thaw_over_runc']:.3f}  "
              f"(+{result['added_ms_per_lifecycle']:.1f} ms for 3 calls)")
        print(f"single call (--version): runc {vmed['runc']*1000:.1f} ms   thaw-runtime "
              f"{vmed['thaw-runtime']*1000:.1f} ms   (+{result['added_ms_per_call']:.1f} ms)")
        for name in runtimes:
            if name not in ("runc", "thaw-runtime"):
                print(f"{name}: {med[name]*1000:.1f} ms (ratio {med[name] / med['runc']:.3f}), "
                      f"--version {vmed[name]*1000:.1f} ms")
        print(f"saved {path}")
    finally:
        subprocess.run(["runc", "--root", os.path.join(tmp, "root"), "list"], capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
