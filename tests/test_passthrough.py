"""Passthrough: every call thaw does not handle reaches the next runtime unchanged, in the same
process, with the same fds; a container without the annotation behaves exactly as with runc."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from typing import Any

import pytest

from helpers import make_bundle, unique

RECORDER = """#!/bin/sh
# Records how it was called (its fds read before any redirection), then behaves like runc.
fds=$(for f in /proc/$$/fd/*; do echo "fd${{f##*/}}=$(readlink $f)"; done)
{{
  echo "pid=$$"
  for a in "$@"; do printf 'arg=%s\\n' "$a"; done
  echo "$fds"
}} >> {log}
exec {runc} "$@"
"""


@pytest.fixture
def recorder(thaw_env, tmp_path):
    log = tmp_path / "calls.log"
    path = tmp_path / "recorder.sh"
    path.write_text(RECORDER.format(log=log, runc=shutil.which("runc") or "runc"))
    path.chmod(0o755)
    thaw_env.write_config(next_runtime=str(path))
    return log


def calls(log) -> list[dict]:
    out: list[dict[str, Any]] = []
    cur: dict[str, Any] | None = None
    for line in log.read_text().splitlines():
        k, _, v = line.partition("=")
        if k == "pid":
            cur = {"pid": int(v), "args": []}
            out.append(cur)
        elif k == "arg":
            assert cur is not None, line
            cur["args"].append(v)
        else:
            assert cur is not None, line
            cur[k] = v
    return out


@pytest.mark.root
@pytest.mark.runc
@pytest.mark.parametrize("argv", [
    ["--version"],
    ["features"],
    ["--root", "/nonexistent-root", "list"],
    ["-root=/x", "--log", "/dev/null", "state", "some-id"],
    ["--debug", "exec", "--process", "/nonexistent", "--detach", "id"],
    ["create", "--bogus-flag", "id"],                  # not understood: still passed through
    ["create", "--bundle", "/nonexistent", "id"],       # unreadable bundle: passed through
    ["kill", "--all", "id", "9"],
])
def test_argv_reaches_next_runtime_unchanged(thaw_env, recorder, argv):
    r, w = os.pipe()
    proc = subprocess.Popen(["thaw-runtime", *argv], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, pass_fds=(w,))
    os.close(w)
    proc.communicate(timeout=30)
    os.close(r)
    [call] = calls(recorder)
    assert call["args"] == argv
    assert call["pid"] == proc.pid                      # execv: the same process
    assert call[f"fd{w}"].startswith("pipe:")           # inherited fds survive
    assert call["fd0"] == "/dev/null" and call["fd1"].startswith("pipe:")


@pytest.mark.root
@pytest.mark.runc
def test_container_without_annotation_runs_as_with_runc(thaw_env, tmp_path):
    args = ["sh", "-c", "echo out-line; echo err-line >&2; cat /etc/hostname; exit 3"]
    results = {}
    for runtime in ("runc", "thaw-runtime"):
        bundle = make_bundle(str(tmp_path / runtime), args,
                             annotations={"io.kubernetes.cri.container-name": "app"})
        c = thaw_env.container(bundle, unique(runtime), runtime=runtime)
        assert c.create() == 0, c.log_text()
        st = c.state()
        assert st["status"] == "created" and st["pid"] == c.pid()
        c.start()
        for _ in range(100):
            if c.state()["status"] == "stopped":
                break
            import time
            time.sleep(0.05)
        c.run("delete", c.id)
        for th in c._threads:
            th.join(timeout=5)
        results[runtime] = (c.output(), "".join(c.stderr), st["status"], c.log_text())
    assert results["runc"][:3] == results["thaw-runtime"][:3]
    assert results["thaw-runtime"][0] == "out-line\nthaw-test\n"
    assert results["thaw-runtime"][3] == ""            # thaw wrote nothing to the runtime log
    assert thaw_env.state_entries() == []


@pytest.mark.root
@pytest.mark.runc
def test_sandbox_container_is_never_touched(thaw_env, tmp_path):
    bundle = make_bundle(str(tmp_path / "pause"), ["sh", "-c", "echo pause; sleep 1000"],
                         annotations={"thaw.dev/snapshot": "does-not-exist:1",
                                      "io.kubernetes.cri.container-type": "sandbox"})
    c = thaw_env.container(bundle)
    assert c.create() == 0
    assert c.log_text() == ""                          # not even a fallback warning
    c.start()
    c.wait_output(lambda t: "pause" in t)
    c.destroy()


def test_runtime_log_lines_are_runc_json():
    from thaw.oci import runc_log
    line = json.loads(runc_log.format_line("error", "boom"))
    assert set(line) == {"level", "msg", "time"} and line["level"] == "error"
    from datetime import datetime
    datetime.fromisoformat(line["time"].replace("Z", "+00:00"))
    assert runc_log.format_line("warning", "x y", "text").startswith('time="')
