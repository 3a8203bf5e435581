"""What proving a restore's credentials costs (shim/lifecycle/confinement/): the image check (every
task and thread of the CRIU images — the facts the store decoded from them when it sealed them —
compared with the spec) and the kernel check
(every restored thread's /proc status and, the spec having a seccomp profile, its oldest filter
read with ptrace while CRIU leaves them stopped, then SIGCONT), on a snapshot of a process with
200 threads, restored for real through thaw-runtime.

    python bench/confinement.py [--threads 200] [--restores 10]

Reports, from the `restored` events: the image_check and kernel_check phases (medians) beside
runc_restore and the total; and, in this process, the image check alone with its imports paid
(warm) and first in a fresh interpreter (importing protobuf and the generated classes), and the
kernel check alone on the live source stopped; wall and CPU time (the machine these run on is
shared: CPU time is what its load inflates least).
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

# In a fresh interpreter that has imported what thaw-runtime has by then (restore, fingerprint,
# store): the first image check as a restore makes it — the facts the store sealed with the
# images (or, for a store entry without them, the images decoded: protobuf imported), the fresh
# IPC namespace's sysctls (cached per boot), the comparison.
COLD = r"""
import json, sys, time
from thaw.oci.annotations import SnapshotRef
from thaw.shim.lifecycle import confinement, fingerprint, restore
from thaw.shim.node.store import Store
spec = json.load(open(sys.argv[2]))
store = Store(sys.argv[1])
snap = store.resolve(SnapshotRef("threads", "1"), "_local")
ref = confinement.reference(sys.argv[3], confinement.profile_key(spec["linux"]["seccomp"], "runc"))
w, c = time.perf_counter(), time.process_time()
with store.image_dir(snap):
    images = store.image_facts(snap)
    confinement.check_images(images, spec, confinement.Grant.of(spec, ref, confinement.fresh_ipc_sysctls(sys.argv[3])))
print(json.dumps({"first_check_s": time.perf_counter() - w, "first_check_cpu_s": time.process_time() - c,
                  "protobuf_imported": "google.protobuf" in sys.modules}))
"""


# A seccomp profile, as containerd's default gives every container: the kernel check then reads
# each stopped thread's oldest filter with ptrace.
SECCOMP = {"defaultAction": "SCMP_ACT_ALLOW", "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_AARCH64"],
           "syscalls": [{"names": ["mount", "umount2"], "action": "SCMP_ACT_ERRNO"}]}


def with_seccomp(bundle: str) -> str:
    path = os.path.join(bundle, "config.json")
    with open(path) as f:
        spec = json.load(f)
    spec["linux"]["seccomp"] = SECCOMP
    with open(path, "w") as f:
        json.dump(spec, f)
    return bundle


def kernel_check_alone(env, pid: int, spec_path: str) -> tuple[float, float]:
    """The kernel check on the live 200-thread source, stopped as CRIU leaves a restore: wall and
    CPU (user + system) time, medians of 20 (CPU time is what a busy machine inflates least)."""
    import signal

    from thaw.oci.annotations import SnapshotRef
    from thaw.shim.lifecycle import confinement
    from thaw.shim.node.store import Store
    store = Store(env.store)
    with open(spec_path) as f:
        spec = json.load(f)
    snap = store.resolve(SnapshotRef("threads", "1"), "_local")
    with store.image_dir(snap):
        images = store.image_facts(snap)
    grant = confinement.Grant.of(spec, confinement.reference(env.state, confinement.profile_key(SECCOMP, "runc")))
    os.kill(pid, signal.SIGSTOP)
    try:
        time.sleep(0.2)
        wall, cpu = [], []
        for _ in range(20):
            w, c = time.perf_counter(), time.process_time()
            excess, _ = confinement.kernel_excess(pid, images, grant)
            wall.append(time.perf_counter() - w)
            cpu.append(time.process_time() - c)
        assert not excess, excess[:3]
    finally:
        os.kill(pid, signal.SIGCONT)
    return statistics.median(wall), statistics.median(cpu)


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
        src = env.container(with_seccomp(make_bundle(os.path.join(tmp, "src"), argv, python=True)))
        assert src.create() == 0, src.log_text()
        src.start()
        src.wait_output(lambda t: "up" in t, timeout=60)
        env.thaw("capture", src.id, "--name", "threads:1", "--root", env.root)
        kernel_wall, kernel_cpu = kernel_check_alone(env, src.pid(), os.path.join(tmp, "src", "config.json"))
        src.destroy()

        phases: dict[str, list[float]] = {}
        for _ in range(args.restores):
            dst = env.container(with_seccomp(make_bundle(os.path.join(tmp, unique("dst")), argv, python=True,
                                                         annotations={"thaw.dev/snapshot": "threads:1"})))
            assert dst.create() == 0, dst.log_text()
            events = [json.loads(line) for line in open(os.path.join(env.state, "events.log"))]
            [ev] = [e for e in events if e.get("container") == dst.id]
            assert ev["kind"] == "restored", ev
            for k, v in ev["phases"].items():
                phases.setdefault(k, []).append(v)
            dst.destroy()
            shutil.rmtree(dst.bundle, ignore_errors=True)

        from thaw.oci.annotations import SnapshotRef
        from thaw.shim.drivers import criu_decode
        from thaw.shim.lifecycle import confinement
        from thaw.shim.node.store import Store
        store = Store(env.store)
        snap = store.resolve(SnapshotRef("threads", "1"), "_local")
        spec_path = os.path.join(tmp, "src", "config.json")
        with open(spec_path) as f:
            spec = json.load(f)
        with store.image_dir(snap) as image_dir:
            cold = [json.loads(subprocess.run([sys.executable, "-c", COLD, env.store, spec_path, env.state],
                                              check=True, capture_output=True, text=True).stdout) for _ in range(5)]
            reference = confinement.reference(env.state, confinement.profile_key(SECCOMP, "runc"))
            ipc = confinement.fresh_ipc_sysctls(env.state)
            warm, warm_cpu = [], []
            for _ in range(30):
                t, c = time.perf_counter(), time.process_time()
                images = store.image_facts(snap)
                confinement.check_images(images, spec, confinement.Grant.of(spec, reference, ipc))
                warm.append(time.perf_counter() - t)
                warm_cpu.append(time.process_time() - c)
            # A store entry without facts (sealed by an older thaw): the images decoded again
            t, c = time.perf_counter(), time.process_time()
            decoded = criu_decode.read(image_dir)
            confinement.check_images(decoded, spec, confinement.Grant.of(spec, reference, ipc))
            fallback_wall, fallback_cpu = time.perf_counter() - t, time.process_time() - c
        threads = sum(len(t.threads) for t in images.tasks)
        assert threads >= args.threads, threads
        med = {k: statistics.median(v) for k, v in phases.items()}
        added = med["image_check"] + med["kernel_check"]
        result = {
            "benchmark": "confinement", "machine": machine(), "threads": threads, "restores": args.restores,
            "image_files": len(images.files),
            "restore_phases_median_s": med,
            "restore_phases_max_s": {k: max(v) for k, v in phases.items()},
            "added_by_checks_median_s": added,
            "image_check_warm_median_s": statistics.median(warm),
            "image_check_warm_cpu_median_s": statistics.median(warm_cpu),
            "image_check_first_median_s": statistics.median(c["first_check_s"] for c in cold),
            "image_check_first_cpu_median_s": statistics.median(c["first_check_cpu_s"] for c in cold),
            "protobuf_imported_by_first_check": any(c["protobuf_imported"] for c in cold),
            "image_check_without_facts_s": fallback_wall, "image_check_without_facts_cpu_s": fallback_cpu,
            "kernel_check_alone_median_s": kernel_wall,
            "kernel_check_alone_cpu_median_s": kernel_cpu,
            "added_cpu_s": statistics.median(c["first_check_cpu_s"] for c in cold) + kernel_cpu,
            "goal_added_s": 0.030,
            "load_average_1m_before_after": [load_before, os.getloadavg()[0]],
        }
        path = save("confinement", result)
        print(f"{threads} threads, {args.restores} restores through thaw-runtime (medians):")
        print(f"  image_check {med['image_check'] * 1000:.1f} ms + kernel_check {med['kernel_check'] * 1000:.1f} ms"
              f" = {added * 1000:.1f} ms added (goal <= 30 ms); runc_restore {med['runc_restore'] * 1000:.0f} ms,"
              f" total {med['total'] * 1000:.0f} ms")
        ms = {k: v * 1000 for k, v in result.items() if k.endswith("_s") and isinstance(v, float)}
        print(f"  image check, first in a process: {ms['image_check_first_median_s']:.1f} ms wall,"
              f" {ms['image_check_first_cpu_median_s']:.1f} ms CPU; again: {ms['image_check_warm_median_s']:.1f} ms"
              f" wall, {ms['image_check_warm_cpu_median_s']:.1f} ms CPU")
        print(f"  without sealed facts (images decoded, protobuf imported first): {fallback_wall * 1000:.1f} ms wall,"
              f" {fallback_cpu * 1000:.1f} ms CPU; protobuf imported by the first check:"
              f" {result['protobuf_imported_by_first_check']}")
        print(f"  kernel check alone (200 threads stopped): {ms['kernel_check_alone_median_s']:.1f} ms wall,"
              f" {ms['kernel_check_alone_cpu_median_s']:.1f} ms CPU")
        print(f"  added CPU time per restore (first image check + kernel check): {ms['added_cpu_s']:.1f} ms"
              " (goal <= 30 ms)")
        print(f"  load average (1 min) before/after: {result['load_average_1m_before_after']}")
        print(f"saved {path}")
    finally:
        for cid in env.runc_ids():
            subprocess.run(["runc", "--root", env.root, "delete", "--force", cid], capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
