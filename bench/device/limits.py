"""The machine's own limits under a restore (GPU machine, root), as one JSON object:

  page_fill     fresh anonymous memory written once (what CRIU's page fill does), by 1..N threads,
                in 4 KiB pages (MADV_NOHUGEPAGE) and in huge pages (MADV_HUGEPAGE); the first
                pass on a fresh machine is reported apart (a Firecracker VM's memory grows as it
                is first touched)
  h2d           host-to-device copy from pinned and from pageable memory (what the CUDA restore
                and a weights reload do), and device-to-host from pinned
  disk          sequential read of a file not in the page cache: one reader and 8 readers on
                eighths of it (the floor under a restore on a new node)

    python3 bench/device/limits.py --out limits.json [--dir /var/tmp] [--fill-gib 8] [--disk-gib 4]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import threading
import time

libc = ctypes.CDLL("libc.so.6", use_errno=True)   # foreign calls release the GIL: threads run in parallel
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
MADV_HUGEPAGE, MADV_NOHUGEPAGE = 14, 15
GiB = 1 << 30


def fill(nbytes: int, threads: int, huge: bool) -> float:
    """Seconds to write `nbytes` of fresh anonymous memory with `threads` threads."""
    m = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    base = ctypes.addressof(ctypes.c_char.from_buffer(m))
    try:
        if libc.madvise(base, nbytes, MADV_HUGEPAGE if huge else MADV_NOHUGEPAGE) != 0:
            raise OSError(ctypes.get_errno(), "madvise")
        step = nbytes // threads
        ts = [threading.Thread(target=libc.memset, args=(base + i * step, 0x5A, step)) for i in range(threads)]
        t = time.perf_counter()
        for th in ts:
            th.start()
        for th in ts:
            th.join()
        return time.perf_counter() - t
    finally:
        del base
        m.close()


def page_fill(gib: int, threads: list[int]) -> dict:
    nbytes = gib * GiB
    first = fill(nbytes * 2, max(threads), True)   # grows a fresh VM's memory before the timed passes
    out: dict = {"gib": gib, "first_touch_gib_per_s": round(2 * gib / first, 2), "runs": []}
    for huge in (False, True):
        for n in threads:
            s = min(fill(nbytes, n, huge) for _ in range(2))
            out["runs"].append({"threads": n, "huge_pages": huge, "gib_per_s": round(gib / s, 2)})
    out["best_gib_per_s"] = max(r["gib_per_s"] for r in out["runs"])
    return out


def h2d(gib: int) -> dict:
    import torch
    n = gib * GiB
    dev = torch.empty(n, dtype=torch.uint8, device="cuda")
    out = {"gib": gib}
    for name, host, to_dev in (("pinned_h2d", torch.empty(n, dtype=torch.uint8, pin_memory=True), True),
                               ("pageable_h2d", torch.empty(n, dtype=torch.uint8), True),
                               ("pinned_d2h", None, False)):
        if host is None:
            host = torch.empty(n, dtype=torch.uint8, pin_memory=True)
        host.fill_(7)
        best = 0.0
        for _ in range(3):
            torch.cuda.synchronize()
            t = time.perf_counter()
            (dev.copy_(host, non_blocking=True) if to_dev else host.copy_(dev, non_blocking=True))
            torch.cuda.synchronize()
            best = max(best, gib / (time.perf_counter() - t))
        out[f"{name}_gib_per_s"] = round(best, 2)
        del host
    del dev
    torch.cuda.empty_cache()
    return out


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def read_range(path: str, off: int, length: int) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        buf = bytearray(8 << 20)
        end = off + length
        while off < end:
            n = os.preadv(fd, [buf], off)
            if n <= 0:
                break
            off += n
    finally:
        os.close(fd)


def disk(directory: str, gib: int) -> dict:
    path = os.path.join(directory, f"limits-disk.{os.getpid()}")
    chunk = os.urandom(64 << 20)
    try:
        with open(path, "wb") as f:
            for _ in range(gib * 16):
                f.write(chunk)
        size = gib * GiB
        out: dict = {"gib": gib}
        for readers in (1, 8):
            drop_caches()
            part = size // readers
            ts = [threading.Thread(target=read_range, args=(path, i * part, part)) for i in range(readers)]
            t = time.perf_counter()
            for th in ts:
                th.start()
            for th in ts:
                th.join()
            out[f"read_{readers}_gib_per_s"] = round(gib / (time.perf_counter() - t), 2)
        t = time.perf_counter()
        read_range(path, 0, size)
        out["page_cache_read_gib_per_s"] = round(gib / (time.perf_counter() - t), 2)
        out["best_gib_per_s"] = max(out["read_1_gib_per_s"], out["read_8_gib_per_s"])
        return out
    finally:
        os.unlink(path)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--dir", default="/var/tmp")
    ap.add_argument("--fill-gib", type=int, default=8)
    ap.add_argument("--disk-gib", type=int, default=4)
    ap.add_argument("--no-gpu", action="store_true")
    a = ap.parse_args()
    cpus = os.cpu_count() or 1
    res: dict = {"cpus": cpus, "kernel": os.uname().release,
                 "thp": open("/sys/kernel/mm/transparent_hugepage/enabled").read().strip()}

    def save(key: str, value: dict) -> None:
        res[key] = value
        print(key, json.dumps(value), flush=True)
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)

    save("disk", disk(a.dir, a.disk_gib))   # first: the fill passes below would be evicted for it
    save("page_fill", page_fill(a.fill_gib, sorted({1, 4, 8, cpus})))
    if not a.no_gpu:
        save("h2d", h2d(4))


if __name__ == "__main__":
    main()
