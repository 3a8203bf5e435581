"""CRIU restore speed: stock page fill vs thaw's patch 0002 (--page-restore-workers N, with and
without --page-restore-hugepages). CPU only, any machine.

memzoo (tests/workloads/memzoo.c) fills SIZE of random memory across every kind of mapping, is
dumped once, and restored again and again with each variant, the order of the variants reversed
on every other round (first-touch costs on a VM favour whoever runs later; see
/work/shared/reference/restore-speed.md). The first round checks that every variant gives back
the dumped memory (region checksums) and is not timed. Prints a table and saves JSON under
bench/results/ (restore wall time per run, GiB/s = bytes of pages-*.img / restore wall time, and
the spread).

  python bench/restore_speed.py [--size-gib 3] [--workers 2,4] [--rounds 4] [--criu PATH]

Drives CRIU directly; thaw-runtime will later pass the same options through its
`restore: {workers, hugepages}` config (a CRIU config file named by org.criu.config)."""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import memzoo as mz

from common import save


def variants(workers: list[int]) -> list[tuple[str, list[str]]]:
    out = [("stock", [])]
    for n in workers:
        out.append((f"w{n}", ["--page-restore-workers", str(n)]))
        out.append((f"w{n}+thp", ["--page-restore-workers", str(n), "--page-restore-hugepages"]))
    return out


def free_page_reporting() -> bool:
    """A virtio balloon with free page reporting (feature bit 5): freed huge-page-sized blocks go
    back to the host, and fresh huge pages then cost host faults (slow THP on such VMs)."""
    base = "/sys/bus/virtio/devices"
    for d in os.listdir(base) if os.path.isdir(base) else []:
        try:
            with open(f"{base}/{d}/device") as f, open(f"{base}/{d}/features") as g:
                if int(f.read(), 16) == 5 and g.read()[5] == "1":
                    return True
        except (OSError, ValueError, IndexError):
            continue
    return False


def thp_mode() -> str:
    with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
        return re.search(r"\[(\w+)\]", f.read())[1]


def fill_of_largest(images: str, log: str) -> tuple[int, float] | None:
    """(bytes, seconds) of the page fill of the restored process with the most to fill, from the
    restorer's "page fill: N KiB, W workers" and "page fill: done" log lines."""
    started, fills = {}, []
    for line in mz.criu_log_lines(images, log, r"page fill: (\d+ KiB|done)"):
        m = re.match(r"\((\d+\.\d+)\) pie: (\d+): page fill: (?:(\d+) KiB|done)", line)
        if not m:
            continue
        t, pid = float(m[1]), m[2]
        if m[3]:
            started[pid] = (t, int(m[3]) * 1024)
        elif pid in started:
            t0, size = started.pop(pid)
            fills.append((size, t - t0))
    return max(fills) if fills else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gib", type=float, default=3.0, help="memory memzoo holds (default 3)")
    ap.add_argument("--workers", default="2,4", help="worker counts to try (default 2,4)")
    ap.add_argument("--rounds", type=int, default=4, help="timed rounds per variant (default 4)")
    ap.add_argument("--criu", default=mz.CRIU, help=f"CRIU binary (default {mz.CRIU})")
    ap.add_argument("--dir", default=None, help="scratch directory (default: a new one under /tmp)")
    ap.add_argument("--name", default="restore_speed", help="results file name prefix")
    args = ap.parse_args()
    mz.CRIU = args.criu
    workers = [int(w) for w in args.workers.split(",") if w]

    base = args.dir or tempfile.mkdtemp(prefix="thaw-restore-speed-")
    images = os.path.join(base, "images")
    zoo = mz.Memzoo(mz.build(base), os.path.join(base, "work"), int(args.size_gib * 1024), threads=2, children=0)
    print(f"memzoo: filling {args.size_gib} GiB in {base}", flush=True)
    zoo.start(timeout=600)
    before = zoo.report(timeout=600)
    dump_s = zoo.dump(images)
    size = mz.pages_bytes(images)
    print(f"dumped {size / 2**30:.2f} GiB of pages in {dump_s:.1f} s", flush=True)

    vs = variants(workers)
    runs: dict[str, list[dict]] = {tag: [] for tag, _ in vs}
    for rnd in range(args.rounds + 1):
        order = vs if rnd % 2 == 0 else list(reversed(vs))
        for tag, opts in order:
            log = f"restore-{tag}-{rnd}.log"
            try:
                took = zoo.restore(images, *opts, log=log)
                if rnd == 0:
                    got = zoo.report(timeout=600)
                    if got.hashes() != before.hashes():
                        raise SystemExit(f"{tag}: restored memory differs from the dump")
            finally:
                zoo.kill()
            if rnd == 0:
                print(f"  check {tag}: memory matches the dump ({took:.2f} s, not timed)", flush=True)
                continue
            fill = fill_of_largest(images, log)
            run = {"round": rnd, "position": order.index((tag, opts)), "restore_s": round(took, 4),
                   "gib_per_s": round(size / 2**30 / took, 3)}
            if fill:
                run.update(fill_bytes=fill[0], fill_s=round(fill[1], 4),
                           fill_gib_per_s=round(fill[0] / 2**30 / fill[1], 3))
            runs[tag].append(run)
            print(f"  round {rnd} {tag:>8}: {took:6.2f} s  {size / 2**30 / took:5.2f} GiB/s"
                  + (f"  (page fill {fill[0] / 2**30:.2f} GiB in {fill[1]:.2f} s)" if fill else ""), flush=True)
            os.unlink(os.path.join(images, log))

    summary = {}
    print(f"\n{'variant':>9} {'median s':>9} {'min s':>7} {'max s':>7} {'GiB/s (median)':>15} {'vs stock':>9}")
    stock_med = statistics.median(r["restore_s"] for r in runs["stock"])
    for tag, _ in vs:
        ts = [r["restore_s"] for r in runs[tag]]
        med = statistics.median(ts)
        summary[tag] = {"median_s": med, "min_s": min(ts), "max_s": max(ts),
                        "median_gib_per_s": round(size / 2**30 / med, 3), "speedup_vs_stock": round(stock_med / med, 3)}
        fills = [r["fill_gib_per_s"] for r in runs[tag] if "fill_gib_per_s" in r]
        if fills:
            summary[tag]["median_fill_gib_per_s"] = statistics.median(fills)
        print(f"{tag:>9} {med:9.2f} {min(ts):7.2f} {max(ts):7.2f} {size / 2**30 / med:15.2f} {stock_med / med:8.2f}x"
              + (f"   page fill alone {statistics.median(fills):.2f} GiB/s" if fills else ""))

    version = subprocess.run([args.criu, "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    path = save(args.name, {
        "what": "criu restore -d of memzoo, stock vs --page-restore-workers (and --page-restore-hugepages)",
        "when": time.strftime("%Y-%m-%d %H:%M:%S"), "host": os.uname().nodename, "kernel": os.uname().release,
        "cpus": os.cpu_count(), "thp": thp_mode(), "free_page_reporting": free_page_reporting(), "criu": args.criu, "criu_version": version,
        "size_gib_requested": args.size_gib, "pages_bytes": size, "dump_s": round(dump_s, 3),
        "rounds": args.rounds, "order": "variants reversed on every other round; round 0 checks memory, untimed",
        "page_cache": "pages-*.img hot in the page cache (just dumped)",
        "summary": summary, "runs": runs})
    print(f"\nsaved {path}")


if __name__ == "__main__":
    main()
