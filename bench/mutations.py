"""A mutation check: deliberate small breaks of thaw, applied one at a time to the INSTALLED copy
that the tests run (thaw-runtime and thaw-hook run it too, not the checkout), each run against
the tests that should catch it. A break no test catches is a behaviour no test pins.

    sudo PATH=/opt/thaw/bin:$PATH /opt/thaw/venv/bin/python bench/mutations.py [--only NAME] [--list]

Not part of CI (a few minutes on 2 cores): run it after changing a module or its tests. Every file
is put back after each break, also on Ctrl-C. The result lands in bench/results/mutations-*.json;
the last one is summarised in docs/implementation-notes.md ("Mutation check").
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

FAULTS = "tests/test_faults.py"
PINS = "tests/test_pins.py"
REG = "tests/test_registry_pins.py"
DIST = "tests/test_distribution_pins.py"
BASETEMP = f"/tmp/thaw-mutations-{os.getpid()}"

# (name, module, exact text, its replacement, pytest arguments that must fail)
BREAKS: list[tuple[str, str, str, str, list[str]]] = [
    ("zombie owner counts as alive", "thaw.shim.drivers.procs",
     'return None if fields[0] in (b"Z", b"X") else int(fields[19])', "return int(fields[19])",
     [FAULTS, "-k", "unreaped"]),
    ("runc not started in the restore's cgroup", "thaw.shim.lifecycle.restore",
     "*faults.criu_options(work)), cgroup=scratch)", "*faults.criu_options(work)), cgroup=None)",
     [FAULTS, "-k", "stallrunc"]),
    ("recovery kills no process", "thaw.shim.lifecycle.recovery",
     "killed, alive = cgroups.kill_all(dirs)", "killed, alive = cgroups.kill_all([])",
     [FAULTS, "-k", "stallrunc"]),
    ("recovery unmounts nothing", "thaw.shim.lifecycle.recovery",
     "    for m in leaked:\n        _umount(m)\n", "    for m in leaked:\n        pass\n",
     [FAULTS, "-k", "post-restore and killgroup or unmounts_the_rootfs"]),
    ("v1 freezer/pids kill skipped (cgroup.kill only)", "thaw.shim.node.cgroups",
     "        for pid in procs(dirs) - {me}:\n", "        for pid in ():\n",
     ["tests/test_cgroups.py", "-k", "freezer or pids"]),
    ("dead create's runc leftovers kept", "thaw.shim.lifecycle.recovery",
     "return _runc_leftovers(record.id, record) if dead_create(record) else []", "return []",
     [FAULTS, "-k", "cold_create_killed"]),
    ("rootfs diff committed at create (not at start)", "thaw.shim.lifecycle.restore",
     "        applier.close()\n", "        applier.commit()\n",
     [FAULTS, "-k", "restored and not runc_restored and not post-restore"]),
    ("delete of an unstarted restore leaves it", "thaw.shim.lifecycle.recovery",
     'recover(cfg, container_id, record, "deleted before its start")', "pass",
     [FAULTS, "-k", "without_hooks"]),
    ("a delete that could not clean up exits 0", "thaw.shim.lifecycle.recovery",
     "        if left:\n            msg =", "        if False:\n            msg =",
     [FAULTS, "-k", "cannot_clean_up"]),
    ("restore failure path leaves runc's processes", "thaw.shim.lifecycle.restore",
     "            _done, left = recovery.take_down(cfg, cid, record)", "            _done, left = [], []",
     [FAULTS, "-k", "cold_starts_and_leaves"]),
    ("policy prefix matches a longer component", "thaw.shim.node.config",
     'name.startswith(prefix + "/")', "name.startswith(prefix)", [PINS, "-k", "prefixes"]),
    ("seccomp compared by defaultAction only", "thaw.shim.lifecycle.fingerprint",
     '"seccomp": sha256_hex(_canon(seccomp).encode()) if seccomp else None',
     '"seccomp": (seccomp or {}).get("defaultAction")', [PINS, "-k", "seccomp"]),
    ("ambient capabilities not compared", "thaw.shim.lifecycle.fingerprint",
     '("bounding", "effective", "inheritable", "permitted", "ambient")}',
     '("bounding", "effective", "inheritable", "permitted")}', [PINS, "-k", "ambient"]),
    ("inheritable capabilities not compared", "thaw.shim.lifecycle.fingerprint",
     '("bounding", "effective", "inheritable", "permitted", "ambient")}',
     '("bounding", "effective", "permitted", "ambient")}', [PINS, "-k", "inheritable"]),
    ("hugepages auto ignores the probe", "thaw.shim.drivers.criu",
     'hugepages == "auto" and bool(probe and probe.get("hugepages_faster"))', 'hugepages == "auto"',
     [PINS, "-k", "restore_options"]),
    ("prefetch floor a ninth", "thaw.shim.lifecycle.prefetch", "total // 10", "total // 9", [PINS, "-k", "prefetch"]),
    ("extra image file passes the seal", "thaw.shim.node.store.images",
     "if present != set(files):", "if not set(files) <= present:", [PINS, "-k", "extra_file"]),
    ("repaired seal without digests", "thaw.shim.node.store.images",
     "self.write_seal(snap, path, hashes)", "self.write_seal(snap, path)", [PINS, "-k", "seal_without"]),
    ("store_dir not 0700", "thaw.shim.node.store.store", "os.chmod(self.root, 0o700)", "os.chmod(self.root, 0o755)",
     [PINS, "-k", "root_only"]),
    ("credentials follow a redirect to another port", "thaw.shim.registry.transport",
     "same_host = _origin(url) == _origin(self.base)",
     "same_host = urllib.parse.urlsplit(url).hostname == urllib.parse.urlsplit(self.base).hostname",
     [REG, "-k", "redirect"]),
    ("token realm over plain http", "thaw.shim.registry.transport",
     "        self._check_url(realm, where)\n", "", [REG, "-k", "realm"]),
    ("a token for any scope", "thaw.shim.registry.transport",
     "tok = self._tokens.get(_scope_key(scopes))", "tok = next(iter(self._tokens.values()), None)",
     [REG, "-k", "scope"]),
    ("200 to a Range request appended", "thaw.shim.registry.download",
     "        if state.pos and resp.status == 200:\n            state.restart()\n",
     "        if False:\n            state.restart()\n", [REG, "-k", "range"]),
    ("resume prefix digest ignored", "thaw.shim.registry.download",
     "if pos < have or (have_digest and state.hash.digest != have_digest):",
     "if pos < have:", [REG, "-k", "already_on_disk"]),
    ("resume record used for another blob", "thaw.shim.registry.transfer",
     'return f"{blob.digest} {blob.path} {blob.offset}"', 'return f"{blob.path} {blob.offset}"',
     [DIST, "-k", "resume_record"]),
    ("resume record used for another file", "thaw.shim.registry.transfer",
     'return f"{blob.digest} {blob.path} {blob.offset}"', 'return f"{blob.digest} {blob.offset}"',
     [DIST, "-k", "resume_record"]),
    ("resume record used at another offset", "thaw.shim.registry.transfer",
     'return f"{blob.digest} {blob.path} {blob.offset}"', 'return f"{blob.digest} {blob.path}"',
     [DIST, "-k", "resume_record"]),
    ("a layer's size not checked before reading", "thaw.shim.registry.download",
     "if length and length.isdigit() and state.pos + int(length) != blob.size:", "if False:",
     [DIST, "-k", "by_its_size"]),
    ("a downloaded layer's digest not checked", "thaw.shim.registry.download",
     "        if got != blob.digest:\n", "        if False:\n",
     ["tests/test_distribution.py", "-k", "corrupted_blob"]),
    ("a part layer's file name not checked", "thaw.oci.snapshot.manifest",
     "if not IMAGE_NAME.match(name) or not offset.isdigit():", "if not offset.isdigit():",
     [DIST, "-k", "bad_file_name"]),
    ("credentials file read once per process", "thaw.shim.registry.auth",
     "def load_credentials(config_path: str | None, registry: str) -> Credentials | None:",
     '@__import__("functools").lru_cache(None)\n'
     "def load_credentials(config_path: str | None, registry: str) -> Credentials | None:",
     [DIST, "-k", "credentials_file"]),
    ("cross-registry mount attempted", "thaw.shim.lifecycle.distribution",
     "if ref.registry == target.registry and ref.repository != target.repository:",
     "if ref.repository != target.repository:", [DIST, "-k", "cross_registry"]),
    ("pushed mark set before the upload", "thaw.shim.lifecycle.distribution",
     "    manifest = store.layout.read_blob(snap.manifest, fmt.MAX_META)\n",
     "    store.mark_pushed(snap, str(target))\n    manifest = store.layout.read_blob(snap.manifest, fmt.MAX_META)\n",
     [DIST, "-k", "pushed_mark"]),
    ("a half-finished unpack kept", "thaw.shim.lifecycle.distribution",
     "                if name not in part_files:\n", "                if False:\n", [DIST, "-k", "half_finished"]),
    ("pull: wait bounded by pull_deadline, not pull_timeout", "thaw.shim.entry.runtime",
     "distribution.wait_present(c.cfg, ref, namespace, c.cfg.registry.pull_timeout)",
     "distribution.wait_present(c.cfg, ref, namespace, c.cfg.registry.pull_deadline)", [DIST, "-k", "pull_timeout"]),
    ("a pull takes an unsealed image dir for the snapshot", "thaw.shim.lifecycle.distribution",
     "        if not store.has_images(snap):\n", "        if not os.path.isdir(store.image_path(snap)):\n",
     [DIST, "-k", "sealing"]),
    ("publish keeps an unsealed image dir", "thaw.shim.node.store.store",
     "                self.images.remove(target)", "                pass", [DIST, "-k", "sealing"]),
    ("eviction removes an image dir another snapshot uses", "thaw.shim.node.store.limits",
     "if not any(s.manifest.digest == snap.manifest.digest for _d, s, _h in live):", "if True:",
     ["tests/test_store_cache.py", "-k", "another_snapshot"]),
    ("restored stdout and stderr swapped", "thaw.shim.drivers.runc",
     'lines = [f"inherit-fd fd[{fds[i]}]:{key}" for i, key in stdio.items()]',
     'lines = [f"inherit-fd fd[{fds[i ^ 3 if i else i]}]:{key}" for i, key in stdio.items()]',
     ["tests/test_restore_runc.py", "-k", "stdout_and_stderr"]),
    ("the guard of a frozen container does nothing", "thaw.shim.drivers.runc",
     '[sys.executable, "-I", "-S", "-c", _GUARD, json.dumps(argv)]',
     '[sys.executable, "-I", "-S", "-c", "pass", json.dumps(argv)]', [FAULTS, "-k", "frozen"]),
    ("warming copies what the page cache holds", "thaw.shim.drivers.pagecache",
     "        if pages is not None and b\"\\x00\" not in", "        if False and b\"\\x00\" not in",
     ["tests/test_weights.py", "tests/test_prefetch.py", "-k", "page_cache_lacks or volume_weights"]),
    ("the sandbox's prefetch skips known weights", "thaw.shim.lifecycle.weights",
     "                done += pagecache.fill(fd, 0, st.st_size, buf, keep_going)[0]\n", "",
     ["tests/test_prefetch.py", "-k", "volume_weights"]),
    ("a node without the decoder seals an image error", "thaw.shim.node.store.images",
     "        except criu_images.DecoderMissing:\n            return None\n", "",
     ["tests/test_confinement.py", "-k", "without_the_decoder"]),
    ("restore reads known weights beside CRIU", "thaw.shim.lifecycle.weights",
     "                self._unread.append(fd)\n", "                self._unread.append(fd)\n        self.start_reads()\n",
     ["tests/test_weights.py", "-k", "page_cache_lacks"]),
    ("System V objects go into a joined IPC namespace", "thaw.shim.lifecycle.confinement.namespaces",
     "        if any(size > _IMAGE_HEADER for size in images.ipc_objects.values()):", "        if False:",
     ["tests/test_confinement.py", "-k", "joined_by_path_is_not"]),
    ("facts of another version are believed", "thaw.shim.drivers.criu_images",
     '        if obj.get("version") != FACTS_VERSION:', "        if False:",
     ["tests/test_confinement.py", "-k", "another_version"]),
    ("restore never reads the known weights", "thaw.shim.lifecycle.restore",
     '            phases.run("weights_reads", plan.weights.start_reads)', "            pass",
     ["tests/test_weights.py", "-k", "leave_and_come_back"]),
    ("prepare skips the volume weights", "thaw.shim.lifecycle.prefetch",
     "            if snap.config.weights.outside:\n", "            if False:\n",
     ["tests/test_prefetch.py", "-k", "volume_weights"]),
]


def module_file(name: str) -> str:
    return importlib.import_module(name).__file__ or ""


def sweep(basetemp: str) -> None:
    """A break may leave behind what it breaks (a live CRIU, a stopped runc, a mount): kill every
    process of this run's own pytest directory, unmount what is mounted under it, remove it."""
    import shutil
    import signal
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                mine = basetemp.encode() in f.read()
            mine = mine or os.readlink(f"/proc/{pid}/cwd").startswith(basetemp)
        except OSError:
            continue
        if mine and int(pid) != os.getpid():
            os.kill(int(pid), signal.SIGKILL)
    time.sleep(0.5)
    with open("/proc/self/mountinfo") as f:
        mounts = [line.split()[4] for line in f if line.split()[4].startswith(basetemp + "/")]
    for m in sorted(mounts, key=len, reverse=True):
        subprocess.run(["umount", "-l", m], capture_output=True)
    shutil.rmtree(basetemp, ignore_errors=True)
    # A break of the cleanup leaves its restore's scratch cgroup: empty ones of dead thaw-runtimes go.
    from thaw.shim.node.cgroups import scratch_path
    parent = os.path.dirname(scratch_path("x"))
    for name in os.listdir(parent):
        if name.startswith("thaw-restore-") and not os.path.exists(f"/proc/{name.rsplit('-', 1)[1]}"):
            with contextlib.suppress(OSError):
                os.rmdir(os.path.join(parent, name))


def run_one(name: str, module: str, old: str, new: str, tests: list[str]) -> dict:
    path = module_file(module)
    with open(path) as f:
        original = f.read()
    if original.count(old) != 1:
        return {"name": name, "result": "stale", "why": f"text found {original.count(old)} times in {path}"}
    t = time.monotonic()
    try:
        with open(path, "w") as f:
            f.write(original.replace(old, new))
        cache = os.path.join(os.path.dirname(path), "__pycache__")
        for pyc in os.listdir(cache) if os.path.isdir(cache) else []:
            if pyc.startswith(os.path.basename(path)[:-3] + "."):
                os.unlink(os.path.join(cache, pyc))
        proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-x", "-q",
                               "--basetemp", BASETEMP, *tests], cwd=ROOT, capture_output=True, text=True, timeout=900)
    finally:
        with open(path, "w") as f:
            f.write(original)
        sweep(BASETEMP)
    tail = [line for line in proc.stdout.splitlines() if line.strip()][-1:]
    return {"name": name, "module": module, "tests": " ".join(tests),
            # pytest's 5: its -k selected no test (renamed): the break is stale, not caught
            "result": "stale" if proc.returncode == 5 else "caught" if proc.returncode != 0 else "NOT CAUGHT",
            "seconds": round(time.monotonic() - t, 1), "pytest": tail[0] if tail else ""}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", help="run the breaks whose name contains this")
    ap.add_argument("--list", action="store_true")
    args = ap.parse_args()
    chosen = [b for b in BREAKS if not args.only or args.only in b[0]]
    if args.list:
        for b in chosen:
            print(f"{b[0]:55} {b[1]:32} {' '.join(b[4])}")
        return
    results = []
    for b in chosen:
        r = run_one(*b)
        results.append(r)
        print(f"{r['result']:10} {r['name']}  ({r.get('seconds', '-')}s) {r.get('pytest', r.get('why', ''))}",
              flush=True)
    caught = sum(r["result"] == "caught" for r in results)
    summary = {"tried": len(results), "caught": caught,
               "not_caught": [r["name"] for r in results if r["result"] != "caught"], "results": results}
    print(f"tried {len(results)}, caught {caught}, not caught {len(results) - caught}")
    out = os.path.join(HERE, "results", f"mutations-{time.strftime('%Y%m%d-%H%M%S')}.json")
    with open(out, "w") as f:
        json.dump(summary, f, indent=1)
    print(out)


if __name__ == "__main__":
    main()
