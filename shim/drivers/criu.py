"""CRIU itself: its version, its features, `criu check`, and the options thaw gives it for a
restore (what the fingerprint, the restore path and `thaw doctor` need). Checkpoint and restore
go through runc (shim/drivers/runc.py), which runs CRIU in RPC mode.

The version and the features are asked of the binary once and cached in state_dir, keyed by the
binary's path, size and mtime: running `criu --version` costs 40-120 ms of every restore.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from typing import Any

from thaw.oci.files import atomic_write

from ..timing import Stopwatch

# thaw's CRIU patch 0002: several workers fill a restored process's private pages, optionally
# into transparent huge pages. Shown in `criu --help` (a CRIU without it says nothing of them).
PAGE_WORKERS = "page-restore-workers"
PAGE_HUGEPAGES = "page-restore-hugepages"
_FEATURES = (PAGE_WORKERS, PAGE_HUGEPAGES)
THP_PROBE = "thp-fill-probe.json"


def _cached(criu: str, cache_dir: str | None, what: str, compute: Callable[[str], object]) -> object:
    path = shutil.which(criu) or criu
    cache = key = None
    if cache_dir:
        try:
            st = os.stat(path)
            key = f"{os.path.realpath(path)}:{st.st_size}:{st.st_mtime_ns}"
            cache = os.path.join(cache_dir, f"criu-{what}.json")
            with open(cache) as f:
                cached = json.load(f)
            if cached.get("key") == key:
                return cached.get(what)
        except (OSError, ValueError):
            pass
    found = compute(path)
    if cache and key and found is not None:
        try:
            atomic_write(cache, json.dumps({"key": key, what: found}).encode(), durable=False)
        except OSError:
            pass
    return found


def _run(argv: list[str]) -> str | None:
    try:
        proc = subprocess.run(argv, capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (proc.stdout + proc.stderr).decode(errors="replace")


def version(criu: str, cache_dir: str | None = None) -> str | None:
    """CRIU's version string (e.g. "4.1.1"), or None if it cannot be run."""
    def ask(path: str) -> str | None:
        m = re.search(r"^Version:\s*(\S+)", _run([path, "--version"]) or "", re.M)
        return m.group(1) if m else None
    found = _cached(criu, cache_dir, "version", ask)
    return found if isinstance(found, str) else None


def features(criu: str, cache_dir: str | None = None) -> frozenset[str]:
    """Which of thaw's CRIU options this CRIU has (empty: a stock CRIU)."""
    def ask(path: str) -> list[str] | None:
        text = _run([path, "--help"])
        return None if text is None else [f for f in _FEATURES if f"--{f}" in text]
    found = _cached(criu, cache_dir, "features", ask)
    return frozenset(found) if isinstance(found, list) else frozenset()


NFTABLES_LOCK = "network_lock_nftables"

# CRIU caches its kernel probe in /run/criu.kdat, only where /run is a tmpfs, writing it through
# this file with O_EXCL; a CRIU killed between the two leaves it behind, and no CRIU caches the
# probe again until it is removed (each dump and restore then probes the kernel afresh). Where /run
# is not a tmpfs, CRIU 4.1.1 leaves the file after every run, harmlessly: it caches nothing there.
KDAT_TMP = "/run/criu.kdat.tmp"


def run_is_tmpfs() -> bool:
    fstype = None
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 2 and fields[1] == "/run":
                    fstype = fields[2]           # the last one mounted there is the one seen
    except OSError:
        return False
    return fstype == "tmpfs"


def stale_kdat_tmp(min_age: float = 60.0) -> str | None:
    """KDAT_TMP if it stops the cache (a tmpfs /run) and is older than any CRIU still writing it."""
    try:
        old = time.time() - os.lstat(KDAT_TMP).st_mtime > min_age
    except OSError:
        return None
    return KDAT_TMP if old and run_is_tmpfs() else None


def dump_options(criu: str, cache_dir: str | None = None) -> tuple[str, ...]:
    """Lines of thaw's CRIU config file for a dump.

    link-remap: a file a process opened under a name since removed while another name still links
    it (POSIX semaphores: sem_open creates a temporary name, links the final one, removes the
    temporary; Python's multiprocessing locks are such files in /dev/shm) is dumped as a hard link
    CRIU makes beside it (link_remap.N), which the restore opens and then removes. CRIU refuses
    such files without it. The network lock: CRIU's default (iptables) runs iptables-restore to
    lock the container's network namespace during the dump and again to unlock it at the end of
    every restore (~0.1 s each on the GPU machine); nftables does both in-process. A restore uses
    the method its image was dumped with, so this is chosen at capture, where this CRIU and kernel
    support it."""
    def ask(path: str) -> bool:
        return check(path, NFTABLES_LOCK)[0]
    nft = ("network-lock nftables",) if _cached(criu, cache_dir, "nftables-lock", ask) is True else ()
    return ("link-remap", *nft)


def check(criu: str, feature: str | None = None) -> tuple[bool, str]:
    """Run `criu check` (of one `feature` if given); (passed, its last output line)."""
    try:
        proc = subprocess.run([criu, "check", *(("--feature", feature) if feature else ())],
                              capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, str(exc)
    text = (proc.stdout + proc.stderr).decode(errors="replace").strip().splitlines()
    return proc.returncode == 0, (text[-1] if text else f"exit {proc.returncode}")


def version_tuple(v: str | None) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v or "")[:3])


# --- the options of one restore ---------------------------------------------------------------------

def restore_options(workers: int, hugepages: str, have: frozenset[str], probe: dict[str, Any] | None) -> tuple[str, ...]:
    """The lines of thaw's CRIU config file that choose how a restore fills memory. Nothing when
    workers is 0 or the node's CRIU lacks the option (then CRIU's stock fill runs). hugepages
    "auto" follows the node's measured probe (off without one)."""
    if workers <= 0 or PAGE_WORKERS not in have:
        return ()
    lines = [f"{PAGE_WORKERS} {workers}"]
    huge = hugepages == "on" or (hugepages == "auto" and bool(probe and probe.get("hugepages_faster")))
    if huge and PAGE_HUGEPAGES in have:
        lines.append(PAGE_HUGEPAGES)
    return tuple(lines)


def thp_mode() -> str:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            m = re.search(r"\[(\w+)\]", f.read())
        return m.group(1) if m else "unknown"
    except OSError:
        return "unsupported"


def read_thp_probe(cache_dir: str) -> dict[str, Any] | None:
    """The node's measured probe, if there is one for this kernel and THP mode."""
    try:
        with open(os.path.join(cache_dir, THP_PROBE)) as f:
            probe: dict[str, Any] = json.load(f)
    except (OSError, ValueError):
        return None
    if probe.get("kernel") != os.uname().release or probe.get("thp") != thp_mode():
        return None
    return probe


def measure_thp_fill(cache_dir: str, scratch: str, mib: int = 256, threads: int = 4, rounds: int = 2) -> dict[str, Any]:
    """Does filling fresh memory from a file go faster into transparent huge pages on this node?
    It depends on the machine (on VMs that hand freed memory back to the host, huge pages can be
    slower): measure it the way CRIU's page fill works — several threads preadv a page-cache-hot
    file into fresh anonymous memory, advised MADV_HUGEPAGE or MADV_NOHUGEPAGE, alternating — and
    keep the answer for `hugepages: auto`."""
    size = mib << 20
    path = os.path.join(scratch, f".thaw-thp-probe-{os.getpid()}")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        chunk = os.urandom(1 << 20)
        for _ in range(mib):
            os.write(fd, chunk)

        def fill(advice: int) -> float:
            m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            m.madvise(advice)
            view = memoryview(m)
            part = size // threads
            workers = [threading.Thread(target=os.preadv, args=(fd, [view[i * part:(i + 1) * part]], i * part))
                       for i in range(threads)]
            clock = Stopwatch()
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            seconds = clock.seconds()
            view.release()
            m.close()
            return seconds
        fill(mmap.MADV_NOHUGEPAGE)                           # page cache hot, first touches paid
        small: list[float] = []
        huge: list[float] = []
        for r in range(rounds):
            for advice, out in ((mmap.MADV_NOHUGEPAGE, small), (mmap.MADV_HUGEPAGE, huge))[:: 1 if r % 2 else -1]:
                out.append(fill(advice))
    finally:
        os.close(fd)
        os.unlink(path)
    gib = size / (1 << 30)
    small_rate, huge_rate = round(gib / min(small), 2), round(gib / min(huge), 2)
    probe = {"kernel": os.uname().release, "thp": thp_mode(), "threads": threads, "mib": mib,
             "small_gib_s": small_rate, "huge_gib_s": huge_rate,
             # Only a clear gain counts: huge pages also cost a compaction when memory is fragmented.
             "hugepages_faster": huge_rate > 1.15 * small_rate and thp_mode() == "madvise"}
    atomic_write(os.path.join(cache_dir, THP_PROBE), json.dumps(probe).encode(), durable=False)
    return probe
