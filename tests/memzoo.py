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

import helpers

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
    return helpers.wait_for(pred, timeout, what, interval, error=MemzooError)


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
        self._proc: subprocess.Popen[bytes] | None = None
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
                assert proc.stderr is not None  # stderr=PIPE
                raise MemzooError(f"memzoo exited {proc.returncode}: {proc.stderr.read().decode()}")
            return all(os.path.exists(os.path.join(self.dir, f"ready-{r}")) for r in self.roles)
        wait_for(ready, timeout, "memzoo to fill its memory")
        return proc.pid

    def report(self, timeout: float = 120) -> Report:
        """Ask every process (SIGUSR1 to the process group) for smaps and region checksums."""
        self._clear("report-*.json")
        self._clear("smaps-*.txt")
        assert self.pid is not None, "memzoo is not running"
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
        if self._proc is not None:
            self._proc.wait(timeout=30)
            self._proc = None
        pid = self.pid
        assert pid is not None
        wait_for(lambda: not _group_alive(pid), 60, "the dumped tree to be reaped")
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
        assert self.pid is not None, "memzoo is not running"
        return dict(_group(self.pid))

    def _clear(self, pattern: str) -> None:
        for p in glob.glob(os.path.join(self.dir, pattern)):
            os.unlink(p)


def _group(pgid: int):
    """(pid, threads) of every process in process group `pgid`, zombies too."""
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()
            if int(fields[2]) == pgid:
                yield int(d), int(fields[17])


def _group_alive(pgid: int) -> bool:
    return next(_group(pgid), None) is not None


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


# --- memzoo in a runc container (tests/test_fast_restore.py, tests/test_criu_page_restore_runc.py) --

CPU_QUOTA = (50000, 100000)           # half a CPU


def container_bundle(path: str, work: str, total_mib: int, annotations: dict | None = None,
                     memory_limit: int | None = None) -> str:
    """A runc bundle running WORK/memzoo (4 threads, 1 child) with WORK bound read-write at /work,
    half a CPU, and a memory limit (swap included) if given."""
    helpers.make_bundle(path, ["/work/memzoo", "/work", str(total_mib), "4", "1"], python=True,
                        annotations=annotations, cgroup=f"/thaw-test/{helpers.unique('zoo')}")
    os.makedirs(os.path.join(path, "rootfs", "work"), exist_ok=True)
    with open(os.path.join(path, "config.json")) as f:
        spec = json.load(f)
    spec["mounts"].append({"destination": "/work", "type": "bind", "source": work, "options": ["rbind", "rw"]})
    res = spec["linux"]["resources"]
    res["cpu"] = {"quota": CPU_QUOTA[0], "period": CPU_QUOTA[1]}
    if memory_limit:
        res["memory"] = {"limit": memory_limit, "swap": memory_limit}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(spec, f, indent=1)
    return path


def memory_facts(pid: int) -> dict[str, int]:
    """Peak memory and OOM kills of the memory cgroup (v1 or v2) that `pid` is in."""
    with open(f"/proc/{pid}/cgroup") as f:
        lines = f.read().splitlines()
    cg = next(("/sys/fs/cgroup/memory" + line.split(":", 2)[2] for line in lines
               if "memory" in line.split(":", 2)[1].split(",")), None)
    if cg is None:
        cg = "/sys/fs/cgroup" + next(line[3:] for line in lines if line.startswith("0::"))
    if os.path.exists(os.path.join(cg, "memory.max_usage_in_bytes")):        # cgroup v1
        peak = int(open(os.path.join(cg, "memory.max_usage_in_bytes")).read())
        oom = open(os.path.join(cg, "memory.oom_control")).read()
    else:
        peak = int(open(os.path.join(cg, "memory.peak")).read())
        oom = open(os.path.join(cg, "memory.events")).read()
    kills = re.search(r"oom_kill (\d+)", oom)
    return {"peak": peak, "oom_kill": int(kills[1]) if kills else 0}
