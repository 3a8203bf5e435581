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

    python3 bench/weights.py --loaders [--sizes 64,256,1024] [--runs 5] [--device cpu|cuda]

compares the worker's two reload paths on the same file instead (no container, no root):
`--loader own` (parallel preads; multi-stream pinned on CUDA) and `--loader fastsafetensors`
(IBM's; no GDS), each a wake as the worker does it (the arena released, mapped again, filled from
the file), in alternating order, page cache hot (the file read once before) and cold (its pages
dropped with POSIX_FADV_DONTNEED before each load: this file only, no global drop_caches on a
shared machine); checks both load the same bytes. Writes bench/results/weights-loaders-*.json.

    python3 bench/weights.py --sweep 4,8,12,16:8,16,32,64 [--sizes 4096] [--runs 3] [--device cuda]

times the worker's own loader alone (page cache hot, alternating order, on CUDA into VMM memory as
the worker's sleep mode holds it) for each number of readers (CUDA streams) and chunk size (MiB),
checks every load's bytes against the file, and names the fastest: --json PATH also writes the
result there (bench/device/session.sh hands the best to the worker). Writes
bench/results/weights-sweep-*.json.
"""

from __future__ import annotations

import argparse
import hashlib
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


def _worker_module():
    import importlib.util

    import torch
    spec = importlib.util.spec_from_file_location("thaw_example_server", SERVER)
    assert spec is not None and spec.loader is not None
    srv = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(srv)
    srv.torch = torch  # the worker imports torch in Engine.load(); the arena reads the global
    return srv, torch


def sweep(args: argparse.Namespace) -> None:
    from safetensors.torch import save_file
    srv, torch = _worker_module()
    streams, chunks = ([int(x) for x in part.split(",")] for part in args.sweep.split(":"))
    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())   # VMM needs the ordinal
    mib = args.sizes[-1]
    out: dict = {"machine": machine(), "device": str(device), "runs": args.runs, "mib": mib,
                 "torch": torch.__version__, "rows": []}
    tmp = tempfile.mkdtemp(prefix="thaw-loader-sweep-", dir=args.dir)
    try:
        path = os.path.join(tmp, "w.safetensors")
        save_file({f"layer{i}.w": torch.randn(mib << 20 >> 1 >> 6, device=device).to(torch.bfloat16).cpu()
                   for i in range(64)}, path)
        arena = srv.WeightArena(path, device, torch.bfloat16, vmm=device.type == "cuda")
        arena.load(8, 16 << 20)                               # the file into the page cache
        if _arena_digest(arena) != _file_digest(path, arena):
            raise SystemExit("--sweep: the first load does not hold the file's bytes")
        want = arena.buf[:arena.nbytes].clone()               # every later load is compared with it, on the device
        combos = [(s, c) for s in streams for c in chunks]
        times: dict = {c: [] for c in combos}
        pins: dict = {c: [] for c in combos}
        for r in range(args.runs):
            for s, c in combos if r % 2 == 0 else combos[::-1]:
                arena.release()
                t = time.perf_counter()
                arena.map()
                got = arena.load(s, c << 20)
                times[(s, c)].append(time.perf_counter() - t)
                pins[(s, c)].append(got.get("pin_s", 0.0))
                if r == 0 and not torch.equal(arena.buf[:arena.nbytes], want):
                    raise SystemExit(f"--sweep: {s} readers x {c} MiB loaded other bytes than the file holds")
        for (s, c), ts in times.items():
            med = statistics.median(ts)
            out["rows"].append({"streams": s, "chunk_mib": c, "s": [round(x, 4) for x in ts],
                                "s_median": round(med, 4), "gib_s": round(arena.nbytes / med / (1 << 30), 2),
                                "pin_s_median": round(statistics.median(pins[(s, c)]), 4)})
            print(f"{s:3d} readers x {c:3d} MiB: {med:.3f}s ({out['rows'][-1]['gib_s']} GiB/s; "
                  f"pinning {out['rows'][-1]['pin_s_median']:.3f}s)", flush=True)
        best = min(out["rows"], key=lambda row: row["s_median"])
        out["best"] = {"streams": best["streams"], "chunk_mib": best["chunk_mib"], "gib_s": best["gib_s"]}
        print(f"best: --load-streams={best['streams']} --load-chunk-mib={best['chunk_mib']} ({best['gib_s']} GiB/s)")
        arena.release()
        del want
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    print(save("weights-sweep", out))


def _file_digest(path: str, arena) -> str:
    with open(path, "rb") as f:
        f.seek(arena.data_start)
        return hashlib.sha256(f.read(arena.nbytes)).hexdigest()


def _arena_digest(arena) -> str:
    return hashlib.sha256(arena.buf[:arena.nbytes].cpu().numpy().tobytes()).hexdigest()


def loaders(args: argparse.Namespace) -> None:
    from safetensors.torch import save_file
    srv, torch = _worker_module()
    import fastsafetensors
    device = torch.device(args.device)
    out: dict = {"machine": machine(), "device": str(device), "runs": args.runs, "streams": args.streams,
                 "fastsafetensors": fastsafetensors.__version__, "torch": torch.__version__, "sizes": []}
    tmp = tempfile.mkdtemp(prefix="thaw-loaders-bench-", dir=args.dir)
    try:
        for mib in args.sizes:
            path = os.path.join(tmp, f"w{mib}.safetensors")
            n = 64  # tensors of equal size, like a model's layers
            save_file({f"layer{i}.w": torch.randn(mib << 20 >> 1 >> 6).to(torch.bfloat16) for i in range(n)}, path)
            arena = srv.WeightArena(path, device, torch.bfloat16, vmm=False)
            digests = {}
            for name in ("own", "fastsafetensors"):
                arena.buf.zero_()
                arena.load(args.streams, loader=name)
                digests[name] = hashlib.sha256(arena.buf.cpu().numpy().tobytes()).hexdigest()
            row: dict = {"mib": mib, "bytes": arena.nbytes, "identical": len(set(digests.values())) == 1}
            for cache in ("hot", "cold"):
                times: dict = {"own": [], "fastsafetensors": []}
                split: dict = {"fst_read_s": [], "arena_copy_s": []}  # fastsafetensors' load, in its two parts
                for r in range(args.runs):
                    order = ("own", "fastsafetensors") if r % 2 == 0 else ("fastsafetensors", "own")
                    for name in order:
                        arena.release()
                        if cache == "cold":
                            fd = os.open(path, os.O_RDONLY)
                            os.fsync(fd)
                            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                            os.close(fd)
                        t = time.perf_counter()
                        arena.map()
                        got = arena.load(args.streams, loader=name)
                        times[name].append(time.perf_counter() - t)
                        for k in split if name == "fastsafetensors" else ():
                            split[k].append(got[k])
                for name, ts in times.items():
                    med = statistics.median(ts)
                    row[f"{cache}_{name}_s"] = [round(x, 4) for x in ts]
                    row[f"{cache}_{name}_s_median"] = round(med, 4)
                    row[f"{cache}_{name}_gib_s"] = round(arena.nbytes / med / (1 << 30), 3)
                for k, v in split.items():
                    row[f"{cache}_{k}_median"] = round(statistics.median(v), 4)
                print(f"{mib} MiB {cache}: own {row[f'{cache}_own_s_median']:.3f}s "
                      f"({row[f'{cache}_own_gib_s']} GiB/s), fastsafetensors "
                      f"{row[f'{cache}_fastsafetensors_s_median']:.3f}s "
                      f"({row[f'{cache}_fastsafetensors_gib_s']} GiB/s: its read "
                      f"{row[f'{cache}_fst_read_s_median']:.3f}s + copy into the arena "
                      f"{row[f'{cache}_arena_copy_s_median']:.3f}s)", flush=True)
            out["sizes"].append(row)
            arena.release()
            os.unlink(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(save("weights-loaders", out))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="small")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--loaders", action="store_true", help="compare the worker's two reload paths (see above)")
    ap.add_argument("--sizes", type=lambda t: [int(x) for x in t.split(",")], default=[64, 256, 1024],
                    help="--loaders: file sizes in MiB")
    ap.add_argument("--streams", type=int, default=4, help="--loaders: readers/threads of each loader")
    ap.add_argument("--device", default="cpu", help="--loaders: cpu or cuda")
    ap.add_argument("--dir", default="/var/tmp", help="--loaders: where the files are written")
    ap.add_argument("--sweep", metavar="STREAMS:CHUNKS", help="time the own loader per readers and chunk MiB (see above)")
    ap.add_argument("--json", help="--sweep: also write the result here")
    args = ap.parse_args()
    if args.sweep:
        return sweep(args)
    if args.loaders:
        return loaders(args)
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
