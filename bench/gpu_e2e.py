"""GPU end to end, on the GPU machine: the example inference worker in a runc container that sees
the GPU as NVIDIA's CDI spec would expose it, started cold through thaw-runtime, captured with
quiesce/resume, then restored — side by side in one run, the order alternating between runs:

  fast        thaw-runtime with the node's default fill (thaw's CRIU: several workers, huge pages
              where the node's probe says they help)
  stock_fill  thaw-runtime with `restore.workers: 0` (CRIU's stock single-thread fill)
  by_hand     the same CRIU image, read through the store's API, restored with plain runc and the
              CUDA driver's restore + unlock from a small script: what an operator gets without thaw

each with a hot page cache (`--variants` picks which; stock_fill is off by default); then, with
the page cache dropped (a new node), `fast` timed from the pod sandbox's create (which starts
thaw's prefetch) with the container's create right after it (the real gap is reported), and
`by_hand` timed from its create.

Per phase of each thaw restore: thaw's own (fingerprint, verify, runc restore, CUDA restore,
resume, first token), CRIU's page fill (bytes and seconds from its restore log), the CUDA
restore's rate (GPU state staged by the checkpoint / its seconds) and, with the page cache
dropped, the prefetch (its event). With `--limits FILE` (bench/device/limits.py on the same
machine) the report sets each against the machine's limit: the disk floor of a restore on a new
node is the snapshot's bytes over the measured sequential read rate.

    source bench/device/env.sh && python3 bench/gpu_e2e.py --runs 3 --out DIR [--config qwen3-8b]
    python3 bench/gpu_e2e.py --cpu --runs 1        # the same flow on any machine (tiny CPU worker)
    ... --weights-outside                          # weights outside the snapshot (vLLM preset, reload at resume)

Writes DIR/gpu-e2e.json (one object per run, rewritten after every measurement, so a run cut
short keeps what it had), DIR/gpu-e2e.md and DIR/gpu-e2e.png.
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
from restore_speed import fill_of_largest

from common import ROOT
from helpers import ShimContainer, make_bundle, netns, netns_delete, unique, wait_http_ready
from thaw.oci.annotations import SnapshotRef
from thaw.shim.drivers import engine
from thaw.shim.node.config import load
from thaw.shim.node.store import Store

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
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)   # no CAP_SYS_RESOURCE to go higher
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
    def __init__(self, args, tmp: str, work: str, device: str, save=lambda run: None):
        self.args, self.tmp, self.work, self.device = args, tmp, work, device
        self.save = save                                # writes the results so far (run: the one under way)
        base = load()                                   # THAW_CONFIG: env.sh's on the GPU machine
        self.cfg = base
        self.configs = {"fast": self._config("fast", {}), "stock_fill": self._config("stock_fill", {"workers": 0})}
        self.store = Store.for_config(base)
        self.logs = os.path.join(tmp, "restore-logs")
        self.i = 0
        # The container sees the host's /usr and /opt: on the GPU machine python3 has torch; here
        # thaw's own venv does (the tests' example worker installs it there).
        python = "/opt/thaw/venv/bin/python3" if args.cpu else "python3"
        self.cmd = [python, "/work/server.py", "--config", args.config,
                    "--model" if args.weights_outside else "--weights", "/work/weights.safetensors",
                    "--port", str(PORT), *(["--device", "cpu"] if args.cpu else ["--kv-fraction", str(args.kv_fraction)]),
                    *(["--enable-sleep-mode"] if args.weights_outside else []), *args.server_arg]
        # --weights-outside: the vLLM preset (sleep level 2 before the capture; wake, reload_weights
        # from /work, KV after): the snapshot holds no weights, the restore verifies and prefetches them.
        self.engine = {"thaw.dev/engine": "vllm"} if args.weights_outside else {}

    def _config(self, name: str, restore: dict) -> str:
        with open(self.cfg.source or "/etc/thaw/config.yaml") as f:
            raw = yaml.safe_load(f) or {}
        raw["restore"] = {**(raw.get("restore") or {}), **restore}
        path = os.path.join(self.tmp, f"config-{name}.yaml")
        with open(path, "w") as f:
            yaml.safe_dump(raw, f)
        return path

    def keep_log(self, path: str, name: str) -> dict:
        """CRIU's restore log (its timestamps say where the time outside the page fill goes);
        returns its page fill of the largest process, where thaw's CRIU logged one."""
        os.makedirs(self.logs, exist_ok=True)
        kept = f"run{self.i}-{name}.log"
        try:
            shutil.copy(path, os.path.join(self.logs, kept))
        except OSError as exc:
            log(f"no restore log at {path}: {exc}")
            return {}
        got = fill_of_largest(self.logs, kept)
        return {} if not got or got[1] <= 0 else \
            {"bytes": got[0], "s": round(got[1], 4), "gib_per_s": round(got[0] / 2**30 / got[1], 2)}

    def prefetch_event(self, name: str, since: float, wait_s: float = 20.0) -> dict:
        """The prefetch's own report (thaw's events log) for snapshot `name`, written after `since`."""
        path = os.path.join(self.cfg.state_dir, "events.log")
        deadline = time.monotonic() + wait_s
        while True:
            found = {}
            try:
                with open(path) as f:
                    for line in f:
                        e = json.loads(line)
                        if e.get("kind") == "prefetch" and e.get("snapshot") == name \
                                and e.get("outcome") != "busy" and e.get("time", "") >= time.strftime(
                                    "%Y-%m-%dT%H:%M:%S", time.gmtime(since)):
                            found = e
            except (OSError, ValueError):
                pass
            if found or time.monotonic() > deadline:
                return {k: found[k] for k in ("outcome", "bytes", "seconds", "msg") if k in found}
            time.sleep(0.2)

    def bundle(self, name: str, ns: str, annotations: dict | None = None) -> str:
        return gpu_bundle(os.path.join(self.tmp, unique(name)), self.cmd, self.work, ns, annotations)

    # --- the variants -------------------------------------------------------------------------------
    def cold_start(self, ns: str) -> tuple[ShimContainer, float, dict]:
        """Create + start through thaw-runtime without the annotation (passthrough)."""
        c = ShimContainer("thaw-runtime", RUNC_ROOT, self.bundle("cold", ns, self.engine or None), unique("cold"))
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
        annotations = {"thaw.dev/snapshot": name, **(self.engine or {"thaw.dev/resume": f"{URL}/resume"})}
        env = {"THAW_CONFIG": self.configs[variant]}
        wall0 = time.time()
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
            out["criu_fill"] = self.keep_log(os.path.join(self.cfg.state_dir, "containers", dst.id + ".d",
                                                          "restore.log"), f"{variant}{'-cold-cache' if sandbox else ''}")
            dst.start()
            t_ready = wait_http_ready(dst.pid(), f"{URL}/health", 300)
            got = generate(dst.pid())
            phases = dict(record["phases"])
            phases["runtime"] = round(create_s - phases["total"], 4)      # thaw-runtime process + imports
            phases["first_token"] = round(t_ready - t1 + got["ttft_s"] - create_s, 4)
            out.update(ttft_s=t_ready - t0 + got["ttft_s"], tokens=got["tokens"], phases=phases, fill=record["fill"],
                       runc_restore_s=phases["runc_restore"])
            if sandbox:
                out["prefetch"] = self.prefetch_event(name, wall0)
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
            fill = self.keep_log(os.path.join(swork, "restore.log"), tag)
            if proc.returncode != 0:
                raise RuntimeError(f"stock runc restore failed: {open(os.path.join(swork, 'restore.log')).read()[-800:]}")
            pid = c.pid()
            if not self.args.cpu:
                subprocess.run([sys.executable, "-c", STOCK_CUDA, str(pid)], check=True, timeout=300)
            restore_s = time.perf_counter() - t0
            if self.engine:
                from thaw.oci.annotations import parse_engine_steps
                engine.steps(parse_engine_steps(self.engine).resume, pid, "resume")
            else:
                engine.call(f"{URL}/resume", pid)
            t_ready = wait_http_ready(pid, f"{URL}/health", 300)
            got = generate(pid)
            return {"restore_s": restore_s, "runc_restore_s": t_runc - t0, "ttft_s": t_ready - t0 + got["ttft_s"],
                    "tokens": got["tokens"], "criu_fill": fill}
        finally:
            c.destroy()

    # --- one run ------------------------------------------------------------------------------------
    def run(self, i: int) -> dict:
        ns_names = [unique("gpuns") for _ in range(6)]
        paths = [netns(n) for n in ns_names]
        name = f"gpu-worker:run{i}"
        run: dict = {"run": i, "device": self.device, "config": self.args.config, "worker": os.path.basename(os.path.dirname(os.path.abspath(self.args.worker))), "server_args": self.cmd[2:],
                     "thp": re.search(r"\[(\w+)\]", open("/sys/kernel/mm/transparent_hugepage/enabled").read())[1]}
        containers: list[ShimContainer] = []
        self.i = i
        try:
            cold, run["cold_ttft_s"], ref = self.cold_start(paths[0])
            containers.append(cold)
            run["cold_phases"] = ready_line(cold)
            log(f"run {i}: cold ttft {run['cold_ttft_s']:.2f}s; {run['cold_phases']}")
            self.save(run)

            t = time.perf_counter()
            thaw("capture", cold.id, "--name", name, "--root", RUNC_ROOT,
                 *([] if self.engine else ["--quiesce", f"{URL}/quiesce", "--resume", f"{URL}/resume"]))
            run["capture_s"] = time.perf_counter() - t
            snap = self.store.resolve(SnapshotRef.parse(name), "_local")
            run["snapshot_bytes"] = snap.size
            run["capture_phases"] = snap.config.phases
            run["gpu_bytes_checkpointed"] = snap.config.sizes.gpu_bytes
            run["composition"] = snap.config.sizes.composition
            run["weights"] = snap.config.weights.to_json()
            pages = [f for f in os.listdir(self.store.image_path(snap)) if re.fullmatch(r"pages-\d+\.img", f)]
            run["pages_bytes"] = sum(os.path.getsize(os.path.join(self.store.image_path(snap), f)) for f in pages)
            run["packaging_gib_per_s"] = snap.config.sizes.criu_bytes / 2**30 / max(snap.config.phases["package_criu"], 1e-6)
            after = generate(cold.pid())
            run["source_identical_after_capture"] = after["tokens"] == ref["tokens"]
            log(f"run {i}: captured in {run['capture_s']:.2f}s, {snap.size / 2**30:.2f} GiB "
                f"({run['pages_bytes'] / 2**30:.2f} GiB pages); {run['capture_phases']}; {run['composition']}")
            cold.destroy()
            containers.remove(cold)
            self.save(run)

            identical = True
            order = self.args.variants[:: 1 if i % 2 else -1]
            for k, variant in enumerate(order):
                r = self.by_hand(name, paths[1 + k]) if variant == "by_hand" else \
                    self.thaw_restore(variant, name, paths[1 + k])
                identical &= r["tokens"] == ref["tokens"]
                run[variant] = {k2: v for k2, v in r.items() if k2 != "tokens"}
                run[variant]["identical"] = r["tokens"] == ref["tokens"]
                if "phases" in r and r["phases"].get("cuda_restore"):
                    run[variant]["cuda_restore_gib_per_s"] = round(
                        run["gpu_bytes_checkpointed"] / 2**30 / r["phases"]["cuda_restore"], 2)
                log(f"run {i}: {variant}: ttft {r['ttft_s']:.2f}s, runc restore {r['runc_restore_s']:.2f}s "
                    f"({run['pages_bytes'] / 2**30 / r['runc_restore_s']:.2f} GiB/s; fill {r['criu_fill']}) "
                    f"{r.get('phases', '')}")
                self.save(run)
            run["generations_identical"] = identical
            # The fields earlier runs wrote, kept, plus the new ones.
            run.update(restore_ttft_s=run["fast"]["ttft_s"], phases=run["fast"]["phases"],
                       stock_restore_s=run["by_hand"]["restore_s"], stock_ttft_s=run["by_hand"]["ttft_s"],
                       restore_gib_per_s=run["pages_bytes"] / 2**30 / run["fast"]["runc_restore_s"],
                       by_hand_gib_per_s=run["pages_bytes"] / 2**30 / run["by_hand"]["runc_restore_s"])
            if "stock_fill" in run:
                run.update(stock_page_restore_ttft_s=run["stock_fill"]["ttft_s"],
                           stock_fill_gib_per_s=run["pages_bytes"] / 2**30 / run["stock_fill"]["runc_restore_s"])
            if not self.args.no_cold_cache:
                drop_caches()
                r = self.thaw_restore("fast", name, paths[4], sandbox=True)
                identical &= r["tokens"] == ref["tokens"]
                run["fast_cold_cache"] = {k2: v for k2, v in r.items() if k2 != "tokens"}
                run["fast_cold_cache"]["identical"] = r["tokens"] == ref["tokens"]
                log(f"run {i}: fast, page cache dropped, from the sandbox's create: ttft {r['ttft_s']:.2f}s "
                    f"(sandbox gap {r['sandbox_gap_s']:.2f}s; prefetch {r['prefetch']}; fill {r['criu_fill']}) "
                    f"{r['phases']}")
                self.save(run)
                drop_caches()
                r = self.by_hand(name, paths[5], "by_hand-cold-cache")
                identical &= r["tokens"] == ref["tokens"]
                run["by_hand_cold_cache"] = {k2: v for k2, v in r.items() if k2 != "tokens"}
                run["by_hand_cold_cache"]["identical"] = r["tokens"] == ref["tokens"]
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


def med(values) -> float:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else float("nan")


def against_limits(runs: list[dict], limits: dict) -> dict:
    """Medians over the runs set against the machine's limits and the issue's goals."""
    ok = [r for r in runs if "restore_ttft_s" in r]
    if not ok:
        return {}
    disk = (limits.get("disk") or {}).get("best_gib_per_s")
    fill_limit = (limits.get("page_fill") or {}).get("best_gib_per_s")
    out = {"restore_ttft_s": med(r["restore_ttft_s"] for r in ok),
           "by_hand_ttft_s": med(r["stock_ttft_s"] for r in ok),
           "thaw_vs_by_hand": med(r["stock_ttft_s"] / r["restore_ttft_s"] for r in ok),
           "cold_ttft_s": med(r["cold_ttft_s"] for r in ok),
           "criu_fill_gib_per_s": med(r["fast"].get("criu_fill", {}).get("gib_per_s") for r in ok),
           "cuda_restore_gib_per_s": med(r["fast"].get("cuda_restore_gib_per_s") for r in ok),
           "snapshot_gib": ok[0]["snapshot_bytes"] / 2**30}
    if fill_limit:
        out["page_fill_limit_gib_per_s"] = fill_limit
        out["criu_fill_of_limit"] = out["criu_fill_gib_per_s"] / fill_limit
    h2d = (limits.get("h2d") or {}).get("pinned_h2d_gib_per_s")
    if h2d:
        out["pinned_h2d_limit_gib_per_s"] = h2d
    outside = [r for r in ok if (r.get("weights") or {}).get("outside")]
    if outside:
        # Weights outside the snapshot come back in the resume step (wake + reload from the page
        # cache): its seconds bound the reload rate from below.
        out["weights_gib"] = outside[0]["weights"]["bytes"] / 2**30
        out["weights_reload_gib_per_s"] = med(r["weights"]["bytes"] / 2**30 / r["fast"]["phases"]["resume"]
                                              for r in outside if r["fast"].get("phases", {}).get("resume"))
    cc = [r for r in ok if "restore_cold_cache_ttft_s" in r]
    if cc:
        out["cold_cache_ttft_s"] = med(r["restore_cold_cache_ttft_s"] for r in cc)
        out["by_hand_cold_cache_ttft_s"] = med(r.get("stock_cold_cache_ttft_s") for r in cc)
        if disk:
            # What a new node must read before the worker can answer: the snapshot, and the weights
            # when they are outside it.
            must_read = ok[0]["snapshot_bytes"] + ((ok[0].get("weights") or {}).get("bytes", 0) if outside else 0)
            out["disk_gib_per_s"] = disk
            out["disk_floor_s"] = must_read / 2**30 / disk
            out["cold_cache_vs_floor"] = out["cold_cache_ttft_s"] / out["disk_floor_s"]
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()}


PHASES = [("fingerprint+verify", ("fingerprint", "verify_layer")), ("runc restore (CRIU)", ("runc_restore",)),
          ("CUDA restore", ("cuda_init_wait", "cuda_restore", "cuda_unlock")), ("resume", ("resume",)),
          ("thaw-runtime + rest", ("resolve", "rootfs", "runtime")), ("start + first token", ("first_token",))]


def report(runs: list[dict], out: str, limits: dict | None = None) -> dict:
    ok = [r for r in runs if "restore_ttft_s" in r]
    nan = float("nan")
    lines = ["| run | cold TTFT | thaw TTFT | by hand TTFT | thaw vs by hand | thaw stock-fill TTFT | "
             "CRIU fill GiB/s (thaw / by hand) | CUDA restore GiB/s | thaw TTFT, cache dropped (gap) | "
             "prefetch | by hand, cache dropped | snapshot GiB | identical |", "|" + "---|" * 13]
    for r in ok:
        cc = r.get("fast_cold_cache", {})
        pf = cc.get("prefetch") or {}
        lines.append(
            f"| {r['run']} | {r['cold_ttft_s']:.2f} | {r['restore_ttft_s']:.2f} | {r['stock_ttft_s']:.2f} | "
            f"{r['stock_ttft_s'] / r['restore_ttft_s']:.2f}x | {r.get('stock_page_restore_ttft_s', nan):.2f} | "
            f"{r['fast'].get('criu_fill', {}).get('gib_per_s', nan):.2f} / "
            f"{r['by_hand'].get('criu_fill', {}).get('gib_per_s', nan):.2f} | "
            f"{r['fast'].get('cuda_restore_gib_per_s', nan):.2f} | "
            + (f"{cc['ttft_s']:.2f} ({cc['sandbox_gap_s']:.2f})" if cc else "-") + " | "
            + (f"{pf.get('outcome')} {pf.get('bytes', 0) / 2**30:.2f} GiB in {pf.get('seconds', 0):.2f}s" if pf else "-")
            + f" | {r.get('stock_cold_cache_ttft_s') or nan:.2f} | {r['snapshot_bytes'] / 2**30:.2f} | "
            f"{r['generations_identical']} |")
    summary = against_limits(runs, limits or {})
    if ok:
        lines += ["", f"Restore phases of thaw's path, median over runs (s); fill: {ok[0]['fast']['fill']}", ""]
        for label, key in (("hot page cache", "fast"), ("page cache dropped", "fast_cold_cache")):
            rs = [r for r in ok if key in r]
            if not rs:
                continue
            names = list(rs[0][key]["phases"])
            lines += [f"{label}:", "", "| " + " | ".join(names) + " |", "|" + "---|" * len(names),
                      "| " + " | ".join(f"{med(r[key]['phases'].get(k) for r in rs):.3f}" for k in names) + " |", ""]
        lines += ["Snapshot composition (GiB): " + ", ".join(f"{k} {v / 2**30:.2f}" for k, v in ok[0]["composition"].items())
                  + f"; GPU state staged by the CUDA checkpoint {ok[0]['gpu_bytes_checkpointed'] / 2**30:.2f}"]
    if summary:
        lines += ["", "Medians against the machine's limits: " + ", ".join(f"{k} {v}" for k, v in summary.items())]
    text = "\n".join(lines) + "\n"
    open(os.path.join(out, "gpu-e2e.md"), "w").write(text)
    print(text)
    try:
        plot(ok, summary, os.path.join(out, "gpu-e2e.png"))
    except Exception as exc:  # noqa: BLE001
        print(f"no chart: {exc}")
    return summary


def plot(ok: list[dict], summary: dict, path: str) -> None:
    """Left: time to first token of each variant per run. Right: thaw's restore by phase (median),
    hot and with the page cache dropped, beside the disk floor."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    if not ok:
        return
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [3, 2]})
    bars = [("cold start", lambda r: r["cold_ttft_s"]), ("thaw", lambda r: r["restore_ttft_s"]),
            ("by hand (runc + stock CRIU + CUDA)", lambda r: r["stock_ttft_s"]),
            ("thaw, cache dropped", lambda r: r.get("restore_cold_cache_ttft_s")),
            ("by hand, cache dropped", lambda r: r.get("stock_cold_cache_ttft_s"))]
    bars = [(label, f) for label, f in bars if any(f(r) is not None for r in ok)]
    w = 0.8 / len(bars)
    for k, (label, f) in enumerate(bars):
        xs = [x + (k - (len(bars) - 1) / 2) * w for x in range(len(ok))]
        ax.bar(xs, [f(r) or 0 for r in ok], w, label=label)
    ax.set_xticks(range(len(ok)), [f"run {r['run']}" for r in ok])
    ax.set_ylabel("time to first token (s)")
    ax.set_title(f"{ok[0]['device']}: {ok[0]['config']} worker")
    ax.legend(fontsize=8)
    cols = []
    for label, key in (("hot", "fast"), ("cache dropped", "fast_cold_cache")):
        rs = [r for r in ok if key in r]
        if rs:
            cols.append((label, [med(sum(r[key]["phases"].get(p, 0) for p in parts) for r in rs) for _, parts in PHASES]))
    bottom = [0.0] * len(cols)
    for j, (name, _) in enumerate(PHASES):
        vals = [c[1][j] for c in cols]
        bx.bar([c[0] for c in cols], vals, 0.5, bottom=bottom, label=name)
        bottom = [b + v for b, v in zip(bottom, vals)]
    if "disk_floor_s" in summary:
        bx.axhline(summary["disk_floor_s"], color="k", ls="--", lw=1,
                   label=f"disk floor {summary['disk_floor_s']:.2f}s ({summary['disk_gib_per_s']} GiB/s)")
    bx.set_ylabel("seconds (median)")
    bx.set_title("thaw restore by phase")
    bx.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--config", default=None, help="worker config (default qwen3-0.6b; tiny with --cpu)")
    ap.add_argument("--kv-fraction", type=float, default=0.5)
    ap.add_argument("--server-arg", action="append", default=[], help="extra server.py argument (repeatable)")
    ap.add_argument("--variants", default="fast,by_hand", type=lambda v: v.split(","),
                    help="hot-cache restores, in this order on odd runs, reversed on even (fast,by_hand[,stock_fill])")
    ap.add_argument("--no-cold-cache", action="store_true", help="skip the page-cache-dropped measurements")
    ap.add_argument("--limits", help="bench/device/limits.py's JSON from this machine (disk floor, fill limit)")
    ap.add_argument("--cpu", action="store_true", help="the tiny worker on the CPU: the flow, on any machine")
    ap.add_argument("--worker", default=SERVER, help="the worker to run (the example inference worker's protocol; "
                    "examples/transformers-worker/worker.py draws its own weights)")
    ap.add_argument("--weights-outside", action="store_true",
                    help="the worker in sleep mode under the vLLM preset: weights leave before the capture "
                         "and are reloaded from /work at resume (issue 21)")
    ap.add_argument("--out", default=os.environ.get("OUT") or os.path.join(ROOT, "bench", "results"))
    ap.add_argument("--report-only", metavar="JSON", help="redo the report and chart from a results file")
    args = ap.parse_args()
    if not {"fast", "by_hand"} <= set(args.variants) <= {"fast", "by_hand", "stock_fill"}:
        ap.error("--variants: fast and by_hand, optionally stock_fill")
    limits = json.load(open(args.limits)) if args.limits and os.path.exists(args.limits) else {}
    if args.report_only:
        data = json.load(open(args.report_only))
        summary = report(data["runs"], args.out, limits or data.get("limits"))
        json.dump({**data, "limits": limits or data.get("limits"), "summary": summary},
                  open(os.path.join(args.out, "gpu-e2e.json"), "w"), indent=1)
        return
    args.config = args.config or ("tiny" if args.cpu else "qwen3-0.6b")
    os.makedirs(args.out, exist_ok=True)
    device = "cpu" if args.cpu else subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                                                   capture_output=True, text=True).stdout.strip().splitlines()[0]
    probe = subprocess.run(["thaw", "doctor", "--skip-containerd"], capture_output=True, text=True).stdout
    log("; ".join(line for line in probe.splitlines() if "fast restore" in line or "criu" in line))
    tmp = tempfile.mkdtemp(prefix="gpu-e2e-", dir=os.environ.get("GPU_E2E_TMP"))
    work = os.path.join(tmp, "work")
    os.makedirs(work)
    shutil.copy(args.worker, os.path.join(work, "server.py"))
    if os.path.samefile(args.worker, SERVER):
        t = time.perf_counter()
        subprocess.run([sys.executable, SERVER, "--init-weights-only", "--config", args.config,
                        "--weights", os.path.join(work, "weights.safetensors")], check=True)
        log(f"weights ready in {time.perf_counter() - t:.1f}s")
    runs: list[dict] = []

    def save(current: dict | None = None) -> None:
        with open(os.path.join(args.out, "gpu-e2e.json"), "w") as f:
            json.dump({"doctor": probe, "limits": limits, "runs": runs + ([current] if current else [])}, f, indent=1)

    bench = Bench(args, tmp, work, device, save)
    try:
        for i in range(1, args.runs + 1):
            runs.append(bench.run(i))
            save()
        summary = report(runs, args.out, limits)
        with open(os.path.join(args.out, "gpu-e2e.json"), "w") as f:
            json.dump({"doctor": probe, "limits": limits, "summary": summary, "runs": runs}, f, indent=1)
    finally:
        if os.path.isdir(bench.logs):
            subprocess.run(["tar", "-czf", os.path.join(args.out, "restore-logs.tar.gz"), "-C", tmp, "restore-logs"])
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
