"""GPU end to end, on the GPU machine: the example inference worker in a runc container that sees
the GPU as NVIDIA's CDI spec would expose it, started cold through thaw-runtime, captured with
quiesce/resume, restored into a new container through thaw-runtime, and — in the same run — the
same CRIU image restored by hand with plain runc + CUDA driver calls (no thaw) as the baseline.

    source bench/device/env.sh && python3 bench/gpu_e2e.py --runs 3 --out DIR

Writes DIR/gpu-e2e.json (one object per run), DIR/gpu-e2e.md and DIR/gpu-e2e.png.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from common import ROOT
from helpers import ShimContainer, make_bundle, netns, netns_delete, unique, wait_http_ready
from thaw.shim import engine

SERVER = os.path.join(ROOT, "examples", "inference-server", "server.py")
PORT = 8000
URL = f"http://127.0.0.1:{PORT}"
PROMPT = {"prompt": "thaw restores warm GPU workers in seconds", "max_tokens": 32}
RUNC_ROOT = "/run/thaw-gpu-bench"
HOST_TOPS = ["/usr", "/etc", "/opt"]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def gpu_bundle(path: str, args: list[str], work: str, ns: str, annotations: dict | None = None) -> str:
    """The shape NVIDIA's CDI spec gives a container: host /usr, /etc, /opt read-only (each bound
    non-recursively, every mount below them as its own entry, so that CRIU knows them), the
    /dev/nvidia* nodes as devices, allowed in the device cgroup."""
    env = [f"{k}={v}" for k, v in os.environ.items()
           if k in ("PATH", "LD_LIBRARY_PATH", "HOME") or k.startswith(("CUDA", "NVIDIA"))]
    env += ["PYTHONUNBUFFERED=1", "HOME=/root"]
    make_bundle(path, args, python=True, netns=ns, env=env, annotations=annotations, binds={"/work": work})
    cfg_path = os.path.join(path, "config.json")
    spec = json.load(open(cfg_path))
    spec["mounts"] = [m for m in spec["mounts"] if m["destination"] not in HOST_TOPS]
    subs = []
    for line in open("/proc/self/mountinfo"):
        mp = line.split()[4]
        if any(mp.startswith(t + "/") for t in HOST_TOPS):
            subs.append(mp)
    for d in HOST_TOPS + sorted(set(subs)):
        if os.path.isdir(d) and not os.path.islink(d):
            os.makedirs(os.path.join(path, "rootfs", d.lstrip("/")), exist_ok=True)
            spec["mounts"].append({"destination": d, "type": "bind", "source": d, "options": ["bind", "ro"]})
    spec["mounts"].append({"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev"]})
    devices = []
    for name in sorted(os.listdir("/dev")):
        p = "/dev/" + name
        if name.startswith("nvidia") and os.path.exists(p) and not os.path.isdir(p):
            st = os.stat(p)
            if (st.st_mode & 0o170000) == 0o020000:
                devices.append({"path": p, "type": "c", "major": os.major(st.st_rdev),
                                "minor": os.minor(st.st_rdev), "fileMode": 0o666, "uid": 0, "gid": 0})
    spec["linux"]["devices"] = devices
    spec["linux"]["resources"]["devices"] = [{"allow": True, "access": "rwm"}]
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)   # no CAP_SYS_RESOURCE to go higher
    spec["process"]["rlimits"] = [{"type": "RLIMIT_NOFILE", "hard": hard, "soft": hard}]
    json.dump(spec, open(cfg_path, "w"), indent=1)
    return path


def wait_ready(pid: int, timeout: float) -> float:
    return wait_http_ready(pid, f"{URL}/health", timeout)


def generate(pid: int) -> dict:
    """POST /generate from inside the container's network namespace."""
    body = json.dumps(PROMPT).encode()
    code = ("import json,sys,urllib.request as u;r=u.Request(%r,data=%r,method='POST',"
            "headers={'Content-Type':'application/json'});print(u.urlopen(r,timeout=120).read().decode())"
            % (f"{URL}/generate", body))
    proc = subprocess.run(["nsenter", f"--net=/proc/{pid}/ns/net", sys.executable, "-c", code],
                          capture_output=True, text=True, timeout=180)
    if proc.returncode != 0:
        raise RuntimeError(f"/generate failed: {proc.stderr[-400:]}")
    return json.loads(proc.stdout)


def ready_line(c: ShimContainer) -> dict:
    m = re.search(r"READY (\{.*\})", c.output())
    return json.loads(m.group(1)) if m else {}


def thaw(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(["thaw", *args], capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"thaw {' '.join(args)}: {proc.stderr[-1500:]}")
    return proc


STOCK_CUDA = r"""
import sys, time
from cuda.bindings import driver as d
def ok(r):
    e = r[0] if isinstance(r, tuple) else r
    assert e == d.CUresult.CUDA_SUCCESS, e
    return r
ok(d.cuInit(0))
pid = int(sys.argv[1])
ok(d.cuCheckpointProcessRestore(pid, d.CUcheckpointRestoreArgs()))
ok(d.cuCheckpointProcessUnlock(pid, d.CUcheckpointUnlockArgs()))
"""


def stock_restore(image_dir: str, bundle: str, cid: str, work: str) -> tuple[float, int, ShimContainer]:
    """The baseline without thaw: runc restore of the same CRIU image, then the CUDA driver's
    restore + unlock from a small script (its own cuInit), as an operator would do by hand."""
    c = ShimContainer("runc", RUNC_ROOT, bundle, cid)
    t = time.perf_counter()
    with c.pipes() as (out_w, err_w):
        proc = subprocess.run(["runc", "--root", RUNC_ROOT, "--criu", shutil.which("criu"), "restore", "--detach",
                               "--image-path", image_dir, "--work-path", work, "--bundle", bundle,
                               "--pid-file", c.pid_file, cid],
                              stdin=subprocess.DEVNULL, stdout=out_w, stderr=err_w, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"stock runc restore failed: {open(os.path.join(work, 'restore.log')).read()[-800:]}")
    pid = c.pid()
    subprocess.run([sys.executable, "-c", STOCK_CUDA, str(pid)], check=True, timeout=300)
    return time.perf_counter() - t, pid, c


def drop_caches() -> None:
    subprocess.run(["sync"], check=True)
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def thaw_restore(name: str, cmd: list[str], work: str, ns: str, path: str) -> dict:
    """Create + start a container asking for `name` through thaw-runtime; time to first token."""
    b = gpu_bundle(path, cmd, work, ns, annotations={"thaw.dev/snapshot": name, "thaw.dev/resume": f"{URL}/resume"})
    dst = ShimContainer("thaw-runtime", RUNC_ROOT, b, unique("restored"))
    try:
        t0 = time.perf_counter()
        rc = dst.create()
        create_s = time.perf_counter() - t0
        warn = [e["msg"] for e in dst.log_entries()
                if e.get("level") == "error" or "cold start" in e.get("msg", "")]
        if rc != 0 or warn:
            raise RuntimeError(f"restore did not happen: rc={rc} {warn}")
        record = json.load(open(os.path.join("/run/thaw/containers", dst.id + ".json")))
        dst.start()
        t_ready = wait_ready(dst.pid(), 300)
        got = generate(dst.pid())
        ttft = t_ready - t0 + got["ttft_s"]
        phases = dict(record["phases"])
        phases["runtime"] = create_s - phases["total"]          # thaw-runtime process + imports
        phases["first_token"] = ttft - create_s
        return {"ttft_s": ttft, "tokens": got["tokens"], "phases": phases}
    finally:
        dst.destroy()


def cold_start(cmd: list[str], work: str, ns: str, path: str) -> tuple[ShimContainer, float, dict]:
    """Create + start through thaw-runtime without the annotation; (container, TTFT, first answer)."""
    c = ShimContainer("thaw-runtime", RUNC_ROOT, gpu_bundle(path, cmd, work, ns), unique("cold"))
    try:
        t0 = time.perf_counter()
        assert c.create() == 0, c.log_text()
        c.start()
        t_ready = wait_ready(c.pid(), 900)
        first = generate(c.pid())
    except BaseException:
        c.destroy()
        raise
    return c, t_ready - t0 + first["ttft_s"], first


def one_run(i: int, args, work: str, tmp: str, device_name: str) -> dict:
    ns = [unique("gpuns") for _ in range(3)]
    paths = [netns(n) for n in ns]
    name = f"gpu-worker:run{i}"
    cmd = ["python3", "/work/server.py", "--config", args.config, "--weights", "/work/weights.safetensors",
           "--port", str(PORT), "--kv-fraction", str(args.kv_fraction), *args.server_arg]
    containers: list[ShimContainer] = []
    run: dict = {"run": i, "device": device_name, "config": args.config, "kv_fraction": args.kv_fraction,
                 "server_args": cmd[2:],
                 "thp": re.search(r"\[(\w+)\]", open("/sys/kernel/mm/transparent_hugepage/enabled").read()).group(1)}
    try:
        if args.drop_caches:
            # A new node: nothing of torch, the weights or the snapshot in the page cache.
            drop_caches()
            c, run["cold_cold_cache_ttft_s"], _ = cold_start(cmd, work, paths[0], os.path.join(tmp, f"cc{i}"))
            run["cold_cold_cache_phases"] = ready_line(c)
            c.destroy()
            log(f"run {i}: cold start from a cold page cache: ttft {run['cold_cold_cache_ttft_s']:.2f}s")
        # 1. cold start through thaw-runtime (a container without the annotation: passthrough)
        cold, run["cold_ttft_s"], ref = cold_start(cmd, work, paths[0], os.path.join(tmp, f"cold{i}"))
        containers.append(cold)
        run["cold_phases"] = ready_line(cold)
        log(f"run {i}: cold ttft {run['cold_ttft_s']:.2f}s; {run['cold_phases']}")

        # 2. capture with quiesce/resume; the source keeps serving
        t = time.perf_counter()
        thaw("capture", cold.id, "--name", name, "--root", RUNC_ROOT,
             "--quiesce", f"{URL}/quiesce", "--resume", f"{URL}/resume")
        run["capture_s"] = time.perf_counter() - t
        info = json.loads(thaw("inspect", name).stdout)
        run["snapshot_bytes"] = info["size"]
        run["capture_phases"] = info["config"]["phases"]
        run["gpu_bytes_checkpointed"] = info["config"]["sizes"].get("gpu_bytes")
        after = generate(cold.pid())
        run["source_identical_after_capture"] = after["tokens"] == ref["tokens"]
        log(f"run {i}: captured in {run['capture_s']:.2f}s, {info['size'] / 2**30:.2f} GiB; {run['capture_phases']}")
        cold.destroy()
        containers.remove(cold)

        # 3. restore through thaw-runtime, as containerd's shim would call it
        r = thaw_restore(name, cmd, work, paths[1], os.path.join(tmp, f"restore{i}"))
        run["restore_ttft_s"] = r["ttft_s"]
        run["generations_identical"] = r["tokens"] == ref["tokens"]
        run["phases"] = r["phases"]
        log(f"run {i}: restored ttft {r['ttft_s']:.2f}s identical={run['generations_identical']}; {r['phases']}")
        if args.drop_caches:
            drop_caches()
            r = thaw_restore(name, cmd, work, paths[1], os.path.join(tmp, f"restore{i}-cold"))
            run["restore_cold_cache_ttft_s"] = r["ttft_s"]
            run["phases_cold_cache"] = r["phases"]
            run["generations_identical"] &= r["tokens"] == ref["tokens"]
            log(f"run {i}: restored from a cold page cache: ttft {r['ttft_s']:.2f}s; {r['phases']}")

        # 4. stock baseline: the same CRIU image, plain runc restore + CUDA calls, no thaw
        image_dir = os.path.join("/var/tmp/thaw-store/layers", info["layers"][0]["digest"].split(":")[1])
        sb = gpu_bundle(os.path.join(tmp, f"stock{i}"), cmd, work, paths[2])
        swork = tempfile.mkdtemp(prefix="stock-work-")
        t0 = time.perf_counter()
        try:
            run["stock_restore_s"], spid, stock = stock_restore(image_dir, sb, unique("stock"), swork)
            containers.append(stock)
            engine.call(f"{URL}/resume", spid)
            t_ready = wait_ready(spid, 300)
            sgot = generate(spid)
            run["stock_ttft_s"] = t_ready - t0 + sgot["ttft_s"]
            run["stock_generations_identical"] = sgot["tokens"] == ref["tokens"]
        except Exception as exc:  # noqa: BLE001 - the baseline failing is a result, not a crash
            run["stock_restore_s"] = None
            run["stock_error"] = str(exc)[-600:]
        log(f"run {i}: stock restore {run.get('stock_restore_s')}, ttft {run.get('stock_ttft_s')}")
        thaw("rm", name)
        return run
    finally:
        for c in containers:
            c.destroy()
        for n in ns:
            netns_delete(n)


def report(runs: list[dict], out: str) -> None:
    ok = [r for r in runs if "restore_ttft_s" in r]
    nan = float("nan")
    lines = ["| run | cold TTFT (s) | thaw restore TTFT (s) | speed-up | stock restore (s) | stock TTFT (s) | "
             "cold TTFT, cold cache (s) | thaw TTFT, cold cache (s) | snapshot (GiB) | identical |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in ok:
        lines.append(f"| {r['run']} | {r['cold_ttft_s']:.2f} | {r['restore_ttft_s']:.2f} | "
                     f"{r['cold_ttft_s'] / r['restore_ttft_s']:.1f}x | {r.get('stock_restore_s') or nan:.2f} | "
                     f"{r.get('stock_ttft_s') or nan:.2f} | {r.get('cold_cold_cache_ttft_s') or nan:.2f} | "
                     f"{r.get('restore_cold_cache_ttft_s') or nan:.2f} | {r['snapshot_bytes'] / 2**30:.2f} | "
                     f"{r['generations_identical']} |")
    if ok:
        names = [k for k in ok[0]["phases"]]
        lines += ["", "Restore phases, median over runs (s):", "",
                  "| " + " | ".join(names) + " |", "|" + "---|" * len(names),
                  "| " + " | ".join(f"{statistics.median(r['phases'][k] for r in ok):.3f}" for k in names) + " |"]
    text = "\n".join(lines) + "\n"
    open(os.path.join(out, "gpu-e2e.md"), "w").write(text)
    print(text)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(8, 4.5))
        xs = range(len(ok))
        ax.bar([x - 0.27 for x in xs], [r["cold_ttft_s"] for r in ok], 0.27, label="cold start")
        ax.bar([x for x in xs], [r["restore_ttft_s"] for r in ok], 0.27, label="thaw restore")
        ax.bar([x + 0.27 for x in xs], [r.get("stock_ttft_s") or 0 for r in ok], 0.27, label="runc+CRIU+CUDA by hand")
        ax.set_xticks(list(xs), [f"run {r['run']}" for r in ok])
        ax.set_ylabel("time to first token (s)")
        ax.set_title(f"{ok[0]['device']}: {ok[0]['config']} worker, time to first token")
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(out, "gpu-e2e.png"), dpi=110)
    except Exception as exc:  # noqa: BLE001
        print(f"no chart: {exc}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--config", default="qwen3-0.6b")
    ap.add_argument("--kv-fraction", type=float, default=0.5)
    ap.add_argument("--server-arg", action="append", default=[], help="extra server.py argument (repeatable)")
    ap.add_argument("--drop-caches", action="store_true",
                    help="also measure cold start and restore with the page cache dropped (a new node)")
    ap.add_argument("--out", default=os.environ.get("OUT") or os.path.join(ROOT, "bench", "results"))
    ap.add_argument("--thp", choices=["always", "madvise", "never"],
                    help="set transparent hugepages for the run (node tuning; restored afterwards)")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    thp_path = "/sys/kernel/mm/transparent_hugepage/enabled"
    thp_before = re.search(r"\[(\w+)\]", open(thp_path).read()).group(1)
    if args.thp:
        open(thp_path, "w").write(args.thp)
    log(f"transparent hugepages: {open(thp_path).read().strip()}")
    try:
        run_all(args)
    finally:
        open(thp_path, "w").write(thp_before)


def run_all(args) -> None:
    device_name = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                                 capture_output=True, text=True).stdout.strip().splitlines()[0]
    tmp = tempfile.mkdtemp(prefix="gpu-e2e-")
    work = os.path.join(tmp, "work")
    os.makedirs(work)
    shutil.copy(SERVER, work)
    t = time.perf_counter()
    subprocess.run([sys.executable, SERVER, "--init-weights-only", "--config", args.config,
                    "--weights", os.path.join(work, "weights.safetensors")], check=True)
    log(f"weights ready in {time.perf_counter() - t:.1f}s")
    runs = []
    for i in range(1, args.runs + 1):
        try:
            runs.append(one_run(i, args, work, tmp, device_name))
        except Exception as exc:  # noqa: BLE001 - record and go on
            log(f"run {i} FAILED: {exc}")
            runs.append({"run": i, "device": device_name, "error": str(exc)[-2000:]})
        with open(os.path.join(args.out, "gpu-e2e.json"), "w") as f:
            json.dump(runs, f, indent=1)
    report(runs, args.out)
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
