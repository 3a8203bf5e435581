"""thaw's CRIU patch 0002 (--page-restore-workers, --page-restore-hugepages) against the real CRIU.

memzoo (tests/workloads/memzoo.c) holds random memory in every kind of mapping CRIU restores, in a
parent and two children that share memory copy-on-write. It is dumped once, then restored with the
stock loop (workers 0) and with the new one; every restore must give back every region byte for
byte (checksums), the same mappings and memory use as the stock restore (in private file mappings:
their anonymous memory, see compared_fields), and the only allowed difference is the documented one:
with huge pages on, a private anonymous area the restore filled completely may carry MADV_HUGEPAGE
("hg") that it was dumped without.

The CRIU under test is THAW_TEST_CRIU (default /usr/local/sbin/criu, what install/node.sh builds)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
import uuid

import memzoo as mz
import pytest

from conftest import prerequisite_missing

pytestmark = [pytest.mark.root, pytest.mark.criu]

SLACK_KB = 16        # per mapping: a few pages of stack or vdso that a report itself may touch


def thp_mode() -> str:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            m = re.search(r"\[(\w+)\]", f.read())
    except OSError:
        return "never"
    return m[1] if m else "never"


@pytest.fixture(scope="module", autouse=True)
def criu_has_patch():
    if not os.access(mz.CRIU, os.X_OK):
        prerequisite_missing(f"no CRIU at {mz.CRIU}")
    out = subprocess.run([mz.CRIU, "--help"], capture_output=True, text=True).stdout
    assert "--page-restore-workers" in out and "--page-restore-hugepages" in out, \
        f"{mz.CRIU} lacks thaw's patch 0002"


@pytest.fixture(scope="module")
def memzoo_bin(tmp_path_factory) -> str:
    return mz.build(str(tmp_path_factory.mktemp("memzoo-bin")))


class Dumped:
    """One memzoo tree, reported on and dumped; restore() brings it back with chosen options."""

    def __init__(self, binary: str, base: str, total_mib: int, threads: int, children: int):
        self.zoo = mz.Memzoo(binary, os.path.join(base, "work"), total_mib, threads, children)
        self.images = os.path.join(base, "images")
        self.zoo.start()
        self.before = self.zoo.report()
        self.threads = {r: self.zoo.tree()[pid] for r, pid in self.before.pids.items()}
        self.zoo.dump(self.images)
        self.restores: dict[str, mz.Report] = {}

    def restore(self, tag: str, *options: str, images: str | None = None) -> mz.Report:
        images = images or self.images
        try:
            self.zoo.restore(images, *options, log=f"restore-{tag}.log")
            report = self.zoo.report()
            # no helper left behind: the tree is the dumped processes with their threads, no more
            assert self.zoo.tree() == {report.pids[r]: self.threads[r] for r in self.zoo.roles}
        finally:
            self.zoo.kill()
            # a failed restore kills what it had forked; the next one needs those pids free
            mz.wait_for(lambda: not any(os.path.exists(f"/proc/{p}") for p in self.before.pids.values()),
                        60, "the dumped pids to be free")
        self.restores[tag] = report
        return report

    def log(self, tag: str, pattern: str, images: str | None = None) -> list[str]:
        return mz.criu_log_lines(images or self.images, f"restore-{tag}.log", pattern)

    def stock(self) -> mz.Report:
        if "stock" not in self.restores:
            self.restore("stock")
        return self.restores["stock"]


@pytest.fixture(scope="module")
def zoo(memzoo_bin, tmp_path_factory):
    """~2 GiB of random memory: 1.5 GiB in the parent's mappings, the rest in two children."""
    d = Dumped(memzoo_bin, str(tmp_path_factory.mktemp("memzoo")), 1536, 8, 2)
    yield d
    d.zoo.kill()


@pytest.fixture(scope="module")
def small_zoo(memzoo_bin, tmp_path_factory):
    """No threads: every task exists before any restorer fills memory (see the pids test)."""
    d = Dumped(memzoo_bin, str(tmp_path_factory.mktemp("memzoo-small")), 128, 0, 1)
    yield d
    d.zoo.kill()


def fill_workers(d: Dumped, tag: str) -> list[int]:
    """Worker counts the restorers logged ("page fill: N KiB, W workers, ...")."""
    found = [re.search(r"(\d+) workers", line) for line in d.log(tag, "page fill: .* workers")]
    assert all(found), found
    return [int(m[1]) for m in found if m]


def assert_same_memory(d: Dumped, got: mz.Report) -> None:
    want = d.before.hashes()
    have = got.hashes()
    assert set(have) == set(want)
    bad = []
    for key, h in want.items():
        if have[key] != h:
            role, name = key
            chunks = [i for i, (a, b) in enumerate(zip(d.before.regions[role][name]["chunks"],
                                                        got.regions[role][name]["chunks"])) if a != b]
            bad.append(f"{role}/{name}: 2 MiB chunks {chunks[:10]}{'...' if len(chunks) > 10 else ''} differ")
    assert not bad, "restored memory differs from the dumped memory:\n" + "\n".join(bad)


def hg_allowed(m: mz.Mapping, stock: mz.Mapping) -> bool:
    """The documented difference: MADV_HUGEPAGE on a private anonymous area filled completely."""
    return (m.perms.endswith("p") and m.name in ("", "[heap]") and "nh" not in stock.flags
            and stock.fields.get("Rss") == stock.fields.get("Size"))


def compared_fields(m: mz.Mapping) -> tuple[str, ...]:
    """The smaps fields of a mapping that tell what a restore left in it.

    In a private mapping of a file the restore's pages are anonymous copies of the dumped ones
    (Anonymous); the file's clean page-cache pages are not in the images, and right after a restore,
    stock or not, none is mapped. The ones Rss counts at report time were mapped by the program's own
    read faults after it resumed, and fault-around maps a varying number of them: it maps whole
    page-cache folios (their sizes depend on how the file got into the cache) and skips a folio that
    another process holds locked, here a process of the same tree faulting the same binary at the
    moment (fault-around only trylocks; the fault proper then maps the one page). With a static
    memzoo (libc inside the binary) a child's read-only mapping of the binary showed Rss 12 kB after
    one restore and 76 kB after another, Anonymous 0 in both; so Rss is left out there."""
    if m.name.startswith("/") and m.perms.endswith("p"):
        return ("Anonymous", "Swap")
    return ("Rss", "Anonymous", "Swap")


def assert_same_mappings(stock: mz.Report, got: mz.Report, hugepages: bool) -> None:
    """Same areas, same flags (but the allowed "hg"), same memory use per area as a stock restore."""
    problems = []
    for role in stock.smaps:
        want = {m.key: m for m in stock.smaps[role]}
        have = {m.key: m for m in got.smaps[role]}
        for k in sorted(set(want) ^ set(have)):
            side = "stock only" if k in want else "new only"
            problems.append(f"{role}: {side} mapping {k[0]:x}-{k[1]:x} {k[2]} {k[4]}")
        for k in sorted(set(want) & set(have)):
            s, m = want[k], have[k]
            extra, missing = m.flags - s.flags, s.flags - m.flags
            if missing or (extra and (extra != {"hg"} or not hugepages or not hg_allowed(m, s))):
                problems.append(f"{role}: {k[0]:x}-{k[1]:x} {k[4]} VmFlags {sorted(s.flags)} -> {sorted(m.flags)}")
            for f in compared_fields(s):
                if abs(m.fields.get(f, 0) - s.fields.get(f, 0)) > SLACK_KB:
                    problems.append(f"{role}: {k[0]:x}-{k[1]:x} {k[4]} {f} {s.fields.get(f)} kB -> "
                                    f"{m.fields.get(f)} kB")
    assert not problems, "mappings differ from a stock restore:\n" + "\n".join(problems)


def assert_no_anon_growth(d: Dumped, got: mz.Report) -> None:
    """Private anonymous memory after a restore is what was dumped: no huge page over a hole."""
    problems = []
    for role in d.before.smaps:
        have = {m.key: m for m in got.smaps[role]}
        for m in d.before.smaps[role]:
            r = have.get(m.key)
            if r is None or m.name not in ("", "[heap]") or not m.perms.endswith("p"):
                continue
            if r.fields["Anonymous"] > m.fields["Anonymous"] + SLACK_KB:
                problems.append(f"{role}: {m.start:x}-{m.end:x} {d.before.region_of(role, m)}: Anonymous "
                                f"{m.fields['Anonymous']} kB dumped, {r.fields['Anonymous']} kB restored")
    assert not problems, "\n".join(problems)


# --- the options exist and parse ----------------------------------------------------------------

def test_help_lists_the_options():
    out = subprocess.run([mz.CRIU, "--help"], capture_output=True, text=True).stdout
    assert "--page-restore-workers N" in out
    assert "--page-restore-hugepages" in out


@pytest.mark.parametrize("value", ["65", "-1", "x", ""])
def test_bad_worker_counts_are_refused(value, tmp_path):
    proc = subprocess.run([mz.CRIU, "restore", "-D", str(tmp_path), "--page-restore-workers", value],
                          capture_output=True, text=True)
    assert proc.returncode != 0
    assert "page-restore-workers" in proc.stdout + proc.stderr


def test_mappings_compare_what_the_restore_leaves():
    """Page cache that a private file mapping shows more of is no difference; anonymous memory is."""
    def report(rodata_rss: int, rodata_anon: int, heap_rss: int) -> mz.Report:
        maps = [mz.Mapping(0x48d000, 0x4b8000, "r--p", 0x8d000, "/x/memzoo",
                           {"Rss": rodata_rss, "Anonymous": rodata_anon, "Swap": 0}),
                mz.Mapping(0x4c0000, 0x5c0000, "rw-p", 0, "[heap]",
                           {"Rss": heap_rss, "Anonymous": heap_rss, "Swap": 0})]
        return mz.Report({"child0": 1}, {"child0": {}}, {"child0": maps})

    assert_same_mappings(report(12, 0, 1024), report(76, 0, 1024), hugepages=False)
    with pytest.raises(AssertionError, match="Anonymous 0 kB -> 64 kB"):
        assert_same_mappings(report(12, 0, 1024), report(76, 64, 1024), hugepages=False)
    with pytest.raises(AssertionError, match=r"\[heap\] Rss 1024 kB -> 1088 kB"):
        assert_same_mappings(report(12, 0, 1024), report(12, 0, 1088), hugepages=False)


# --- the big tree: every kind of mapping --------------------------------------------------------

def test_stock_restore_gives_back_the_dumped_memory(zoo):
    got = zoo.stock()
    assert_same_memory(zoo, got)
    assert fill_workers(zoo, "stock") == [], "workers 0 must keep the stock loop"
    assert_no_anon_growth(zoo, got)


@pytest.mark.parametrize("workers", [4, 2])
def test_workers_restore_the_same_memory_and_mappings(zoo, workers):
    tag = f"w{workers}"
    got = zoo.restore(tag, "--page-restore-workers", str(workers))
    assert_same_memory(zoo, got)
    # the parent (1.3 GiB to fill) gets every worker; the children have less to do
    assert max(fill_workers(zoo, tag)) == workers
    assert_same_mappings(zoo.stock(), got, hugepages=False)
    assert_no_anon_growth(zoo, got)


@pytest.mark.parametrize("workers", [4, 1])
def test_hugepages_restore_the_same_memory_onto_huge_pages(zoo, workers):
    tag = f"w{workers}h"
    got = zoo.restore(tag, "--page-restore-workers", str(workers), "--page-restore-hugepages")
    assert_same_memory(zoo, got)
    assert max(fill_workers(zoo, tag)) == workers
    assert_same_mappings(zoo.stock(), got, hugepages=True)
    assert_no_anon_growth(zoo, got)

    parent = {got.region_of("parent", m): m for m in got.smaps["parent"]}
    if thp_mode() == "madvise":
        # a dense area gets the advice and huge pages; areas with holes, or dumped MADV_NOHUGEPAGE,
        # or touching an area with different advice, keep the stock path
        assert "hg" in parent["anon_dense"].flags and parent["anon_dense"].fields["AnonHugePages"] > 0
        assert parent["anon_thp"].fields["AnonHugePages"] > 0, "dumped MADV_HUGEPAGE, restored dense"
        for name in ("anon_sparse", "anon_nothp", "neighbour_plain"):
            stock = {zoo.stock().region_of("parent", m): m for m in zoo.stock().smaps["parent"]}[name]
            assert parent[name].flags == stock.flags, name
            assert parent[name].fields["AnonHugePages"] == 0, name


def test_workers_step_aside_for_auto_dedup(small_zoo, tmp_path):
    images = str(tmp_path / "images")
    shutil.copytree(small_zoo.images, images)    # auto-dedup punches the pages out of its image
    got = small_zoo.restore("dedup", "--auto-dedup", "--page-restore-workers", "4", images=images)
    assert_same_memory(small_zoo, got)
    assert small_zoo.log("dedup", "not with --auto-dedup", images=images)
    assert not small_zoo.log("dedup", r"page fill: \d+ KiB", images=images)


def test_options_from_a_config_file(small_zoo, tmp_path):
    conf = tmp_path / "criu.conf"
    conf.write_text("page-restore-workers 3\npage-restore-hugepages\n")
    got = small_zoo.restore("conf", "--config", str(conf))
    assert_same_memory(small_zoo, got)
    assert max(fill_workers(small_zoo, "conf")) == 3


# --- helpers that cannot be created -------------------------------------------------------------

def _pids_controller() -> str | None:
    if os.path.exists("/sys/fs/cgroup/pids/cgroup.procs"):
        return "/sys/fs/cgroup/pids"                           # cgroup v1
    try:
        with open("/sys/fs/cgroup/cgroup.subtree_control") as f:
            return "/sys/fs/cgroup" if "pids" in f.read().split() else None
    except OSError:
        return None


def test_restore_succeeds_when_helpers_cannot_be_created(small_zoo):
    """Under the tightest pids limit the stock restore fits in, the restorer fills alone."""
    base = _pids_controller()
    if base is None:
        prerequisite_missing("no pids cgroup controller to limit the restore with")
    cg = os.path.join(base, f"thaw-test-{uuid.uuid4().hex[:8]}")
    os.mkdir(cg)
    wrapper = os.path.join(small_zoo.images, "criu-in-cgroup.sh")
    with open(wrapper, "w") as f:
        f.write(f'#!/bin/sh\necho $$ > {cg}/cgroup.procs || exit 97\nexec {mz.CRIU} "$@"\n')
    os.chmod(wrapper, 0o755)

    def restore_under(limit: int, tag: str, *options: str) -> mz.Report:
        with open(os.path.join(cg, "pids.max"), "w") as f:
            f.write(str(limit))
        saved, mz.CRIU = mz.CRIU, wrapper
        try:
            return small_zoo.restore(tag, *options)
        finally:
            mz.CRIU = saved

    try:
        limit = None
        for n in range(2, 16):
            try:
                restore_under(n, f"pids{n}")
            except mz.MemzooError:
                continue
            limit = n
            break
        assert limit is not None, "the stock restore never fit under a pids limit up to 15"
        got = restore_under(limit, "pidsfill", "--page-restore-workers", "4")
        assert_same_memory(small_zoo, got)
        assert small_zoo.log("pidsfill", "page fill: helper 0 not started")
        assert set(fill_workers(small_zoo, "pidsfill")) == {1}
    finally:
        deadline = time.monotonic() + 10
        while os.path.exists(cg) and time.monotonic() < deadline:
            try:
                os.rmdir(cg)
            except OSError:
                time.sleep(0.1)
