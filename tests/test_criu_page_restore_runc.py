"""thaw's CRIU page-restore options through `runc restore`, as thaw-runtime uses them: in a CRIU
config file named by the org.criu.config annotation (runc hands it to CRIU in RPC mode), for a
container under a tight memory limit and a CPU quota. The fill runs inside the container's cgroup:
it must need no more memory than the stock restore (no OOM) and finish under the quota."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import memzoo as mz
import pytest

from helpers import unique

pytestmark = [pytest.mark.root, pytest.mark.runc, pytest.mark.criu]

TOTAL_MIB = 384


class RuncZoo:
    """memzoo as a runc container; restores go through `runc restore` with a CRIU config file."""

    def __init__(self, base: str, binary: str):
        self.base = base
        self.root = os.path.join(base, "runc-root")
        self.work = os.path.join(base, "work")              # /work in the container, read-write
        self.images = os.path.join(base, "images")
        os.makedirs(self.work)
        shutil.copy2(binary, os.path.join(self.work, "memzoo"))
        self.zoo = mz.Memzoo(binary, self.work, TOTAL_MIB, threads=4, children=1)
        self.ids: list[str] = []

    def bundle(self, name: str, memory_limit: int | None, criu_conf: str | None) -> str:
        annotations = {"org.criu.config": criu_conf} if criu_conf else {}
        return mz.container_bundle(os.path.join(self.base, name), self.work, TOTAL_MIB, annotations, memory_limit)

    def runc(self, *args: str, timeout: float = 300) -> None:
        proc = subprocess.run(["runc", "--root", self.root, "--criu", mz.CRIU, *args], stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=timeout)
        if proc.returncode != 0:
            raise AssertionError(f"runc {args[0]} failed: {proc.stderr.decode()}")

    def run(self, bundle: str) -> None:
        cid = unique("zoo")
        self.ids.append(cid)
        pidfile = os.path.join(self.base, "run.pid")
        self.runc("run", "-d", "--bundle", bundle, "--pid-file", pidfile, cid)
        self.cid = cid
        self.zoo.pid = int(open(pidfile).read())
        mz.wait_for(lambda: all(os.path.exists(os.path.join(self.work, f"ready-{r}")) for r in self.zoo.roles),
                    120, "memzoo in the container")

    def checkpoint(self) -> None:
        self.runc("checkpoint", "--image-path", self.images, "--work-path", os.path.join(self.base, "ckpt-work"),
                  self.cid)

    def restore(self, bundle: str, tag: str) -> str:
        """runc restore; returns the CRIU restore log."""
        cid = unique("zoo")
        self.ids.append(cid)
        work = os.path.join(self.base, f"restore-{tag}")
        pidfile = os.path.join(self.base, f"{tag}.pid")
        self.runc("restore", "-d", "--image-path", self.images, "--work-path", work, "--bundle", bundle,
                  "--pid-file", pidfile, cid, timeout=600)
        self.cid = cid
        self.zoo.pid = int(open(pidfile).read())
        with open(os.path.join(work, "restore.log")) as f:
            return f.read()

    def memory_facts(self) -> dict[str, int]:
        state = subprocess.run(["runc", "--root", self.root, "state", self.cid], capture_output=True, text=True)
        return mz.memory_facts(json.loads(state.stdout)["pid"])

    def destroy(self) -> None:
        for cid in self.ids:
            subprocess.run(["runc", "--root", self.root, "kill", cid, "KILL"], capture_output=True)
            subprocess.run(["runc", "--root", self.root, "delete", "--force", cid], capture_output=True)
        self.ids = []


def test_runc_restore_takes_the_options_from_the_criu_config_annotation(tmp_path):
    binary = mz.build(str(tmp_path))
    rz = RuncZoo(str(tmp_path), binary)
    stock_conf = tmp_path / "criu-stock.conf"
    stock_conf.write_text("page-restore-workers 0\n")
    fast_conf = tmp_path / "criu-fast.conf"
    fast_conf.write_text("page-restore-workers 4\npage-restore-hugepages\n")
    try:
        rz.run(rz.bundle("src", None, None))
        before = rz.zoo.report()
        rz.checkpoint()

        # stock restore, with room: how much memory does it take?
        log = rz.restore(rz.bundle("stock", None, str(stock_conf)), "stock")
        assert "page fill" not in log
        stock = rz.zoo.report()
        assert stock.hashes() == before.hashes()
        stock_peak = rz.memory_facts()["peak"]
        rz.destroy()

        # the fast restore under a limit just above what the stock restore took, and half a CPU
        limit = stock_peak + 16 * 2**20
        log = rz.restore(rz.bundle("fast", limit, str(fast_conf)), "fast")
        workers = [int(m) for m in re.findall(r"page fill: \d+ KiB, (\d+) workers", log)]
        assert max(workers) == 4, "the options in the org.criu.config file did not reach CRIU"
        fast = rz.zoo.report()
        facts = rz.memory_facts()
        print(f"stock peak {stock_peak >> 20} MiB, limit {limit >> 20} MiB, fast {facts}, workers {workers}")
        assert facts["oom_kill"] == 0
        assert facts["peak"] <= limit
        assert fast.hashes() == before.hashes(), "memory differs after the fast restore"
        for role in stock.smaps:
            assert [m.key for m in fast.smaps[role]] == [m.key for m in stock.smaps[role]]
    finally:
        rz.destroy()
