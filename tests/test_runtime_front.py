"""thaw-runtime's C front (install/runtime-front.c): a call that is certainly passthrough goes
straight to the next runtime; everything else -- a config.json that may ask for thaw, one it
cannot read safely, a container thaw has a record of, a config Python has not yet derived the
front's settings from -- goes to the Python runtime, argv unchanged.

The front under test is built here from the repository's source (install/runtime-front.sh, as
install/node.sh builds the installed one) with a Python entry that records each call before it
runs the real Python runtime, and a next runtime that records and exits: so each test sees which
way every call went. The installed front is what test_passthrough.py and the restore tests run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from helpers import make_bundle, unique

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE_DIR = "/run/thaw/config-cache"

pytestmark = [pytest.mark.root, pytest.mark.runc]


def _build(out: str, entry: str, extra_path: str = "") -> None:
    subprocess.run(["bash", os.path.join(ROOT, "install", "runtime-front.sh"), out, entry,
                    *([extra_path] if extra_path else [])], check=True)


@pytest.fixture(scope="module")
def fronts(tmp_path_factory):
    if os.geteuid() != 0 or not shutil.which("gcc"):
        pytest.skip("needs root and gcc (install/node.sh installs build-essential)")
    d = tmp_path_factory.mktemp("front")
    log = d / "route.log"
    entry = d / "python-entry"
    # The real Python runtime, after one line saying it was asked.
    entry.write_text(f"#!/bin/sh\necho \"python $*\" >> {log}\n"
                     f"exec {sys.executable} -I -c 'from thaw.shim.entry.runtime import main; main()' \"$@\"\n")
    entry.chmod(0o755)
    _build(str(d / "thaw-runtime"), str(entry))
    _build(str(d / "thaw-runtime-nopython"), str(d / "missing-entry"))
    _build(str(d / "thaw-runtime-extra"), str(entry), "/opt/thaw-test-extra/sbin")
    return {"dir": d, "log": log, "front": str(d / "thaw-runtime"),
            "nopython": str(d / "thaw-runtime-nopython"), "extra": str(d / "thaw-runtime-extra")}


@pytest.fixture
def front(fronts, thaw_env, tmp_path):
    """A config whose next runtime records `runc ARGS` (and its PATH), then runs runc."""
    fronts["log"].write_text("")
    runtime = tmp_path / "next-runtime"
    runtime.write_text(f"#!/bin/sh\necho \"runc $*\" >> {fronts['log']}\necho \"$PATH\" > {tmp_path}/path\n"
                       f"exec {shutil.which('runc')} \"$@\"\n")
    runtime.chmod(0o755)
    thaw_env.write_config(next_runtime=str(runtime))
    return fronts


def run(front, *argv, exe=None, env=None):
    """Run the front; return the routes it took (python, runc) and its exit status. Output goes
    to a file: a created container holds the stdio it was given."""
    with open(front["dir"] / "out", "w+") as out:
        proc = subprocess.run([exe or front["front"], *argv], stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                              timeout=60, env=env)
    routes = front["log"].read_text().splitlines()
    front["log"].write_text("")
    return [r.split(" ", 1)[0] for r in routes], proc.returncode


def prime(front):
    """The first call on a new config goes to Python, which derives the front's settings."""
    assert run(front, "--version")[0] == ["python", "runc"]
    assert run(front, "--version")[0] == ["runc"]


def plain_bundle(tmp_path, name="b", **annotations):
    return make_bundle(str(tmp_path / name), ["true"],
                       annotations={"io.kubernetes.cri.container-name": "x", **annotations})


def test_plain_calls_pass_through_without_python(front, thaw_env, tmp_path):
    prime(front)
    bundle = plain_bundle(tmp_path)
    cid, cid2, cid3 = unique("f"), unique("f"), unique("f")
    r = ["--root", thaw_env.root]
    for argv in ([*r, "--log", str(tmp_path / "log.json"), "--log-format", "json", "create", "--bundle", bundle,
                  "--pid-file", str(tmp_path / "pid"), cid],
                 [*r, "create", "-b=" + bundle, cid2],
                 [*r, "start", cid], [*r, "state", cid], [*r, "kill", cid2, "9"],
                 [*r, "delete", "--force", cid], [*r, "delete", "-f", cid2], ["features"], ["--version"], []):
        routes, _ = run(front, *argv)
        assert routes == ["runc"], argv
    # cwd is the bundle when --bundle is absent
    subprocess.run([front["front"], *r, "create", cid3], cwd=bundle, check=True, timeout=60,
                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert front["log"].read_text() == f"runc --root {thaw_env.root} create {cid3}\n"
    front["log"].write_text("")
    # the next runtime gets argv unchanged (its own path as argv[0], as runtime.passthrough does)
    subprocess.run([front["front"], *r, "delete", "--force", cid3], check=True)
    assert front["log"].read_text() == f"runc --root {thaw_env.root} delete --force {cid3}\n"
    assert thaw_env.runc_ids() == []


def test_annotated_create_goes_to_python(front, thaw_env, tmp_path):
    prime(front)
    sandbox = plain_bundle(tmp_path, "s", **{"thaw.dev/snapshot": "nope:1", "io.kubernetes.cri.container-type": "sandbox"})
    wants = plain_bundle(tmp_path, "w", **{"thaw.dev/snapshot": "nope:1"})
    capture = plain_bundle(tmp_path, "c", **{"thaw.dev/snapshot": "demo:1", "thaw.dev/capture": "on-ready"})
    for bundle in (sandbox, wants, capture):
        routes, _ = run(front, "--root", thaw_env.root, "--log", str(tmp_path / "log.json"), "create", "--bundle",
                        bundle, unique("f"))
        assert routes[0] == "python", bundle
    # the same without the annotation: straight through
    assert run(front, "--root", thaw_env.root, "create", "--bundle", plain_bundle(tmp_path, "p"),
               unique("f"))[0] == ["runc"]


def test_config_json_it_cannot_read_safely_goes_to_python(front, thaw_env, tmp_path):
    prime(front)
    cases = {}
    link = tmp_path / "link"
    os.makedirs(link)
    os.symlink(os.path.join(plain_bundle(tmp_path), "config.json"), link / "config.json")
    cases["symlink"] = link
    big = tmp_path / "big"
    os.makedirs(big)
    (big / "config.json").write_text(json.dumps({"ociVersion": "1.0.2", "pad": "x" * (4 << 20)}))
    cases["oversized"] = big
    isdir = tmp_path / "dir"
    os.makedirs(isdir / "config.json")
    cases["directory"] = isdir
    cases["missing"] = tmp_path / "nothing-here"
    for what, bundle in cases.items():
        routes, _ = run(front, "--root", thaw_env.root, "create", "--bundle", str(bundle), unique("f"))
        assert routes[0] == "python", what
    routes, _ = run(front, "--root", thaw_env.root, "create", "--bundle=", unique("f"))
    assert routes[0] == "python"
    # A FIFO: reading it would block (runc itself would); the front must not. The build whose
    # Python entry is missing shows the route without going on to runc.
    fifo = tmp_path / "fifo"
    os.makedirs(fifo)
    os.mkfifo(fifo / "config.json")
    assert run(front, "create", "--bundle", str(fifo), "id", exe=front["nopython"]) == ([], 127)
    assert run(front, "--root", thaw_env.root, "create", "--bundle", plain_bundle(tmp_path, "q"), unique("f"),
               exe=front["nopython"]) == (["runc"], 0)


def test_recorded_containers_go_to_python(front, thaw_env, tmp_path):
    prime(front)
    cid, r = unique("f"), ["--root", thaw_env.root]
    for sub in ("containers", "prepare"):
        os.makedirs(os.path.join(thaw_env.state, sub), exist_ok=True)
    assert run(front, *r, "start", cid)[0] == ["runc"]
    record = os.path.join(thaw_env.state, "containers", cid + ".json")
    with open(record, "w") as f:
        f.write("{}")
    assert run(front, *r, "start", cid)[0][0] == "python"
    assert run(front, *r, "kill", cid, "9")[0] == ["runc"]      # runtime.py passes these through as well
    assert run(front, *r, "state", cid)[0] == ["runc"]
    assert run(front, *r, "delete", cid)[0][0] == "python"     # which clears the record
    assert not os.path.exists(record)
    prepare = os.path.join(thaw_env.state, "prepare", cid + ".json")
    with open(prepare, "w") as f:
        f.write("{}")
    assert run(front, *r, "start", cid)[0] == ["runc"]           # only a delete cancels a prepare
    assert run(front, *r, "delete", cid)[0][0] == "python"
    for odd in (".hidden", "a b", "x" * 1025):
        assert run(front, *r, "delete", odd)[0][0] == "python", odd


def test_argv_it_does_not_understand_goes_to_python(front, tmp_path):
    prime(front)
    bundle = plain_bundle(tmp_path)
    for argv in (["create", "--bogus", "--bundle", bundle, "id"], ["--log"], ["---x", "state", "id"],
                 ["--debug=maybe", "state", "id"], ["delete", "-f=2", "id"]):
        routes, _ = run(front, *argv)
        assert routes[0] == "python", argv
        assert routes[1:] == ["runc"], argv           # ... which passes it through, as before


def test_config_changes_and_front_file_doubts_go_to_python(front, thaw_env):
    prime(front)
    name = "front." + os.path.abspath(thaw_env.config).replace("%", "%25").replace("/", "%2F")
    front_file = os.path.join(CACHE_DIR, name)
    # an edited config: Python until it has derived the settings again
    with open(thaw_env.config, "a") as f:
        f.write("log_level: debug\n")
    assert run(front, "--version")[0] == ["python", "runc"]
    assert run(front, "--version")[0] == ["runc"]
    # a front file others may write is not trusted
    os.chmod(front_file, 0o620)
    assert run(front, "--version")[0] == ["python", "runc"]
    os.chmod(front_file, 0o600)
    assert run(front, "--version")[0] == ["runc"]
    # nor one for another state of the config (the key), nor one that is a symlink
    text = open(front_file).read()
    with open(front_file, "w") as f:
        f.write(text.replace("key=", "key=1"))
    assert run(front, "--version")[0] == ["python", "runc"]
    assert run(front, "--version")[0] == ["runc"]
    os.rename(front_file, front_file + ".real")
    os.symlink(front_file + ".real", front_file)
    try:
        assert run(front, "--version")[0] == ["python", "runc"]
    finally:
        if os.path.islink(front_file):
            os.unlink(front_file)
        if os.path.exists(front_file + ".real"):
            os.unlink(front_file + ".real")


def test_no_config_file_goes_to_python(front, thaw_env, monkeypatch):
    monkeypatch.setenv("THAW_CONFIG", os.path.join(thaw_env.dir, "absent.yaml"))
    assert run(front, "--version")[0] == ["python"]   # which runs with defaults
    monkeypatch.setenv("THAW_CONFIG", "relative.yaml")
    assert run(front, "--version")[0][0] == "python"


def test_next_runtime_from_path_and_bundle_path(front, thaw_env, tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    shutil.copy(tmp_path / "next-runtime", bindir / "my-runc")
    thaw_env.write_config(next_runtime="my-runc")
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}"}
    assert run(front, "--version", env=env)[0] == ["python", "runc"]
    assert run(front, "--version", env=env)[0] == ["runc"]
    assert open(tmp_path / "path").read().strip() == env["PATH"]
    # the bundle's build appends its sbin, as the bundle's Python launcher does
    assert run(front, "--version", exe=front["extra"], env=env)[0] == ["runc"]
    assert open(tmp_path / "path").read().strip() == env["PATH"] + ":/opt/thaw-test-extra/sbin"
    routes, status = run(front, "--version", env={**os.environ, "PATH": "/nonexistent"})
    assert routes == ["python"] and status == 127            # not found: Python reports it


def test_python_entry_missing_is_reported_in_runtime_log(front, tmp_path):
    log = tmp_path / "runc-log.json"
    proc = subprocess.run([front["nopython"], "--log", str(log), "--log-format", "json", "create",
                           "--bundle", plain_bundle(tmp_path, **{"thaw.dev/snapshot": "x:1"}), "id"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 127 and "cannot run" in proc.stderr
    line = json.loads(log.read_text())
    assert line["level"] == "error" and "missing-entry" in line["msg"] and line["time"].endswith("Z")
