"""GPU end to end, on the GPU machine: the example inference worker in a runc container that sees
the GPU as NVIDIA's CDI spec would expose it, started cold through thaw-runtime, captured with
quiesce/resume, then restored — side by side in one run, the order alternating between runs:

  fast        thaw-runtime with the node's default fill (thaw's CRIU: several workers, huge pages
              where the node's probe says they help)
  stock_fill  thaw-runtime with `restore.workers: 0` (CRIU's stock single-thread fill)
  by_hand     the same CRIU image, read through the store's API, restored with plain runc and the
              CUDA driver's restore + unlock from a small script: what an operator gets without thaw

each with a hot page cache; then, with the page cache dropped (a new node), `fast` timed from the
pod sandbox's create (which starts thaw's prefetch) with the container's create right after it
(the real gap is reported), and `by_hand` timed from its create.

    source bench/device/env.sh && python3 bench/gpu_e2e.py --runs 3 --out DIR [--config qwen3-4b]
    python3 bench/gpu_e2e.py --cpu --runs 1        # the same flow on any machine (tiny CPU worker)

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

import yaml

from common import ROOT
from helpers import ShimContainer, make_bundle, netns, netns_delete, unique, wait_http_ready
from thaw.oci.annotations import SnapshotRef
from thaw.shim import engine
from thaw.shim.config import load
from thaw.shim.store import Store

SERVER = os.path.join(ROOT, "examples", "inference-server", "server.py")
PORT = 8000
URL = f"http://127.0.0.1:{PORT}"
PROMPT = {"prompt": "thaw restores warm GPU workers in seconds", "max_tokens": 32}
RUNC_ROOT = "/run/thaw-gpu-bench"
HOST_TOPS = ["/usr", "/etc", "/opt"]
IMAGE = "thaw-bench/inference-server:1"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def gpu_bundle(path: str, args: list[str], work: str, ns: str, annotations: dict | None = None) -> str:
    """The shape NVIDIA's CDI spec gives a container: host /usr, /etc, /opt read-only (each bound
    non-recursively, every mount below them as its own entry, so that CRIU knows them), the
    /dev/nvidia* nodes as devices, allowed in the device cgroup."""
    env = [f"{k}={v}" for k, v in os.environ.items()
           if k in ("PATH", "LD_LIBRARY_PATH", "HOME") or k.startswith(("CUDA", "NVIDIA"))]
    env += ["PYTHONUNBUFFERED=1", "HOME=/root"]
    make_bundle(path, args, python=True, netns=ns, env=env, annotations=annotations, binds={"/work": work},
                image=IMAGE)
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


def generate(pid: int) -> dict:
    """POST /generate from inside the container's network namespace."""
    with engine.ContainerView(pid) as view:
        status, body = view.request(f"{URL}/generate", "POST", 180, json_body=PROMPT)
    if status != 200:
        raise RuntimeError(f"/generate answered {status}: {body[:400]}")
    return json.loads(body)


def ready_line(c: ShimContainer) -> dict:
    m = re.search(r"READY (\{.*\})", c.output())
    return json.loads(m.group(1)) if m else {}


def thaw(*args: str, config: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **({"THAW_CONFIG": config} if config else {})}
    proc = subprocess.run(["thaw", *args], capture_output=True, text=True, timeout=900, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"thaw {' '.join(args)}: {proc.stderr[-1500:]}")
    return proc


STOCK_CUDA = r"""
import sys
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


def drop_caches() -> None:
    subprocess.run(["sync"], check=True)
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


class Bench:
    def __init__(self, args, tmp: str, work: str, device: str):
        self.args, self.tmp, self.work, self.device = args, tmp, work, device
        base = load()                                   # THAW_CONFIG: env.sh's on the GPU machine
        self.cfg = base
        self.configs = {"fast": self._config("fast", {}), "stock_fill": self._config("stock_fill", {"workers": 0})}
        self.store = Store.for_config(base)
        self.logs = os.path.join(tmp, "restore-logs")
        self.i = 0
        # The container sees the host's /usr and /opt: on the GPU machine python3 has torch; here
        # thaw's own venv does (the tests' example worker installs it there).
        python = "/opt/thaw/venv/bin/python3" if args.cpu else "python3"
        self.cmd = [python, "/work/server.py", "--config", args.config, "--weights", "/work/weights.safetensors",
                    "--port", str(PORT), *(["--device", "cpu"] if args.cpu else ["--kv-fraction", str(args.kv_fraction)]),
                    *args.server_arg]

    def _config(self, name: str, restore: dict) -> str:
        with open(self.cfg.source or "/etc/thaw/config.yaml") as f:
            raw = yaml.safe_load(f) or {}
        raw["restore"] = {**(raw.get("restore") or {}), **restore}
        path = os.path.join(self.tmp, f"config-{name}.yaml")
        with open(path, "w") as f:
            yaml.safe_dump(raw, f)
        return path

    def keep_log(self, path: str, name: str) -> None:
        """CRIU's restore log (its timestamps say where the time outside the page fill goes)."""
        os.makedirs(self.logs, exist_ok=True)
        try:
            shutil.copy(path, os.path.join(self.logs, f"run{self.i}-{name}.log"))
        except OSError as exc:
            log(f"no restore log at {path}: {exc}")

    def bundle(self, name: str, ns: str, annotations: dict | None = None) -> str:
        return gpu_bundle(os.path.join(self.tmp, unique(name)), self.cmd, self.work, ns, annotations)

    # --- the variants -------------------------------------------------------------------------------
    def cold_start(self, ns: str) -> tuple[ShimContainer, float, dict]:
        """Create + start through thaw-runtime without the annotation (passthrough)."""
        c = ShimContainer("thaw-runtime", RUNC_ROOT, self.bundle("cold", ns), unique("cold"))
        try:
            t0 = time.perf_counter()
            assert c.create() == 0, c.log_text()
            c.start()
            t_ready = wait_http_ready(c.pid(), f"{URL}/health", 900)
            first = generate(c.pid())
        except BaseException:
            c.destroy()
            raise
        return c, t_ready - t0 + first["ttft_s"], first

    def thaw_restore(self, variant: str, name: str, ns: str, sandbox: bool = False) -> dict:
        """Create + start a container asking for `name` through thaw-runtime; time to first token.
        sandbox: first create the pod's sandbox (which starts the prefetch) and time from there."""
        annotations = {"thaw.dev/snapshot": name, "thaw.dev/resume": f"{URL}/resume"}
        env = {"THAW_CONFIG": self.configs[variant]}
        dst = ShimContainer("thaw-runtime", RUNC_ROOT, self.bundle("restored", ns, annotations), unique("restored"))
        box = None
        out: dict = {}
        try:
            t0 = time.perf_counter()
            if sandbox:
                box = ShimContainer("thaw-runtime", RUNC_ROOT, gpu_bundle(
                    os.path.join(self.tmp, unique("sandbox")), ["/usr/bin/sleep", "100000"], self.work, ns, {
                        "io.kubernetes.cri.container-type": "sandbox", "thaw.dev/snapshot": name}),
                    unique("sandbox"))
                assert box.create(env=env) == 0, box.log_text()
                box.start()
                out["sandbox_gap_s"] = time.perf_counter() - t0
            t1 = time.perf_counter()
            rc = dst.create(env=env)
            create_s = time.perf_counter() - t1
            problems = [e["msg"] for e in dst.log_entries() if e.get("level") == "error" or "cold start" in e.get("msg", "")]
            if rc != 0 or problems:
                raise RuntimeError(f"{variant} restore did not happen: rc={rc} {problems}")
            record = json.load(open(os.path.join(self.cfg.state_dir, "containers", dst.id + ".json")))
            self.keep_log(os.path.join(self.cfg.state_dir, "containers", dst.id + ".d", "restore.log"),
                          f"{variant}{'-cold-cache' if sandbox else ''}")
            dst.start()
            t_ready = wait_http_ready(dst.pid(), f"{URL}/health", 300)
            got = generate(dst.pid())
            phases = dict(record["phases"])
            phases["runtime"] = round(create_s - phases["total"], 4)      # thaw-runtime process + imports
            phases["first_token"] = round(t_ready - t1 + got["ttft_s"] - create_s, 4)
            out.update(ttft_s=t_ready - t0 + got["ttft_s"], tokens=got["tokens"], phases=phases, fill=record["fill"],
                       runc_restore_s=phases["runc_restore"])
            return out
        finally:
            dst.destroy()
            if box is not None:
                box.destroy()

    def by_hand(self, name: str, ns: str, tag: str = "by_hand") -> dict:
        """runc restore of the snapshot's CRIU image (its path from the store's API), then the
        CUDA driver's restore + unlock from a small script (its own cuInit), then /resume."""
        snap = self.store.resolve(SnapshotRef.parse(name), "_local")
        cid = unique("stock")
        c = ShimContainer("runc", RUNC_ROOT, self.bundle("stock", ns), cid)
        swork = tempfile.mkdtemp(prefix="stock-work-", dir=self.tmp)
        try:
            with self.store.image_dir(snap) as image_dir:
                t0 = time.perf_counter()
                with c.pipes() as (out_w, err_w):
                    proc = subprocess.run(["runc", "--root", RUNC_ROOT, "--criu", shutil.which("criu"), "restore",
                                           "--detach", "--image-path", image_dir, "--work-path", swork, "--bundle",
                                           c.bundle, "--pid-file", c.pid_file, cid],
                                          stdin=subprocess.DEVNULL, stdout=out_w, stderr=err_w, timeout=600)
                t_runc = time.perf_counter()
            self.keep_log(os.path.join(swork, "restore.log"), tag)
            if proc.returncode != 0:
                raise RuntimeError(f"stock runc restore failed: {open(os.path.join(swork, 'restore.log')).read()[-800:]}")
            pid = c.pid()
            if not self.args.cpu:
                subprocess.run([sys.executable, "-c", STOCK_CUDA, str(pid)], check=True, timeout=300)
            restore_s = time.perf_counter() - t0
            engine.call(f"{URL}/resume", pid)
            t_ready = wait_http_ready(pid, f"{URL}/health", 300)
            got = generate(pid)
            return {"restore_s": restore_s, "runc_restore_s": t_runc - t0, "ttft_s": t_ready - t0 + got["ttft_s"],
                    "tokens": got["tokens"]}
        finally:
            c.destroy()

    # --- one run ------------------------------------------------------------------------------------
    def run(self, i: int) -> dict:
        ns_names = [unique("gpuns") for _ in range(6)]
        paths = [netns(n) for n in ns_names]
        name = f"gpu-worker:run{i}"
        run: dict = {"run": i, "device": self.device, "config": self.args.config, "server_args": self.cmd[2:],
                     "thp": re.search(r"\[(\w+)\]", open("/sys/kernel/mm/transparent_hugepage/enabled").read())[1]}
        containers: list[ShimContainer] = []
        self.i = i
        try:
            cold, run["cold_ttft_s"], ref = self.cold_start(paths[0])
            containers.append(cold)
            run["cold_phases"] = ready_line(cold)
            log(f"run {i}: cold ttft {run['cold_ttft_s']:.2f}s; {run['cold_phases']}")

            t = time.perf_counter()
            thaw("capture", cold.id, "--name", name, "--root", RUNC_ROOT,
                 "--quiesce", f"{URL}/quiesce", "--resume", f"{URL}/resume")
            run["capture_s"] = time.perf_counter() - t
            snap = self.store.resolve(SnapshotRef.parse(name), "_local")
            run["snapshot_bytes"] = snap.size
            run["capture_phases"] = snap.config.phases
            run["gpu_bytes_checkpointed"] = snap.config.sizes.gpu_bytes
            run["composition"] = snap.config.sizes.composition
            pages = [f for f in os.listdir(self.store.image_path(snap)) if re.fullmatch(r"pages-\d+\.img", f)]
            run["pages_bytes"] = sum(os.path.getsize(os.path.join(self.store.image_path(snap), f)) for f in pages)
            run["packaging_gib_per_s"] = snap.config.sizes.criu_bytes / 2**30 / max(snap.config.phases["package_criu"], 1e-6)
            after = generate(cold.pid())
            run["source_identical_after_capture"] = after["tokens"] == ref["tokens"]
            log(f"run {i}: captured in {run['capture_s']:.2f}s, {snap.size / 2**30:.2f} GiB "
                f"({run['pages_bytes'] / 2**30:.2f} GiB pages); {run['capture_phases']}; {run['composition']}")
            cold.destroy()
            containers.remove(cold)

            identical = True
            order = ["fast", "stock_fill", "by_hand"][:: 1 if i % 2 else -1]
            for k, variant in enumerate(order):
                r = self.by_hand(name, paths[1 + k]) if variant == "by_hand" else \
                    self.thaw_restore(variant, name, paths[1 + k])
                identical &= r["tokens"] == ref["tokens"]
                run[variant] = {k2: v for k2, v in r.items() if k2 != "tokens"}
                log(f"run {i}: {variant}: ttft {r['ttft_s']:.2f}s, runc restore {r['runc_restore_s']:.2f}s "
                    f"({run['pages_bytes'] / 2**30 / r['runc_restore_s']:.2f} GiB/s) {r.get('phases', '')}")
            run["generations_identical"] = identical
            # The fields earlier runs wrote, kept, plus the new ones.
            run.update(restore_ttft_s=run["fast"]["ttft_s"], phases=run["fast"]["phases"],
                       stock_page_restore_ttft_s=run["stock_fill"]["ttft_s"],
                       stock_restore_s=run["by_hand"]["restore_s"], stock_ttft_s=run["by_hand"]["ttft_s"],
                       restore_gib_per_s=run["pages_bytes"] / 2**30 / run["fast"]["runc_restore_s"],
                       stock_fill_gib_per_s=run["pages_bytes"] / 2**30 / run["stock_fill"]["runc_restore_s"],
                       by_hand_gib_per_s=run["pages_bytes"] / 2**30 / run["by_hand"]["runc_restore_s"])
            if not self.args.no_cold_cache:
                drop_caches()
                r = self.thaw_restore("fast", name, paths[4], sandbox=True)
                identical &= r["tokens"] == ref["tokens"]
                run["fast_cold_cache"] = {k2: v for k2, v in r.items() if k2 != "tokens"}
                log(f"run {i}: fast, page cache dropped, from the sandbox's create: ttft {r['ttft_s']:.2f}s "
                    f"(sandbox gap {r['sandbox_gap_s']:.2f}s) {r['phases']}")
                drop_caches()
                r = self.by_hand(name, paths[5], "by_hand-cold-cache")
                identical &= r["tokens"] == ref["tokens"]
                run["by_hand_cold_cache"] = {k2: v for k2, v in r.items() if k2 != "tokens"}
                log(f"run {i}: by hand, page cache dropped: ttft {r['ttft_s']:.2f}s")
                run["generations_identical"] = identical
            if "fast_cold_cache" in run:
                run.update(restore_cold_cache_ttft_s=run["fast_cold_cache"]["ttft_s"],
                           stock_cold_cache_ttft_s=run["by_hand_cold_cache"]["ttft_s"],
                           sandbox_gap_s=run["fast_cold_cache"]["sandbox_gap_s"])
            thaw("rm", name)
            return run
        except Exception as exc:  # noqa: BLE001 - keep what was measured, say what failed
            log(f"run {i} FAILED: {exc}")
            run["error"] = str(exc)[-2000:]
            subprocess.run(["thaw", "rm", name], capture_output=True)
            return run
        finally:
            for c in containers:
                c.destroy()
            for n in ns_names:
                netns_delete(n)


def report(runs: list[dict], out: str) -> None:
    ok = [r for r in runs if "restore_ttft_s" in r]
    nan = float("nan")
    lines = ["| run | cold TTFT | thaw fast TTFT | thaw stock-fill TTFT | by hand TTFT | fast vs by hand | "
             "fast GiB/s | stock-fill GiB/s | by hand GiB/s | fast TTFT, cache dropped (gap) | by hand, cache dropped | "
             "snapshot GiB | identical |", "|" + "---|" * 13]
    for r in ok:
        cc = f"{r['restore_cold_cache_ttft_s']:.2f} ({r['sandbox_gap_s']:.2f})" if "sandbox_gap_s" in r else "-"
        lines.append(f"| {r['run']} | {r['cold_ttft_s']:.2f} | {r['restore_ttft_s']:.2f} | "
                     f"{r['stock_page_restore_ttft_s']:.2f} | {r['stock_ttft_s']:.2f} | "
                     f"{r['stock_ttft_s'] / r['restore_ttft_s']:.2f}x | {r['restore_gib_per_s']:.2f} | "
                     f"{r['stock_fill_gib_per_s']:.2f} | {r['by_hand_gib_per_s']:.2f} | {cc} | "
                     f"{r.get('stock_cold_cache_ttft_s') or nan:.2f} | {r['snapshot_bytes'] / 2**30:.2f} | "
                     f"{r['generations_identical']} |")
    if ok:
        lines += ["", f"Restore phases of the fast path, median over runs (s); fill: {ok[0]['fast']['fill']}", ""]
        names = list(ok[0]["phases"])
        lines += ["| " + " | ".join(names) + " |", "|" + "---|" * len(names),
                  "| " + " | ".join(f"{statistics.median(r['phases'].get(k, nan) for r in ok):.3f}" for k in names) + " |"]
        lines += ["", "Snapshot composition (GiB): " + ", ".join(f"{k} {v / 2**30:.2f}" for k, v in ok[0]["composition"].items())
                  + f"; GPU state staged by the CUDA checkpoint {ok[0]['gpu_bytes_checkpointed'] / 2**30:.2f}"]
    text = "\n".join(lines) + "\n"
    open(os.path.join(out, "gpu-e2e.md"), "w").write(text)
    print(text)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(9, 4.5))
        xs = range(len(ok))
        bars = [("cold start", "cold_ttft_s"), ("thaw (fast fill)", "restore_ttft_s"),
                ("thaw (stock fill)", "stock_page_restore_ttft_s"), ("runc+CRIU+CUDA by hand", "stock_ttft_s")]
        w = 0.2
        for k, (label, key) in enumerate(bars):
            ax.bar([x + (k - 1.5) * w for x in xs], [r[key] for r in ok], w, label=label)
        ax.set_xticks(list(xs), [f"run {r['run']}" for r in ok])
        ax.set_ylabel("time to first token (s)")
        ax.set_title(f"{ok[0]['device']}: {ok[0]['config']} worker, time to first token (hot page cache)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(out, "gpu-e2e.png"), dpi=110)
    except Exception as exc:  # noqa: BLE001
        print(f"no chart: {exc}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--config", default=None, help="worker config (default qwen3-0.6b; tiny with --cpu)")
    ap.add_argument("--kv-fraction", type=float, default=0.5)
    ap.add_argument("--server-arg", action="append", default=[], help="extra server.py argument (repeatable)")
    ap.add_argument("--no-cold-cache", action="store_true", help="skip the page-cache-dropped measurements")
    ap.add_argument("--cpu", action="store_true", help="the tiny worker on the CPU: the flow, on any machine")
    ap.add_argument("--out", default=os.environ.get("OUT") or os.path.join(ROOT, "bench", "results"))
    args = ap.parse_args()
    args.config = args.config or ("tiny" if args.cpu else "qwen3-0.6b")
    os.makedirs(args.out, exist_ok=True)
    device = "cpu" if args.cpu else subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                                                   capture_output=True, text=True).stdout.strip().splitlines()[0]
    probe = subprocess.run(["thaw", "doctor", "--skip-containerd"], capture_output=True, text=True).stdout
    log("; ".join(line for line in probe.splitlines() if "fast restore" in line or "criu" in line))
    tmp = tempfile.mkdtemp(prefix="gpu-e2e-")
    work = os.path.join(tmp, "work")
    os.makedirs(work)
    shutil.copy(SERVER, work)
    t = time.perf_counter()
    subprocess.run([sys.executable, SERVER, "--init-weights-only", "--config", args.config,
                    "--weights", os.path.join(work, "weights.safetensors")], check=True)
    log(f"weights ready in {time.perf_counter() - t:.1f}s")
    bench = Bench(args, tmp, work, device)
    runs = []
    for i in range(1, args.runs + 1):
        runs.append(bench.run(i))
        with open(os.path.join(args.out, "gpu-e2e.json"), "w") as f:
            json.dump({"doctor": probe, "runs": runs}, f, indent=1)
    report(runs, args.out)
    if os.path.isdir(bench.logs):
        subprocess.run(["tar", "-czf", os.path.join(args.out, "restore-logs.tar.gz"), "-C", tmp, "restore-logs"])
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
