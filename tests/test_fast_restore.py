"""The fast page fill through thaw-runtime: a memzoo container (memory of every kind of mapping,
several processes and threads) captured with `thaw capture` and restored by thaw-runtime with
`restore.workers: 0` (CRIU's stock fill) and with workers and huge pages, under a tight memory
limit and a CPU quota. Memory must be identical to the dump's either way."""

from __future__ import annotations

import json
import os
import re
import shutil

import memzoo as mz
import pytest

pytestmark = [pytest.mark.root, pytest.mark.runc, pytest.mark.criu]

TOTAL_MIB = 384


def bundle(path: str, work: str, annotations=None, memory_limit: int | None = None) -> str:
    return mz.container_bundle(path, work, TOTAL_MIB, annotations, memory_limit)


def test_fast_and_stock_fill_give_the_dumped_memory(thaw_env, tmp_path):
    binary = mz.build(str(tmp_path))
    work = str(tmp_path / "work")
    os.makedirs(work)
    shutil.copy2(binary, os.path.join(work, "memzoo"))
    zoo = mz.Memzoo(binary, work, TOTAL_MIB, threads=4, children=1)

    src = thaw_env.container(bundle(str(tmp_path / "src"), work))
    assert src.create() == 0, src.log_text()
    src.start()
    mz.wait_for(lambda: all(os.path.exists(os.path.join(work, f"ready-{r}")) for r in zoo.roles), 120, "memzoo")
    zoo.pid = src.pid()
    dumped = zoo.report()
    thaw_env.thaw("capture", src.id, "--name", "zoo:1", "--root", thaw_env.root, "--exit")
    src.destroy()

    def restore(name: str, workers: int, hugepages: bool, memory_limit: int | None = None):
        thaw_env.write_config(restore={"workers": workers, "hugepages": hugepages})
        c = thaw_env.container(bundle(str(tmp_path / name), work, {"thaw.dev/snapshot": "zoo:1"}, memory_limit))
        assert c.create() == 0, c.log_text()
        assert not [e for e in c.log_entries() if e.get("level") == "warning"], c.log_text()
        record = json.load(open(os.path.join(thaw_env.state, "containers", c.id + ".json")))
        log = open(os.path.join(thaw_env.state, "containers", c.id + ".d", "restore.log")).read()
        c.start()
        zoo.pid = c.pid()
        return c, record, log, zoo.report()

    stock, record, log, stock_report = restore("stock", 0, False)
    assert record["fill"] == "stock" and "page fill" not in log
    assert stock_report.hashes() == dumped.hashes()
    stock_peak = mz.memory_facts(stock.pid())["peak"]
    stock.destroy()

    # The fast fill runs inside the container's cgroup: a limit just above what the stock restore
    # took, and half a CPU, must be enough.
    limit = stock_peak + 16 * 2**20
    fast, record, log, fast_report = restore("fast", 4, True, limit)
    assert record["fill"] == "page-restore-workers 4 page-restore-hugepages"
    assert max(int(m) for m in re.findall(r"page fill: \d+ KiB, (\d+) workers", log)) == 4
    facts = mz.memory_facts(fast.pid())
    assert facts["oom_kill"] == 0 and facts["peak"] <= limit, (facts, limit)
    assert fast_report.hashes() == dumped.hashes(), "memory differs after the fast fill"
    for role in stock_report.smaps:                   # the same mappings, where and how they were
        assert [m.key for m in fast_report.smaps[role]] == [m.key for m in stock_report.smaps[role]]
        for a, b in zip(fast_report.smaps[role], stock_report.smaps[role]):
            assert a.fields.get("Rss", 0) <= b.fields.get("Rss", 0) + 2048, (role, a, b)   # 2 MiB slack
    fast.destroy()
