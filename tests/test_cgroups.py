"""shim/node/cgroups.py on this machine's real cgroup hierarchies: kill_all empties a cgroup whose
processes fork while it runs, through cgroup.kill (v2) and through freeze + SIGKILL + thaw (every
v1 freezer or pids hierarchy mounted here; a hybrid host has both), then removes it."""

from __future__ import annotations

import os
import subprocess
import uuid

import pytest

from helpers import wait_for
from thaw.shim.drivers.mounts import MountTable
from thaw.shim.node import cgroups

pytestmark = pytest.mark.root


def _hierarchies() -> list[str]:
    found = MountTable.read().cgroup_hierarchies()
    return [k for k in ("cgroup2", "freezer", "pids") if k in found]


@pytest.mark.parametrize("kind", _hierarchies())
def test_kill_all_empties_a_forking_cgroup_and_removes_it(kind):
    mountpoint, _ = MountTable.read().cgroup_hierarchies()[kind]
    path = os.path.join(mountpoint, f"thaw-test-kill-{uuid.uuid4().hex[:8]}")
    cgroups.make(path)
    procs_file = os.path.join(path, "cgroup.procs")
    # A shell that joins the cgroup, then forks without end (children in a session of their own).
    forker = subprocess.Popen(["sh", "-c", f'echo $$ > {procs_file} && while :; do setsid sleep 30 & done'],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: len(cgroups.procs([path])) > 5, 10, "the forker to fork")
        killed, left = cgroups.kill_all([path])
        assert killed > 5 and left == set()
        assert not os.path.exists(path)
        assert forker.wait(timeout=10) == -9
    finally:
        forker.kill()
        if os.path.isdir(path):
            for pid in cgroups.procs([path]):
                os.kill(pid, 9)
            wait_for(lambda: not cgroups.procs([path]), 10, "the cgroup to empty")
            os.rmdir(path)


def test_the_scratch_cgroup_is_below_this_process_s_own():
    path = cgroups.scratch_path("thaw-restore-x")
    kind = "cgroup2" if "cgroup2" in MountTable.read().cgroup_hierarchies() else "freezer"
    mountpoint, _ = MountTable.read().cgroup_hierarchies()[kind]
    own = cgroups._own(kind)
    assert path == os.path.normpath(os.path.join(mountpoint, (own or "/").lstrip("/"), "thaw-restore-x"))
