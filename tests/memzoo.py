"""Drive tests/workloads/memzoo.c with the real CRIU: build it, run it, dump it, restore it with
chosen options, read its reports (region checksums) and its smaps. Shared by the CRIU page-restore
tests and bench/restore_speed.py."""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.join(HERE, "workloads", "memzoo.c")
CRIU = os.environ.get("THAW_TEST_CRIU", "/usr/local/sbin/criu")


class MemzooError(Exception):
    pass


def build(out_dir: str) -> str:
    """Compile memzoo with the node's compiler (build-essential, installed by node.sh), or take the
    prebuilt one THAW_TEST_MEMZOO names (a static build, to run the same tests against it; a binary
    carried to a machine without a compiler: bench/device/pack.sh)."""
    binary = os.path.join(out_dir, "memzoo")
    if os.environ.get("THAW_TEST_MEMZOO"):
        shutil.copy(os.environ["THAW_TEST_MEMZOO"], binary)
        return binary
    subprocess.run(["gcc", "-O2", "-Wall", "-pthread", "-o", binary, SOURCE], check=True,
                   capture_output=True, text=True)
    return binary


def wait_for(pred, timeout: float, what: str, interval: float = 0.02):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise MemzooError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


@dataclass
class Mapping:
    """One /proc/PID/smaps entry."""
    start: int
    end: int
    perms: str
    offset: int
    name: str
    fields: dict[str, int] = field(default_factory=dict)   # kB values: Rss, Anonymous, AnonHugePages...
    flags: frozenset[str] = frozenset()

    @property
    def key(self) -> tuple:
        """Everything about the mapping but its memory use and VmFlags."""
        return (self.start, self.end, self.perms, self.offset, self.name)


_HEAD = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S+) ([0-9a-f]+) \S+ \d+\s*(.*)$")


def parse_smaps(text: str) -> list[Mapping]:
    maps: list[Mapping] = []
    for line in text.splitlines():
        m = _HEAD.match(line)
        if m:
            maps.append(Mapping(int(m[1], 16), int(m[2], 16), m[3], int(m[4], 16), m[5].strip()))
        elif line.startswith("VmFlags:"):
            maps[-1].flags = frozenset(line.split()[1:])
        elif ":" in line and maps:
            k, _, v = line.partition(":")
            parts = v.split()
            if parts and parts[0].isdigit():
                maps[-1].fields[k] = int(parts[0])
    return maps


@dataclass
class Report:
    """What every process of the tree said about itself, by role (parent, child0, ...)."""
    pids: dict[str, int]
    regions: dict[str, dict[str, dict]]    # role -> region name -> {start, end, hash, chunks}
    smaps: dict[str, list[Mapping]]        # role -> mappings

    def hashes(self) -> dict[tuple[str, str], str]:
        return {(role, name): r["hash"] for role, regs in self.regions.items() for name, r in regs.items()}

    def region_of(self, role: str, m: Mapping) -> str | None:
        for name, r in self.regions[role].items():
            if r["start"] < m.end and m.start < r["end"]:
                return name
        return None


class Memzoo:
    """One memzoo process tree in work_dir (its data files and reports live there)."""

    def __init__(self, binary: str, work_dir: str, total_mib: int, threads: int = 8, children: int = 2):
        self.binary = binary
        self.dir = work_dir
        self.total_mib = total_mib
        self.threads = threads
        self.roles = ["parent"] + [f"child{i}" for i in range(children)]
        self.pid: int | None = None
        os.makedirs(work_dir, exist_ok=True)

    def start(self, timeout: float = 120) -> int:
        self._clear("ready-*")
        proc = subprocess.Popen([self.binary, self.dir, str(self.total_mib), str(self.threads),
                                 str(len(self.roles) - 1)], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self._proc = proc
        self.pid = proc.pid

        def ready():
            if proc.poll() is not None:
                raise MemzooError(f"memzoo exited {proc.returncode}: {proc.stderr.read().decode()}")
            return all(os.path.exists(os.path.join(self.dir, f"ready-{r}")) for r in self.roles)
        wait_for(ready, timeout, "memzoo to fill its memory")
        return proc.pid

    def report(self, timeout: float = 120) -> Report:
        """Ask every process (SIGUSR1 to the process group) for smaps and region checksums."""
        self._clear("report-*.json")
        self._clear("smaps-*.txt")
        os.killpg(self.pid, signal.SIGUSR1)
        wait_for(lambda: all(os.path.exists(os.path.join(self.dir, f"report-{r}.json")) for r in self.roles),
                 timeout, "memzoo reports")
        pids, regions, smaps = {}, {}, {}
        for r in self.roles:
            with open(os.path.join(self.dir, f"report-{r}.json")) as f:
                rep = json.load(f)
            pids[r] = rep["pid"]
            regions[r] = {g["name"]: g for g in rep["regions"]}
            with open(os.path.join(self.dir, f"smaps-{r}.txt")) as f:
                smaps[r] = parse_smaps(f.read())
        return Report(pids, regions, smaps)

    def dump(self, images: str, *extra: str, timeout: float = 600) -> float:
        """criu dump (the tree dies); returns the dump's wall time."""
        os.makedirs(images, exist_ok=True)
        t0 = time.perf_counter()
        run_criu(["dump", "-t", str(self.pid), "-D", images, "-o", "dump.log", "-v4", *extra], images, timeout)
        took = time.perf_counter() - t0
        if getattr(self, "_proc", None) is not None:
            self._proc.wait(timeout=30)
            self._proc = None
        wait_for(lambda: not _group_alive(self.pid), 60, "the dumped tree to be reaped")
        return took

    def restore(self, images: str, *options: str, log: str = "restore.log", timeout: float = 600) -> float:
        """criu restore --restore-detached with extra options; returns the restore's wall time."""
        pidfile = os.path.join(images, "restore.pid")
        if os.path.exists(pidfile):
            os.unlink(pidfile)
        t0 = time.perf_counter()
        run_criu(["restore", "-D", images, "-d", "-o", log, "-v4", "--pidfile", pidfile, *options], images, timeout)
        took = time.perf_counter() - t0
        with open(pidfile) as f:
            self.pid = int(f.read())
        return took

    def kill(self, timeout: float = 60) -> None:
        """Kill the whole tree and wait until its pids are free again (a restore reuses them)."""
        if self.pid is None:
            return
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc = getattr(self, "_proc", None)
        if proc is not None:
            proc.wait(timeout=timeout)
            self._proc = None
        pids = [self.pid]

        def gone():
            for p in pids:
                try:
                    os.waitpid(p, os.WNOHANG)     # ours only if we are its parent
                except ChildProcessError:
                    pass
            return not any(os.path.exists(f"/proc/{p}") for p in pids)
        wait_for(gone, timeout, f"memzoo {self.pid} to be reaped")
        # the children were in the same process group; wait for them too
        wait_for(lambda: not _group_alive(self.pid), timeout, "memzoo children to be reaped")
        self.pid = None

    def tree(self) -> dict[int, int]:
        """Every process in the tree's process group (zombies too), with its number of threads."""
        out = {}
        for d in os.listdir("/proc"):
            if d.isdigit():
                try:
                    with open(f"/proc/{d}/stat") as f:
                        stat = f.read()
                except OSError:
                    continue
                fields = stat[stat.rindex(")") + 2:].split()
                if int(fields[2]) == self.pid:
                    out[int(d)] = int(fields[17])
        return out

    def _clear(self, pattern: str) -> None:
        for p in glob.glob(os.path.join(self.dir, pattern)):
            os.unlink(p)


def _group_alive(pgid: int) -> bool:
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()
            if int(fields[2]) == pgid:
                return True
    return False


def run_criu(args: list[str], images: str, timeout: float) -> None:
    proc = subprocess.run([CRIU, *args], capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        log = os.path.join(images, args[args.index("-o") + 1]) if "-o" in args else ""
        tail = ""
        if log and os.path.exists(log):
            with open(log) as f:
                tail = "".join(f.readlines()[-30:])
        raise MemzooError(f"criu {args[0]} failed ({proc.returncode}): {proc.stderr}\n{tail}")


def pages_bytes(images: str) -> int:
    """Bytes of page data in a CRIU image directory (what a restore reads)."""
    return sum(os.path.getsize(p) for p in glob.glob(os.path.join(images, "pages-*.img")))


def criu_log_lines(images: str, log: str, pattern: str) -> list[str]:
    with open(os.path.join(images, log)) as f:
        return [line.rstrip() for line in f if re.search(pattern, line)]
