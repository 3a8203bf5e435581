"""Soak: one small snapshot restored again and again through thaw-runtime and runc.

A counter container on an overlay rootfs (the image's layer read-only below, a fresh upper
directory per container, as containerd's snapshotters give it) changes its rootfs and is captured
once with `thaw capture`; then N cycles of create (a restore) / start / kill / delete, each driven
as containerd's runc v2 shim drives a runtime (tests/helpers.py's ShimContainer: global flags,
stdio pipes, log.json; the bench is a child subreaper and reaps the container's init, as the
shim does). Per cycle: restored / cold (the reason from the runtime log) / failed (a non-zero
create, or anything else wrong: the restored count not continuing, the rootfs diff missing, a
runtime call failing, anything of the container left after its delete), create latency.
Leak counts before the cycles, every --check-every cycles and after.

    python bench/soak.py [--cycles 1000] [--check-every 100] [--keep]
    python bench/soak.py --mode pull [--cycles 1000] ...

--mode pull (issue 22, limits): two namespaces (team-a, team-b) each capture the counter once and
push it to a local registry (Debian's docker-registry, plain HTTP on 127.0.0.1); the store gets a
quota per namespace (3x a snapshot) and a max_bytes. Each cycle is one pull: two thirds `thaw
pull` a namespace's snapshot from the good registry then restore it through thaw-runtime in a pod
of that namespace (and `thaw rm` it); one third pull from a malicious registry (a blob declared
large then cut, bytes trickled past registry.pull_deadline, error bodies with terminal escapes and
an echoed Authorization header, more blobs than registry.max_blobs, a malformed CRIU layer, a
snapshot over the namespace's quota), each of which must fail with one clean line, a `pull` event,
and no pull area, staging entry or byte left. Store usage is sampled after every cycle;
quotas_exceeded counts samples over a quota.

Uses thaw-runtime, thaw and thaw-hook from PATH (the installation under test) with a config of
its own (store, state_dir, runc root under one temp directory). Not in CI. Results:
bench/results/soak-*.json.
"""

from __future__ import annotations

import argparse
import ctypes
import glob
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import tempfile
import time
import uuid

from common import machine, save
from helpers import ShimContainer, etc_image, overlay_bundle, wait_for

# The captured program changes its rootfs (adds /data/state.txt, deletes the image's /etc/motd and
# /etc/conf.d, replaces /etc/app.conf) and counts: a restore applies the diff and goes on counting.
SOURCE = ["sh", "-c", "mkdir -p /data; echo restored-state > /data/state.txt; rm -f /etc/motd; "
          "rm -rf /etc/conf.d; echo changed > /etc/app.conf; i=0; "
          "while true; do echo tick $i; i=$((i+1)); sleep 0.05; done"]
IMAGE = "docker.io/library/busybox:1.36.1"
REF = "soak:1"
_PR_SET_CHILD_SUBREAPER = 36


def ticks(text: str) -> list[int]:
    return [int(x) for x in re.findall(r"tick (\d+)", text)]


def _from_zero(text: str) -> str:
    """The output from the last `tick 0` on (a cold start's counter)."""
    at = [m.start() for m in re.finditer(r"(?m)^tick 0$", text)]
    return text[at[-1]:] if at else ""


def quantile(values: list[float], q: float) -> float:
    """Nearest rank: the value q of the samples are at or below."""
    s = sorted(values)
    return s[max(0, math.ceil(q * len(s)) - 1)]


def latency(values: list[float]) -> dict:
    if not values:
        return {}
    return {"n": len(values), "p50_ms": round(quantile(values, 0.5) * 1000, 1),
            "p99_ms": round(quantile(values, 0.99) * 1000, 1), "max_ms": round(max(values) * 1000, 1),
            "mean_ms": round(statistics.mean(values) * 1000, 1)}


def mountpoints() -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f]


def cgroup_hierarchies() -> list[str]:
    """Every cgroup hierarchy mounted on the host (one per controller on v1, plus v2's)."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[fields.index("-") + 1] in ("cgroup", "cgroup2") and fields[4].startswith("/sys/fs/cgroup"):
                out.append(fields[4])
    return out


def proc_stat(pid: str) -> tuple[str, int] | None:
    """(state, ppid) of a process, None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            rest = f.read().rsplit(")", 1)[1].split()
        return rest[0], int(rest[1])
    except (OSError, IndexError, ValueError):
        return None


class Soak:
    def __init__(self, cycles: int, check_every: int, keep: bool):
        self.cycles, self.check_every, self.keep = cycles, check_every, keep
        self.run_id = f"soak{uuid.uuid4().hex[:6]}"
        self.tmp = tempfile.mkdtemp(prefix=f"thaw-{self.run_id}-")
        self.store, self.state = os.path.join(self.tmp, "store"), os.path.join(self.tmp, "state")
        self.root, self.bundles = os.path.join(self.tmp, "runc-root"), os.path.join(self.tmp, "bundles")
        self.config = os.path.join(self.tmp, "config.yaml")
        self.runtime = shutil.which("thaw-runtime")
        self.thaw = shutil.which("thaw")
        if not (self.runtime and self.thaw and shutil.which("runc")):
            raise SystemExit("soak: needs thaw-runtime, thaw and runc on PATH")
        os.makedirs(self.bundles)
        self.image = self._image()
        self.captured_point: int | None = None     # the last tick the source printed before capture
        self.restored_first: int | None = None     # the first tick every restore prints
        self.snapshot_info: dict = {}
        self.inits_not_ours = 0                   # inits that were not the bench's children to reap
        self.ref = REF                            # what the cycles restore
        self.ns_args: list[str] = []              # -n NAMESPACE of the captured snapshot

    # --- setup ----------------------------------------------------------------------------------
    def _image(self) -> str:
        """The image's layer (the overlay's read-only lower): busybox, /etc/motd, /etc/app.conf and
        a directory /etc/conf.d that the captured program deletes or replaces."""
        return etc_image(os.path.join(self.tmp, "image"))

    def configure(self) -> None:
        import yaml
        cfg = {"store_dir": self.store, "state_dir": self.state}
        if shutil.which("thaw-hook"):
            cfg["hook"] = shutil.which("thaw-hook")
        with open(self.config, "w") as f:
            yaml.safe_dump(cfg, f)
        os.environ["THAW_CONFIG"] = self.config          # every runtime and CLI call reads it
        # The shim is its containers' subreaper: their inits become its children when runc exits.
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)

    def thaw_cli(self, *args: str) -> subprocess.CompletedProcess:
        proc = subprocess.run([self.thaw, *args], capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise SystemExit(f"thaw {' '.join(args)} failed: {proc.stdout}{proc.stderr}")
        return proc

    def bundle(self, cid: str, annotations: dict | None = None) -> str:
        return overlay_bundle(os.path.join(self.bundles, cid), self.image, SOURCE, annotations=annotations,
                              image=IMAGE, cgroup=f"/thaw-test/{cid}")

    def capture(self) -> None:
        cid = f"{self.run_id}-src"
        src = ShimContainer(self.runtime, self.root, self.bundle(cid), cid)
        if src.create() != 0:
            raise SystemExit(f"source create failed: {src.log_text()}")
        src.start()
        src.wait_output(lambda t: len(ticks(t)) > 15)
        self.captured_point = max(ticks(src.output()))
        t = time.perf_counter()
        self.thaw_cli("capture", cid, "--name", REF, "--root", self.root)
        self.snapshot_info["capture_s"] = round(time.perf_counter() - t, 3)
        after = ticks(src.output())
        self.snapshot_info["source_ticks_around_capture"] = [self.captured_point, max(after)]
        problems: list[str] = []
        self.stop(src, problems)
        self.unmount(os.path.join(src.bundle, "rootfs"), problems)
        if problems:
            raise SystemExit(f"source container: {problems}")
        info = json.loads(self.thaw_cli("inspect", REF, *self.ns_args).stdout)
        sizes = info["config"]["sizes"]
        if sizes.get("rootfs_deleted") != 2:       # etc/motd, etc/conf.d: the diff path is exercised
            raise SystemExit(f"snapshot has no deletions in its rootfs diff: {sizes}")
        self.snapshot_info.update(ref=REF, image=IMAGE, manifest=info.get("digest") or info.get("manifest"),
                                  sizes=sizes)
        if not self.keep:
            shutil.rmtree(src.bundle, ignore_errors=True)

    # --- one cycle --------------------------------------------------------------------------------
    def cycle(self, i: int) -> dict:
        cid = f"{self.run_id}-{i:05d}"
        c = ShimContainer(self.runtime, self.root, self.bundle(cid, {"thaw.dev/snapshot": self.ref}), cid)
        rootfs = os.path.join(c.bundle, "rootfs")
        out: dict = {"i": i, "id": cid}
        problems: list[str] = []
        outcome = "failed"
        try:
            rc = c.create(timeout=120)
            out["create_s"] = c.create_s
            if rc != 0:
                errors = [e.get("msg", "") for e in c.log_entries() if e.get("level") == "error"]
                problems.append(f"create exited {rc}: {(errors or [c.log_text()[-300:]])[-1]}")
            else:
                outcome = self.outcome(c, out, problems)
                start = c.run("start", cid, check=False)
                if start.returncode != 0:
                    problems.append(f"start exited {start.returncode}: {start.stderr.decode()[-300:]}")
                else:
                    self.verify(c, outcome, rootfs, problems)
        except Exception as exc:  # noqa: BLE001 - the soak goes on; this cycle failed
            problems.append(f"{type(exc).__name__}: {exc}"[:500])
        if problems:
            out["log"] = c.log_text()[-2000:]
            out["work_dir"] = self.work_dir_logs(cid)
        try:
            self.stop(c, problems, created=out.get("create_s") is not None and c.create_rc == 0)
        except Exception as exc:  # noqa: BLE001
            problems.append(f"stopping: {type(exc).__name__}: {exc}"[:500])
        orphans = self.reap_orphans()
        if orphans:
            out["orphans_reaped"] = orphans
        problems += self.left_behind(c)
        clean = self.unmount(rootfs, problems)
        if problems:
            outcome = "failed"
            out["problems"] = problems
        elif clean and not self.keep:
            shutil.rmtree(c.bundle, ignore_errors=True)
        out["outcome"] = outcome
        return out

    def outcome(self, c: ShimContainer, out: dict, problems: list[str]) -> str:
        """restored or cold, from what thaw wrote to the runtime log (containerd's view)."""
        restored = cold = None
        other = []
        for e in c.log_entries():
            msg = e.get("msg", "")
            if msg.startswith("thaw: restored "):
                restored = msg
            elif msg.startswith("thaw: cold start"):
                cold = msg
            elif e.get("level") in ("warning", "error"):
                other.append(msg[:300])
        if other:
            problems.append(f"warnings in the runtime log: {other[:3]}")
        if restored and not cold:
            return "restored"
        if cold:
            m = re.search(r"restore not possible: (.*)\)$", cold)
            out["reason"] = m.group(1) if m else cold
            return "cold"
        problems.append("create exited 0 but thaw logged neither a restore nor a cold start")
        return "failed"

    def verify(self, c: ShimContainer, outcome: str, rootfs: str, problems: list[str]) -> None:
        """The container runs: a restored one goes on from the captured count (always the same
        first tick: one image) with the captured rootfs diff in place; a cold one counts from 0."""
        if outcome == "cold":
            # A restore that failed late (after runc restore) ran the restored process for a
            # moment: its ticks come first in the output, then the cold start's from 0.
            c.wait_output(lambda t: len(ticks(_from_zero(t))) >= 2, timeout=20)
            cold = ticks(_from_zero(c.output()))
            if cold[:2] != [0, 1]:
                problems.append(f"cold start does not count from 0: {cold[:5]}")
            return
        got = ticks(c.wait_output(lambda t: len(ticks(t)) >= 2, timeout=20))
        if got[1] != got[0] + 1:
            problems.append(f"count does not go on: {got[:5]}")
        if outcome != "restored":
            return
        assert self.captured_point is not None
        if self.restored_first is None:
            self.restored_first = got[0]
        if not got[0] > self.captured_point:
            problems.append(f"restored first tick {got[0]} is not past the captured point {self.captured_point}")
        elif got[0] != self.restored_first:
            problems.append(f"restored first tick {got[0]}, earlier restores began at {self.restored_first}")
        try:
            with open(os.path.join(rootfs, "data", "state.txt")) as f:
                state_ok = f.read() == "restored-state\n"
            with open(os.path.join(rootfs, "etc", "app.conf")) as f:
                conf_ok = f.read() == "changed\n"
        except OSError as exc:
            state_ok = conf_ok = False
            problems.append(f"rootfs diff missing: {exc}")
        if not (state_ok and conf_ok):
            problems.append("rootfs diff: a captured file has other content")
        if os.path.lexists(os.path.join(rootfs, "etc", "motd")) or os.path.lexists(os.path.join(rootfs, "etc", "conf.d")):
            problems.append("rootfs diff: deleted paths are back")

    def stop(self, c: ShimContainer, problems: list[str], created: bool = True) -> None:
        """What the shim does: `kill ID 9`, reap the init, `delete ID`; after a failed create,
        `delete --force ID`."""
        if not created:
            c.run("delete", "--force", c.id, check=False)
        else:
            pid = None
            try:
                pid = c.pid()
            except (OSError, ValueError) as exc:
                problems.append(f"no init pid after create: {exc}")
            kill = c.run("kill", c.id, "9", check=False)
            if kill.returncode != 0:
                problems.append(f"kill exited {kill.returncode}: {kill.stderr.decode()[-300:]}")
            if pid is not None:
                self.reap(pid, problems)
            delete = c.run("delete", c.id, check=False)
            if delete.returncode != 0:
                problems.append(f"delete exited {delete.returncode}: {delete.stderr.decode()[-300:]}")
                c.run("delete", "--force", c.id, check=False)
        for th in c._threads:        # the container held the write ends of its stdio pipes
            th.join(timeout=10)
            if th.is_alive():
                problems.append("stdio pipes still held open after delete")

    def reap(self, pid: int, problems: list[str]) -> None:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    return
            except ChildProcessError:            # not ours: someone else reaps it
                if proc_stat(str(pid)) is None:
                    self.inits_not_ours += 1
                    return
            time.sleep(0.01)
        problems.append(f"init {pid} did not exit within 15 s of SIGKILL")

    def reap_orphans(self) -> int:
        """Reap whatever else ended as the bench's child (the shim, a subreaper, reaps every
        child): e.g. a restored init that a failed create's rollback killed. (Exited children
        only, by pid: subprocess waits for its own.)"""
        me, n = os.getpid(), 0
        for pid in filter(str.isdigit, os.listdir("/proc")):
            st = proc_stat(pid)
            if st is not None and st == ("Z", me):
                try:
                    os.waitpid(int(pid), os.WNOHANG)
                    n += 1
                except ChildProcessError:
                    pass
        return n

    def left_behind(self, c: ShimContainer) -> list[str]:
        """Anything of this container still there after its delete."""
        cid, left = c.id, []
        if os.path.exists(os.path.join(self.root, cid)):
            left.append("runc state directory")
        for suffix in (".json", ".d"):
            if os.path.lexists(os.path.join(self.state, "containers", cid + suffix)):
                left.append(f"thaw state {cid}{suffix}")
        if glob.glob(os.path.join(c.bundle, ".thaw-undo-*")):
            left.append("undo directory")
        cg = [h for h in cgroup_hierarchies() if os.path.exists(os.path.join(h, "thaw-test", cid))]
        if cg:
            left.append(f"cgroup in {len(cg)} hierarchies")
        rootfs = os.path.realpath(os.path.join(c.bundle, "rootfs"))
        m = mountpoints()
        extra = [p for p in m if p.startswith((rootfs + "/", os.path.join(self.root, cid),
                                                os.path.join(self.state, "containers", cid)))]
        if extra or m.count(rootfs) != 1:
            left.append(f"mounts: {len(extra)} beneath, {m.count(rootfs)} on the rootfs")
        return [f"left behind: {x}" for x in left]

    def unmount(self, rootfs: str, problems: list[str]) -> bool:
        """Not lazily: a busy rootfs (a process of the container still in it) is a problem."""
        p = subprocess.run(["umount", rootfs], capture_output=True, text=True)
        if p.returncode != 0:
            problems.append(f"rootfs unmount: {p.stderr.strip()[-200:]}")
            subprocess.run(["umount", "-l", rootfs], capture_output=True)
            return False
        return True

    def work_dir_logs(self, cid: str) -> dict:
        """thaw's runc/CRIU logs of a failing container (gone once it is deleted)."""
        d = os.path.join(self.state, "containers", cid + ".d")
        out = {}
        for name in sorted(os.listdir(d)) if os.path.isdir(d) else []:
            p = os.path.join(d, name)
            if os.path.isfile(p) and name.endswith(".log"):
                with open(p, errors="replace") as f:
                    out[name] = f.read()[-1500:]
        return out

    # --- leaks ----------------------------------------------------------------------------------
    def leaks(self) -> dict:
        """Everything a cycle could leave, counted; equal before and after = no leak."""
        me = os.getpid()
        runc_ids = subprocess.run(["runc", "--root", self.root, "list", "-q"], capture_output=True,
                                  text=True).stdout.split()
        containers = os.path.join(self.state, "containers")
        state_entries = os.listdir(containers) if os.path.isdir(containers) else []
        mounts = [m for m in mountpoints() if m.startswith(self.tmp + "/")]
        cg_dirs, cg_procs = [], set()
        for h in cgroup_hierarchies():
            for top in glob.glob(os.path.join(h, "thaw-test", f"{self.run_id}-*")):
                for d, _, files in os.walk(top):
                    cg_dirs.append(d)
                    procs = "cgroup.procs" if "cgroup.procs" in files else "tasks"
                    try:
                        with open(os.path.join(d, procs)) as f:
                            cg_procs.update(f.read().split())
                    except OSError:
                        pass
        store_tmp = staging = store_files = 0
        for d, dirs, files in os.walk(self.store):
            if d == os.path.join(self.store, "staging"):
                staging += len(dirs) + len(files)
            store_files += len([n for n in files if not n.endswith(".lock")])   # locks persist by design
            store_tmp += len([n for n in dirs + files if n.startswith((".tmp-", ".blob-")) or n.endswith(".repair")])
        stats, run_pids = {}, set()
        for pid in filter(str.isdigit, os.listdir("/proc")):
            st = proc_stat(pid)
            if st is None or int(pid) == me:
                continue
            stats[pid] = st
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if self.run_id.encode() in f.read():
                        run_pids.add(pid)           # runc, CRIU, thaw-runtime, thaw-hook of this run
            except OSError:
                pass
        # A zombie of this run: the bench's child (not reaped), in its cgroups, or a child of one
        # of this run's runtime processes.
        zombies = [p for p, (state, ppid) in stats.items() if state == "Z" and
                   (ppid == me or p in cg_procs or str(ppid) in run_pids)]
        children = [p for p, (state, ppid) in stats.items() if state != "Z" and ppid == me]
        undo = glob.glob(os.path.join(self.tmp, "**", ".thaw-undo-*"), recursive=True)
        return {
            "runc_containers": len(runc_ids),
            "thaw_records": len([n for n in state_entries if n.endswith(".json")]),
            "thaw_work_dirs": len([n for n in state_entries if n.endswith(".d")]),
            "state_tmp_files": len([n for n in state_entries if n.startswith(".")]),
            "mounts": len(mounts),
            "cgroup_processes": len(cg_procs),
            "cgroup_dirs": len(cg_dirs),
            "store_staging": staging,
            "store_temp_files": store_tmp,
            "store_files": store_files,
            "bench_fds": len(os.listdir("/proc/self/fd")),
            "undo_dirs": len(undo),
            "zombies": len(zombies),
            "bench_children": len(children),           # between cycles the bench runs nothing
            "runtime_processes": len(run_pids),
        }

    def context(self) -> dict:
        """Not leaks, but worth seeing over a long run."""
        import threading
        rss = 0
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
        events = os.path.join(self.state, "events.log")
        zombies_host = sum(1 for p in filter(str.isdigit, os.listdir("/proc")) if (proc_stat(p) or ("",))[0] == "Z")
        return {"loadavg": [round(x, 2) for x in os.getloadavg()], "bench_rss_kib": rss,
                "bench_threads": threading.active_count(), "zombies_host": zombies_host,
                "events_log_bytes": os.path.getsize(events) if os.path.exists(events) else 0}

    def events(self, ids: set[str]) -> dict:
        """What the events log says about the cycles' containers: kinds, restore phase timings."""
        kinds: dict[str, int] = {}
        phases: dict[str, list[float]] = {}
        for name in ("events.log.1", "events.log"):
            p = os.path.join(self.state, name)
            if not os.path.exists(p):
                continue
            with open(p) as f:
                for line in f:
                    try:
                        e = json.loads(line)
                    except ValueError:
                        continue
                    if e.get("container") not in ids:
                        continue
                    kinds[e["kind"]] = kinds.get(e["kind"], 0) + 1
                    if e["kind"] == "restored":
                        for k, v in (e.get("phases") or {}).items():
                            phases.setdefault(k, []).append(v)
        return {"kinds": kinds, "restore_phases": {k: latency(v) for k, v in phases.items()}}

    # --- the run ----------------------------------------------------------------------------------
    def after_cycles(self) -> None:
        """Before the last leak count (nothing here; a mode may clean what it keeps by design)."""

    def run(self) -> dict:
        t0 = time.time()
        context = {"start": self.context()}
        self.configure()
        self.capture()
        before = self.leaks()
        checks = [{"after_cycles": 0, **before}]
        print(f"soak {self.run_id}: captured {REF} at tick {self.captured_point}; {self.cycles} cycles "
              f"(load {context['start']['loadavg']})", flush=True)
        results = []
        t_cycles = time.time()
        for i in range(self.cycles):
            r = self.cycle(i)
            results.append(r)
            if r["outcome"] not in ("restored", "refused"):    # refused: a malicious pull (--mode pull)
                print(f"  cycle {i}: {r['outcome']} {r.get('reason', '')} {r.get('problems', '')}"[:1500], flush=True)
            if self.check_every and (i + 1) % self.check_every == 0 and i + 1 < self.cycles:
                checks.append({"after_cycles": i + 1, **self.leaks()})
                context[f"after_{i + 1}"] = self.context()
                n = len(results)
                w = [x["create_s"] for x in results[-self.check_every:] if "create_s" in x]
                print(f"  {n} cycles: {sum(x['outcome'] == 'restored' for x in results)} restored, create p50 "
                      f"{quantile(w, 0.5) * 1000:.0f} ms (last {len(w)}), load {context[f'after_{n}']['loadavg']}",
                      flush=True)
        cycles_s = time.time() - t_cycles
        self.after_cycles()
        after = self.leaks()
        checks.append({"after_cycles": self.cycles, **after})
        context["end"] = self.context()
        return self.result(results, before, after, checks, context, time.time() - t0, cycles_s)

    def result(self, results, before, after, checks, context, duration_s, cycles_s) -> dict:
        counts = {k: sum(r["outcome"] == k for r in results) for k in ("restored", "cold", "failed")}
        creates = [r["create_s"] for r in results if "create_s" in r]
        by_outcome = {k: latency([r["create_s"] for r in results if r["outcome"] == k and "create_s" in r])
                      for k in counts}
        windows = []
        step = self.check_every or len(results) or 1
        for s in range(0, len(results), step):
            w = [r["create_s"] for r in results[s:s + step] if "create_s" in r]
            if w:
                windows.append({"cycles": [s, s + len(results[s:s + step]) - 1], **latency(w)})
        cold_reasons: dict[str, int] = {}
        for r in results:
            if r["outcome"] == "cold":
                cold_reasons[r.get("reason", "?")] = cold_reasons.get(r.get("reason", "?"), 0) + 1
        failures = [r for r in results if r["outcome"] == "failed"]
        leaked = {k: after[k] - before[k] for k in before if after[k] != before[k]}
        return {
            "benchmark": "soak", "run_id": self.run_id, "cycles": len(results), "machine": machine(),
            "runtime": self.runtime, "thaw": self.thaw,
            "snapshot": {**self.snapshot_info, "captured_point": self.captured_point,
                         "restored_first_tick": self.restored_first},
            "counts": counts, "cold_reasons": cold_reasons,
            "create_latency": latency(creates), "create_latency_by_outcome": by_outcome,
            "create_latency_by_window": windows,
            "create_ms": [round(r["create_s"] * 1000, 1) if "create_s" in r else None for r in results],
            "leaks_before": before, "leaks_after": after, "leaked": leaked, "leak_checks": checks,
            "events": self.events({r["id"] for r in results}),
            "failures": {"count": len(failures),
                         "problems": sorted({p for r in failures for p in r.get("problems", [])})[:50],
                         "first": failures[:5]},
            "inits_not_reaped_by_bench": self.inits_not_ours,
            "orphans_reaped": sum(r.get("orphans_reaped", 0) for r in results),
            "context": context, "duration_s": round(duration_s, 1), "cycles_s": round(cycles_s, 1),
            "target_met": counts["restored"] == len(results) and not counts["failed"] and not leaked,
        }

    def cleanup(self) -> None:
        """Leave nothing running; remove the temp dir unless --keep (never through a mount)."""
        for cid in subprocess.run(["runc", "--root", self.root, "list", "-q"], capture_output=True,
                                  text=True).stdout.split():
            subprocess.run(["runc", "--root", self.root, "delete", "--force", cid], capture_output=True)
        for m in sorted((m for m in mountpoints() if m.startswith(self.tmp + "/")), key=len, reverse=True):
            subprocess.run(["umount", "-l", m], capture_output=True)
        for h in cgroup_hierarchies():
            for d in sorted(glob.glob(os.path.join(h, "thaw-test", f"{self.run_id}-*")), reverse=True):
                try:
                    os.rmdir(d)
                except OSError:
                    pass
        if self.keep:
            print(f"kept {self.tmp}")
            return
        try:
            wait_for(lambda: not [m for m in mountpoints() if m.startswith(self.tmp + "/")], 10, "unmounts")
        except AssertionError:
            print(f"mounts left under {self.tmp}: not removed")
            return
        shutil.rmtree(self.tmp, ignore_errors=True)


def summary(r: dict) -> str:
    c, lat = r["counts"], r["create_latency"]
    lines = [f"soak: {r['cycles']} cycles in {r['cycles_s']:.0f} s: restored {c['restored']}, cold {c['cold']}, "
             f"failed {c['failed']}",
             f"create latency: p50 {lat.get('p50_ms')} ms, p99 {lat.get('p99_ms')} ms, max {lat.get('max_ms')} ms"]
    if r["cold_reasons"]:
        lines.append(f"cold reasons: {r['cold_reasons']}")
    if r["failures"]["problems"]:
        lines.append("problems: " + "; ".join(r["failures"]["problems"][:10]))
    lines.append("leaks (before -> after): " + ", ".join(
        f"{k} {r['leaks_before'][k]}->{r['leaks_after'][k]}" for k in r["leaks_before"]))
    lines.append(f"leaked: {r['leaked'] or 'nothing'}")
    lines.append(f"load: start {r['context']['start']['loadavg']}, end {r['context']['end']['loadavg']}")
    lines.append(f"target (all restored, 0 failed, 0 leaks): {'met' if r['target_met'] else 'MISSED'}")
    return "\n".join(lines)


NAMESPACES = ("team-a", "team-b")
TAGS = 4                                    # snapshots per namespace; the quota holds 3
ATTACKS = ("declared_large", "trickle", "error_body", "many_blobs", "malformed", "over_quota")


class PullSoak(Soak):
    """--mode pull: see the module docstring."""

    def __init__(self, cycles: int, check_every: int, keep: bool):
        super().__init__(cycles, check_every, keep)
        from registry_fixture.malicious import MaliciousRegistry
        from registry_fixture.server import RegistryServer
        self.registry = RegistryServer(os.path.join(self.tmp, "registry"))
        self.evil = MaliciousRegistry()
        self.refs: dict[tuple[str, int], str] = {}
        self.points: dict[tuple[str, int], int] = {}
        self.firsts: dict[tuple[str, int], int] = {}
        self.quota = 0
        self.max_bytes = 0
        self.usage: list[dict] = []
        self.ns = NAMESPACES[0]                   # the namespace of the pod being created

    def write_config(self, **extra) -> None:
        import yaml
        cfg = {"store_dir": self.store, "state_dir": self.state,
               "registry": {"insecure": [self.registry.host, self.evil.host], "pull_deadline": 4,
                            "max_blobs": 200},
               # The soak is about limits: both registries' unsigned snapshots are accepted.
               "trust": {"unsigned": [f"{self.registry.host}/", f"{self.evil.host}/"]}, **extra}
        if shutil.which("thaw-hook"):
            cfg["hook"] = shutil.which("thaw-hook")
        with open(self.config, "w") as f:
            yaml.safe_dump(cfg, f)

    def configure(self) -> None:
        super().configure()
        self.registry.start()
        self.evil.start()
        self.write_config()

    def bundle(self, cid: str, annotations: dict | None = None) -> str:
        ann = {"io.kubernetes.cri.sandbox-namespace": self.ns, **(annotations or {})}
        return overlay_bundle(os.path.join(self.bundles, cid), self.image, SOURCE, annotations=ann,
                              image=IMAGE, cgroup=f"/thaw-test/{cid}")

    def capture(self) -> None:
        """TAGS captures per namespace (different snapshots: different manifests), each pushed to
        the good registry under its own tag and removed from the store. The quota holds 3 of
        them: the cycles' pulls keep what they pulled, so every fourth one evicts its namespace's
        least recently used snapshot."""
        sizes = []
        for ns in NAMESPACES:
            for tag in range(TAGS):
                self.ns, self.ns_args = ns, ["-n", ns]
                super().capture()
                self.points[(ns, tag)] = self.captured_point or 0
                ref = f"{self.registry.host}/soak/{ns}:v{tag}"
                self.thaw_cli("push", REF, ref, "-n", ns)
                rows = json.loads(self.thaw_cli("ls", "-n", ns, "--json").stdout)
                sizes.append(max(r["size_bytes"] for r in rows))
                self.thaw_cli("rm", REF, "-n", ns)
                self.refs[(ns, tag)] = ref
        self.quota, self.max_bytes = int(3.5 * max(sizes)), 7 * max(sizes)
        self.write_config(store={"quota": dict.fromkeys(NAMESPACES, self.quota), "max_bytes": self.max_bytes})
        self.snapshot_info.update(refs=list(self.refs.values()), quota=self.quota, max_bytes=self.max_bytes,
                                  snapshot_bytes=max(sizes))
        self.thaw_cli("gc")

    def after_cycles(self) -> None:
        """What the pulls kept is removed before the last leak count (the store starts empty)."""
        for (ns, _tag), ref in self.refs.items():
            subprocess.run([self.thaw, "rm", ref, "-n", ns], capture_output=True, timeout=60)

    def cycle(self, i: int) -> dict:
        ns = NAMESPACES[(i // 3) % 2]
        out = self.attack(i, ATTACKS[(i // 3) % len(ATTACKS)], ns) if i % 3 == 2 else self.good(i, ns)
        self.sample(i)
        return out

    def good(self, i: int, ns: str) -> dict:
        key = (ns, (i // 6) % TAGS)
        ref = self.refs[key]
        # Pulled again each time (the pull is what is soaked): removed first if still there.
        subprocess.run([self.thaw, "rm", ref, "-n", ns], capture_output=True, timeout=60)
        t = time.perf_counter()
        pulled = subprocess.run([self.thaw, "pull", "-n", ns, ref], capture_output=True, text=True, timeout=300)
        pull_s = time.perf_counter() - t
        self.sample(i)                               # the pulled snapshot in the store
        if pulled.returncode != 0:
            return {"i": i, "id": f"pull-{i}", "kind": "good_pull", "namespace": ns, "outcome": "failed",
                    "problems": [f"good pull failed: {pulled.stderr.strip()[-500:]}"]}
        self.captured_point, self.restored_first = self.points[key], self.firsts.get(key)
        self.ns, self.ref = ns, ref
        out = Soak.cycle(self, i)
        if self.restored_first is not None:
            self.firsts[key] = self.restored_first
        out.update(kind="good_pull", namespace=ns, ref=ref, pull_s=round(pull_s, 3))
        return out

    def attack(self, i: int, kind: str, ns: str) -> dict:
        evil = self.evil
        evil.release.clear()
        evil.held.clear()
        evil.blob_behaviour.clear()
        evil.answer_all = None
        repo, problems = f"evil/{kind}{i}", []
        if kind == "declared_large":
            snap = evil.put_snapshot(repo, "v1", ns, parts=[os.urandom(404)], declared={0: self.quota // 2})
            evil.hold_after(snap.parts[0].desc.digest, 404, length=self.quota // 2)
            evil.release.set()                       # sends its 404 bytes and drops the connection
        elif kind == "trickle":
            snap = evil.put_snapshot(repo, "v1", ns, parts=[os.urandom(4096)])
            evil.trickle(snap.parts[0].desc.digest, 0.2)
        elif kind == "error_body":
            def answer(h) -> bool:
                body = json.dumps({"errors": [{"code": "DENIED", "message": "\x1b[2J\nforged line Authorization: "
                                               + str(h.headers.get("Authorization")) + " " + "x" * 20000}]}).encode()
                h.send_response(500)
                h.send_header("Content-Length", str(len(body)))
                h.end_headers()
                h.wfile.write(body)
                return True
            evil.answer_all = answer
        elif kind == "many_blobs":
            evil.put_snapshot(repo, "v1", ns, parts=[os.urandom(8) for _ in range(250)], parts_per_file=250)
        elif kind == "malformed":
            evil.put_snapshot(repo, "v1", ns, whole=b"not a tar" * 64)
        else:                                        # over_quota: a valid snapshot larger than the quota
            evil.put_snapshot(repo, "v1", ns, parts=[b"\0" * 4096], declared={0: self.quota + 1})
        t = time.perf_counter()
        proc = subprocess.run([self.thaw, "pull", "-n", ns, f"{evil.host}/{repo}:v1"], capture_output=True, text=True,
                              timeout=120)
        seconds = time.perf_counter() - t
        evil.release.set()
        evil.answer_all = None
        err = proc.stderr
        if proc.returncode == 0:
            problems.append("a malicious pull succeeded")
        if "\x1b" in err or "Traceback" in err or len(err.strip().splitlines()) != 1 or len(err) > 4000:
            problems.append(f"error output not one clean line: {err[:300]!r}")
        pulls = os.path.join(self.store, "pulls")
        areas = [n for n in os.listdir(pulls) if not n.endswith(".lock")] if os.path.isdir(pulls) else []
        if areas:
            problems.append(f"pull areas left: {areas}")
        staging = os.listdir(os.path.join(self.store, "staging"))
        if staging:
            problems.append(f"staging left: {staging}")
        return {"i": i, "id": f"attack-{i}", "kind": kind, "namespace": ns, "seconds": round(seconds, 3),
                "outcome": "failed" if problems else "refused", "error": err.strip()[:300],
                **({"problems": problems} if problems else {})}

    def sample(self, i: int) -> None:
        from thaw.shim.node.config import load
        from thaw.shim.node.store import Store
        store = Store.for_config(load(self.config))
        row = {"after_cycle": i, **{ns: store.usage(ns) for ns in NAMESPACES}, "total": store.total_bytes(),
               "disk": sum(os.lstat(os.path.join(d, n)).st_blocks * 512
                           for d, _, ns_ in os.walk(self.store) for n in ns_)}
        self.usage.append(row)

    def leaks(self) -> dict:
        out = super().leaks()
        pulls = os.path.join(self.store, "pulls")
        out["pull_areas"] = len([n for n in os.listdir(pulls) if not n.endswith(".lock")]) if os.path.isdir(pulls) else 0
        out["thaw_pull_processes"] = sum(1 for p in filter(str.isdigit, os.listdir("/proc"))
                                         if _cmdline_has(p, b"thaw\x00pull"))
        return out

    def result(self, results, before, after, checks, context, duration_s, cycles_s) -> dict:
        r = super().result(results, before, after, checks, context, duration_s, cycles_s)
        good = [x for x in results if x.get("kind") == "good_pull"]
        attacks = [x for x in results if x.get("kind") != "good_pull"]
        over = [u for u in self.usage if any(u[ns] > self.quota for ns in NAMESPACES) or u["total"] > self.max_bytes]
        by_kind: dict[str, dict[str, int]] = {}
        for a in attacks:
            k = by_kind.setdefault(a["kind"], {"refused": 0, "failed": 0})
            k[a["outcome"]] += 1
        evictions = 0
        for name in ("events.log.1", "events.log"):
            p = os.path.join(self.state, name)
            if os.path.exists(p):
                with open(p) as f:
                    evictions += sum(1 for line in f if '"kind": "store"' in line and "evicted" in line)
        r.update(benchmark="soak-pull", mode="pull", evictions=evictions,
                 pulls={"good": len(good), "good_failed": sum(x["outcome"] != "restored" for x in good),
                        "good_restored": sum(x["outcome"] == "restored" for x in good),
                        "pull_s": latency([x["pull_s"] for x in good if "pull_s" in x]),
                        "malicious": len(attacks), "malicious_by_kind": by_kind,
                        "malicious_s": latency([x["seconds"] for x in attacks])},
                 quota={"per_namespace": self.quota, "max_bytes": self.max_bytes,
                        "samples_over": len(over), "max_usage": {ns: max((u[ns] for u in self.usage), default=0)
                                                                 for ns in NAMESPACES},
                        "max_total": max((u["total"] for u in self.usage), default=0),
                        "max_disk": max((u["disk"] for u in self.usage), default=0)},
                 usage_samples=self.usage)
        r["target_met"] = (not r["leaked"] and r["pulls"]["good_failed"] == 0 and not over
                           and all(k["failed"] == 0 for k in by_kind.values()))
        return r

    def cleanup(self) -> None:
        self.evil.release.set()
        self.evil.stop()
        self.registry.stop()
        super().cleanup()


def _cmdline_has(pid: str, needle: bytes) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return needle in f.read()
    except OSError:
        return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", choices=("restore", "pull"), default="restore",
                    help="restore: one snapshot restored again and again; pull: pulls and restores, with quotas "
                         "and a malicious registry")
    ap.add_argument("--cycles", type=int, default=1000)
    ap.add_argument("--check-every", type=int, default=100, help="leak counts every N cycles (0: only before/after)")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (store, state, bundles)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("soak: run as root (runc, CRIU, overlay mounts)")
    soak = (PullSoak if args.mode == "pull" else Soak)(args.cycles, args.check_every, args.keep)
    try:
        result = soak.run()
    finally:
        soak.cleanup()
    path = save("soak-pull" if args.mode == "pull" else "soak", result)
    print(summary(result))
    if args.mode == "pull":
        p, q = result["pulls"], result["quota"]
        print(f"pulls: {p['good']} good ({p['good_failed']} failed, {p['good_restored']} restored), "
              f"{p['malicious']} malicious {p['malicious_by_kind']}; quota samples over: {q['samples_over']}, "
              f"max usage {q['max_usage']} of {q['per_namespace']}; evictions {result['evictions']}")
    print(f"saved {path}")


if __name__ == "__main__":
    main()
