"""Weights outside the snapshot: engine steps (presets, custom, one-step URLs) against a real HTTP
server, the weights manifest (resolution through volumes and image layers, changed / missing /
symlinked files), and the CPU end to end: the example worker's weights leave before the capture and
come back on resume with identical outputs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest

from helpers import make_bundle, overlay_bundle, umount_overlay, unique, wait_for, wait_http_ready
from thaw.oci import annotations as ann
from thaw.oci import snapshot as fmt
from thaw.oci.spec import Bundle

VLLM = {ann.SNAPSHOT: "w:1", ann.ENGINE: "vllm"}


# --- parsing (formats only) ---------------------------------------------------------------------

def test_vllm_preset_and_model_path():
    steps = ann.parse_engine_steps(VLLM, ["vllm", "serve", "/models/qwen", "--enable-sleep-mode"])
    assert [repr(s) for s in steps.quiesce] == [
        "POST http://127.0.0.1:8000/sleep?level=2",
        "GET http://127.0.0.1:8000/is_sleeping until {'json': {'is_sleeping': True}}"]
    assert [s.url.rsplit(":8000", 1)[1] for s in steps.resume] == [
        "/wake_up?tags=weights", "/collective_rpc", "/wake_up?tags=kv_cache", "/is_sleeping"]
    assert steps.resume[1].body == {"method": "reload_weights"} and steps.model == "/models/qwen"
    assert ann.weight_paths(VLLM, steps) == ("/models/qwen",)
    assert ann.model_path("vllm", ["python", "-m", "vllm.entrypoints.openai.api_server", "--model=/m"]) == "/m"
    assert ann.model_path("vllm", ["vllm", "serve", "Qwen/Qwen3-4B"]) is None        # a hub id names no files
    # thaw.dev/weights wins over the model path; the engine URL moves every step.
    a = {**VLLM, ann.WEIGHTS: "/w/a.safetensors, /w/dir", ann.ENGINE_URL: "http://127.0.0.1:9000"}
    steps = ann.parse_engine_steps(a, ["vllm", "serve", "/models/qwen"])
    assert ann.weight_paths(a, steps) == ("/w/a.safetensors", "/w/dir")
    assert all(s.url.startswith("http://127.0.0.1:9000/") for s in steps.quiesce + steps.resume)


def test_sglang_preset_sends_the_model_path():
    a = {ann.SNAPSHOT: "w:1", ann.ENGINE: "sglang"}
    steps = ann.parse_engine_steps(a, ["python", "-m", "sglang.launch_server", "--model-path", "/models/m"])
    assert steps.quiesce[0].url == "http://127.0.0.1:30000/release_memory_occupation"
    assert steps.resume[1].body == {"model_path": "/models/m"}
    with pytest.raises(ann.AnnotationError, match="no absolute model path"):
        ann.parse_engine_steps(a, ["python", "-m", "sglang.launch_server", "--model-path", "org/name"])


def test_custom_steps_and_one_step_form():
    custom = {"url": "http://127.0.0.1:7000", "quiesce": [{"method": "POST", "path": "/a", "timeout": 5}],
              "resume": [{"path": "/b", "body": {"x": 1}},
                         {"method": "GET", "path": "/c", "until": {"status": 200, "json": {"ok": True}},
                          "timeout": 3, "interval": 0.1}]}
    steps = ann.parse_engine_steps({ann.ENGINE_STEPS: json.dumps(custom)})
    assert [repr(s) for s in steps.quiesce] == ["POST http://127.0.0.1:7000/a"] and steps.quiesce[0].timeout == 5
    assert steps.resume[0].body == {"x": 1} and steps.resume[1].until == {"status": 200, "json": {"ok": True}}
    one = ann.parse_engine_steps({ann.QUIESCE: "http://127.0.0.1:1/q", ann.RESUME: "http://127.0.0.1:1/r"})
    assert [s.url for s in one.quiesce + one.resume] == ["http://127.0.0.1:1/q", "http://127.0.0.1:1/r"]
    req = ann.parse_request({**VLLM}, ["vllm", "serve", "/m"])
    assert len(req.steps.resume) == 4 and req.resume is None


@pytest.mark.parametrize("annotations, error", [
    ({ann.ENGINE: "tgi"}, "not a known engine"),
    ({ann.ENGINE: "vllm", ann.QUIESCE: "http://127.0.0.1/q"}, "one-step form"),
    ({ann.ENGINE: "vllm", ann.ENGINE_STEPS: "{}"}, "not both"),
    ({ann.ENGINE: "vllm", ann.ENGINE_URL: "http://127.0.0.1:1/path"}, "without a path"),
    ({ann.ENGINE_STEPS: "[1"}, "not JSON"),
    ({ann.ENGINE_STEPS: json.dumps({"quiesce": [{"path": "/a"}]})}, "needs \"url\""),
    ({ann.ENGINE_STEPS: json.dumps({"url": "http://h", "quiesce": [{"path": "a"}]})}, "absolute URL path"),
    ({ann.ENGINE_STEPS: json.dumps({"url": "http://h", "quiesce": [{"path": "/a", "method": "DELETE"}]})}, "method"),
    ({ann.ENGINE_STEPS: json.dumps({"url": "http://h", "quiesce": [{"path": "/a", "timeout": 0}]})}, "timeout"),
    ({ann.ENGINE_STEPS: json.dumps({"url": "http://h", "quiesce": [{"path": "/a", "timeout": 9999}]})}, "timeout"),
    ({ann.ENGINE_STEPS: json.dumps({"url": "http://h", "quiesce": [{"path": "/a", "until": []}]})}, "until"),
    ({ann.ENGINE_STEPS: json.dumps({"url": "http://h", "quiesce": [{"path": "/a", "x": 1}]})}, "unknown keys"),
    ({ann.ENGINE_STEPS: json.dumps({"url": "ftp://h", "quiesce": []})}, "must start with"),
    ({ann.WEIGHTS: "relative/path"}, "absolute path"),
])
def test_bad_engine_annotations(annotations, error):
    with pytest.raises(ann.AnnotationError, match=error):
        steps = ann.parse_engine_steps(annotations)
        ann.weight_paths(annotations, steps)


def test_weights_manifest_format_round_trip():
    files = (fmt.WeightFile("/work/w.safetensors", 10, "sha256:" + "a" * 64, "volume", mount="/work", source="/srv/w"),
             fmt.WeightFile("/models/x.bin", 5, "sha256:" + "b" * 64, "image", layer="sha256:" + "c" * 64))
    w = fmt.Weights(files, True, 100, 80, "rss")
    cfg = fmt.SnapshotConfig(ref="w:1", fingerprint=fmt.Fingerprint(), weights=w)
    back = fmt.SnapshotConfig.from_json(json.loads(cfg.blob()))
    assert back.weights == w and back.weights.bytes == 15 and back.weights.released == 20
    assert "weights" not in fmt.SnapshotConfig(ref="w:1", fingerprint=fmt.Fingerprint()).to_json()
    bad = json.loads(cfg.blob())
    bad["weights"]["files"][0]["digest"] = "md5:x"
    with pytest.raises(fmt.SnapshotFormatError, match="malformed"):
        fmt.SnapshotConfig.from_json(bad)


# --- steps against a real HTTP server, from inside a network namespace ----------------------------

class Recorder(BaseHTTPRequestHandler):
    calls: ClassVar[list[tuple]] = []
    script: ClassVar[dict[str, list]] = {}          # path -> list of (status, body, delay) answers, the last one repeats

    def log_message(self, *a):
        pass

    def _answer(self):
        n = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(n) if n else b""
        self.calls.append((self.command, self.path, json.loads(body) if body else None))
        answers = self.script.get(self.path, [(200, {}, 0)])
        status, out, delay = answers.pop(0) if len(answers) > 1 else answers[0]
        time.sleep(delay)
        data = json.dumps(out).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except BrokenPipeError:        # the step gave up on this answer (its timeout)
            pass

    do_GET = do_POST = _answer


@pytest.fixture
def recorder():
    from helpers import netns, netns_delete
    name = unique("wns")
    path = netns(name)
    fd = os.open(path, os.O_RDONLY)
    ready = threading.Event()
    box: dict = {}

    def serve():          # a server inside the namespace: the steps must reach it through loopback there
        import ctypes
        if ctypes.CDLL(None, use_errno=True).setns(fd, 0x40000000) != 0:      # this thread only
            raise OSError(ctypes.get_errno(), "setns")
        box["srv"] = ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
        ready.set()
        box["srv"].serve_forever(poll_interval=0.05)
    Recorder.calls, Recorder.script = [], {}
    t = threading.Thread(target=serve, daemon=True)
    t.start()
    ready.wait(10)
    holder = subprocess.Popen(["nsenter", f"--net={path}", "sleep", "600"])   # a pid whose netns it is
    wait_for(lambda: os.stat(f"/proc/{holder.pid}/ns/net").st_ino == os.fstat(fd).st_ino, 10,
             "a process in the namespace")
    yield box["srv"].server_address[1], holder.pid
    holder.kill()
    holder.wait()
    box["srv"].shutdown()
    os.close(fd)
    netns_delete(name)


def _steps(port: int, quiesce: list, resume: list | None = None) -> ann.EngineSteps:
    return ann.parse_engine_steps({ann.ENGINE_STEPS: json.dumps(
        {"url": f"http://127.0.0.1:{port}", "quiesce": quiesce, "resume": resume or []})})


@pytest.mark.root
def test_steps_run_in_order_inside_the_namespace(recorder):
    from thaw.shim.drivers import engine
    port, pid = recorder
    Recorder.script["/is_sleeping"] = [(200, {"is_sleeping": False}, 0)] * 3 + [(200, {"is_sleeping": True}, 0)]
    steps = ann.parse_engine_steps({**VLLM, ann.ENGINE_URL: f"http://127.0.0.1:{port}"}, ["vllm", "serve", "/m"])
    done = engine.steps(steps.quiesce, pid, "quiesce")
    engine.steps(steps.resume[:3], pid, "resume")
    assert [(m, p) for m, p, _ in Recorder.calls] == [
        ("POST", "/sleep?level=2"), ("GET", "/is_sleeping"), ("GET", "/is_sleeping"), ("GET", "/is_sleeping"),
        ("GET", "/is_sleeping"), ("POST", "/wake_up?tags=weights"), ("POST", "/collective_rpc"),
        ("POST", "/wake_up?tags=kv_cache")]
    assert Recorder.calls[6][2] == {"method": "reload_weights"} and done[1]["tries"] == 4
    # Not reachable from the host's network: the server lives in the namespace only.
    with pytest.raises(OSError):
        import socket
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


@pytest.mark.root
def test_a_failing_or_slow_step_stops_the_rest(recorder):
    from thaw.shim.drivers import engine
    port, pid = recorder
    Recorder.script["/bad"] = [(500, {"error": "no"}, 0)]
    Recorder.script["/slow"] = [(200, {}, 3)]
    Recorder.script["/never"] = [(200, {"ok": False}, 0)]
    with pytest.raises(engine.EngineError, match=r"quiesce step 2 \(POST .*/bad\) answered 500"):
        engine.steps(_steps(port, [{"path": "/a"}, {"path": "/bad"}, {"path": "/c"}]).quiesce, pid, "quiesce")
    assert [p for _, p, _ in Recorder.calls] == ["/a", "/bad"]
    t = time.monotonic()
    with pytest.raises(engine.EngineError, match="step 1"):
        engine.steps(_steps(port, [{"path": "/slow", "timeout": 0.5}]).quiesce, pid, "quiesce")
    assert time.monotonic() - t < 2.5
    with pytest.raises(engine.EngineError, match="did not match within"):
        engine.steps(_steps(port, [{"method": "GET", "path": "/never", "timeout": 0.6, "interval": 0.1,
                                    "until": {"json": {"ok": True}}}]).quiesce, pid, "quiesce")
    # All steps together within a budget: the second gets what is left of it, the third never starts.
    Recorder.calls.clear()
    with pytest.raises(engine.EngineError, match=r"resume step 2 .* timed out"):
        engine.steps(_steps(port, [{"path": "/slow"}, {"path": "/slow"}, {"path": "/a"}]).quiesce, pid,
                     "resume", budget=4.0)
    assert [p for _, p, _ in Recorder.calls] == ["/slow", "/slow"]


# --- the manifest: resolution, verification, attacks ------------------------------------------------

def _weights_file(path: str, size: int = 3 << 20, seed: int = 7) -> bytes:
    import random
    data = random.Random(seed).randbytes(size)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return data


def _bundle_with_volume(tmp, vol: str) -> Bundle:
    b = make_bundle(str(tmp / unique("b")), ["true"], binds={"/work": vol})
    return Bundle.load(b)


@pytest.mark.root
def test_volume_resolution_changed_missing_and_symlinked(tmp_path):
    from thaw.shim.lifecycle import weights
    vol = tmp_path / "vol"
    _weights_file(str(vol / "m" / "w.safetensors"))
    bundle = _bundle_with_volume(tmp_path, str(vol))
    cache = weights.DigestCache(str(tmp_path / "state"))
    # The manifest as a capture records it: here the "container root" holds the volume's files
    # at its mount destination (a running container's /proc/PID/root does the same).
    croot = tmp_path / "croot"
    shutil.copytree(vol, croot / "work")
    os.symlink("/work/m/w.safetensors", croot / "work" / "m" / "link.safetensors")   # the same file, twice
    rfd = os.open(croot, os.O_PATH | os.O_DIRECTORY)
    try:
        files = weights.manifest(rfd, bundle, ("/work/m/w.safetensors", "/work/m"), cache)
    finally:
        os.close(rfd)
    assert len(files) == 1
    wf = files[0]
    assert (wf.path, wf.origin, wf.mount, wf.source, wf.size) == (
        "/work/m/w.safetensors", "volume", "/work", str(vol), 3 << 20)
    w = fmt.Weights(files, True)
    # Restore: found under the new spec's mount source, verified (hashed once, then from the cache).
    p = weights.Prefetch(bundle, w, cache)
    assert p.wait()["hashed"] == 3 << 20
    p = weights.Prefetch(bundle, w, weights.DigestCache(str(tmp_path / "state")))
    assert p.wait()["hashed"] == 0
    # Changed content, same size: a new identity (ctime), hashed, refused.
    target = vol / "m" / "w.safetensors"
    with open(target, "r+b") as f:
        f.seek(1 << 20)
        f.write(b"\xff" * 16)
    with pytest.raises(weights.WeightsError, match="changed: digest"):
        weights.Prefetch(bundle, w, cache).wait()
    _weights_file(str(target), (3 << 20) - 1)
    with pytest.raises(weights.WeightsError, match=r"changed: .* bytes"):
        weights.Prefetch(bundle, w, cache)
    os.unlink(target)
    with pytest.raises(weights.WeightsError, match="No such file"):
        weights.Prefetch(bundle, w, cache)
    # Replaced by a symlink into the host: resolved inside the volume, never reaching the host's file.
    host_file = tmp_path / "host-secret"
    _weights_file(str(host_file))                 # the very bytes the snapshot recorded
    for link in (str(host_file), "../../../../../../../../" + str(host_file).lstrip("/")):
        if os.path.lexists(target):
            os.unlink(target)
        os.symlink(link, target)
        with pytest.raises(weights.WeightsError, match="No such file"):
            weights.Prefetch(bundle, w, cache)
    # And the sandbox-time warm-up reads no symlink either.
    assert weights.warm_sources(w, weights.DigestCache(str(tmp_path / "s2")), lambda: True) == 0
    os.unlink(target)
    _weights_file(str(target))
    assert weights.warm_sources(w, weights.DigestCache(str(tmp_path / "s3")), lambda: True) == 3 << 20
    assert weights.Prefetch(bundle, w, weights.DigestCache(str(tmp_path / "s3"))).wait()["hashed"] == 0


@pytest.mark.root
def test_prefetch_reads_only_what_the_page_cache_lacks(tmp_path):
    """A warm node's restore copies none of the weights (the copies would run beside CRIU's fill
    and the CUDA restore); pages the kernel dropped are read again, from start_reads() on."""
    import hashlib

    from thaw.shim.lifecycle import weights
    vol = tmp_path / "vol"
    path = str(vol / "w.safetensors")
    data = _weights_file(path, 24 << 20)
    bundle = _bundle_with_volume(tmp_path, str(vol))
    cache = weights.DigestCache(str(tmp_path / "state"))
    wf = fmt.WeightFile("/work/w.safetensors", len(data), "sha256:" + hashlib.sha256(data).hexdigest(),
                        "volume", mount="/work", source=str(vol))
    w = fmt.Weights((wf,), True)
    assert weights.Prefetch(bundle, w, cache).wait()["hashed"] == 24 << 20   # a first restore hashes
    got = weights.Prefetch(bundle, w, cache).wait()
    assert (got["hashed"], got["read"]) == (0, 0)                            # cached: nothing copied
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)                    # the kernel drops the pages
    finally:
        os.close(fd)
    # Nothing is read before start_reads() (the restore calls it once CRIU is done, so that on a
    # cold node the snapshot's pages have the disk first); verified() needs no read of a known file.
    readers = {t for t in threading.enumerate() if t.name.startswith("weights")}
    p = weights.Prefetch(bundle, w, cache)
    p.verified()
    assert {t for t in threading.enumerate() if t.name.startswith("weights")} == readers
    p.start_reads()
    got = p.wait()
    assert (got["hashed"], got["read"]) == (0, 24 << 20)


@pytest.mark.root
def test_image_layer_resolution(tmp_path):
    from thaw.shim.lifecycle import weights
    lower = tmp_path / "layer"
    _weights_file(str(lower / "models" / "a.safetensors"), 1 << 20, 1)
    _weights_file(str(lower / "models" / "b.safetensors"), 1 << 20, 2)
    (lower / "models" / "README").write_text("not weights")
    b = overlay_bundle(str(tmp_path / "b"), str(lower), ["true"])
    try:
        bundle = Bundle.load(b)
        _weights_file(os.path.join(bundle.rootfs, "models", "c.bin"), 1 << 16, 3)   # the container's own
        rfd = os.open(bundle.rootfs, os.O_PATH | os.O_DIRECTORY)
        try:
            files = weights.manifest(rfd, bundle, ("/models",), weights.DigestCache(str(tmp_path / "st")))
        finally:
            os.close(rfd)
        from thaw.shim.lifecycle.fingerprint import layer_digest
        by = {f.path: f for f in files}
        assert sorted(by) == ["/models/a.safetensors", "/models/b.safetensors", "/models/c.bin"]
        assert by["/models/a.safetensors"].origin == "image"
        assert by["/models/a.safetensors"].layer == layer_digest(str(lower))
        assert by["/models/c.bin"].origin == "rootfs" and by["/models/c.bin"].layer is None
        assert weights.Prefetch(bundle, fmt.Weights(files, True), weights.DigestCache(str(tmp_path / "st"))).wait()[
            "bytes"] == (2 << 20) + (1 << 16)
    finally:
        umount_overlay(b)


# --- end to end on the CPU: the example worker in a runc container ------------------------------------

SERVER = os.path.join(os.path.dirname(__file__), "..", "examples", "inference-server", "server.py")
PROMPT = {"prompt": [5, 9, 100, 3, 77, 42, 1], "max_tokens": 12}
URL = "http://127.0.0.1:8000"


def _worker_bundle(tmp, work: str, ns: str, annotations: dict) -> str:
    py = os.path.join(sys.prefix, "bin", "python3")      # thaw's venv: it has torch (a test dependency)
    return make_bundle(str(tmp / unique("wb")), [
        py, "/app/server.py", "--config", "small", "--device", "cpu", "--host", "127.0.0.1", "--port", "8000",
        "--model", "/work/w.safetensors", "--enable-sleep-mode", "--load-streams", "2"],
        python=True, netns=ns, annotations=annotations,
        binds={"/work": work, "/app": os.path.dirname(os.path.abspath(SERVER)), sys.prefix: sys.prefix})


def _generate(pid: int) -> list[int]:
    from thaw.shim.drivers import engine
    with engine.ContainerView(pid) as view:
        status, body = view.request(f"{URL}/generate", "POST", 60, json_body=PROMPT)
    assert status == 200, body
    return json.loads(body)["tokens"]


def _samples(path: str, n: int = 16, size: int = 32) -> list[bytes]:
    """Slices of the weights file's data section (random floats: found nowhere else)."""
    data = open(path, "rb").read()
    start = 8 + int.from_bytes(data[:8], "little")
    step = (len(data) - start) // n
    return [data[start + i * step + 1000: start + i * step + 1000 + size] for i in range(n)]


def _found_in_pages(image_dir: str, samples: list[bytes]) -> int:
    pages = b"".join(open(os.path.join(image_dir, f), "rb").read() for f in os.listdir(image_dir)
                     if f.startswith("pages-"))
    return sum(s in pages for s in samples)


@pytest.mark.root
@pytest.mark.runc
@pytest.mark.criu
def test_cpu_end_to_end_weights_leave_and_come_back(thaw_env, netns_pair, tmp_path):
    from thaw.oci.annotations import SnapshotRef
    from thaw.shim.node.config import load
    from thaw.shim.node.store import Store
    work = tmp_path / "work"
    work.mkdir()
    weights_path = str(work / "w.safetensors")
    subprocess.run([sys.executable, SERVER, "--init-weights-only", "--config", "small", "--weights", weights_path],
                   check=True, capture_output=True)
    os.chmod(work, 0o755)
    src = thaw_env.container(_worker_bundle(tmp_path, str(work), netns_pair[0], {ann.ENGINE: "vllm"}))
    assert src.create() == 0, src.log_text()
    src.start()
    wait_http_ready(src.pid(), f"{URL}/health", 120)
    expected = _generate(src.pid())
    store = Store.for_config(load(thaw_env.config))
    samples = _samples(weights_path)

    # Today's quiesce (the KV cache only): the engine keeps its weights, the snapshot says so and
    # carries them.
    thaw_env.thaw("capture", src.id, "--name", "kept:1", "--root", thaw_env.root,
                  "--quiesce", f"{URL}/quiesce", "--resume", f"{URL}/resume")
    kept = store.resolve(SnapshotRef.parse("kept:1"), "_local")
    assert kept.config.weights.files and not kept.config.weights.outside
    assert _found_in_pages(store.image_path(kept), samples) >= len(samples) // 2
    # The vLLM preset (sleep level 2 ... wake, reload, KV): the weights leave.
    thaw_env.thaw("capture", src.id, "--name", "out:1", "--root", thaw_env.root)
    snap = store.resolve(SnapshotRef.parse("out:1"), "_local")
    w = snap.config.weights
    assert w.outside and w.measure == "rss" and w.released >= 0.9 * w.bytes, w
    assert [(f.path, f.origin, f.mount, f.source) for f in w.files] == [
        ("/work/w.safetensors", "volume", "/work", str(work))]
    assert _found_in_pages(store.image_path(snap), samples) == 0
    # The capture's digest is kept per file identity: no restore on this node hashes the file again.
    st = os.stat(weights_path)
    digests = json.load(open(os.path.join(thaw_env.state, "weights", "digests.json")))
    assert digests[f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"] == w.files[0].digest
    assert snap.config.sizes.criu_bytes < kept.config.sizes.criu_bytes - 0.8 * w.bytes
    assert "quiesce" in snap.config.phases and "weights_manifest" in snap.config.phases
    assert _generate(src.pid()) == expected                 # the source was resumed: reloaded, same outputs
    # A capture that fails after the quiesce (the engine asleep, its weights gone): the source is
    # resumed all the same, and nothing is left behind.
    failed = subprocess.run(["thaw", "capture", src.id, "--name", "failed:1", "--root", thaw_env.root],
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "THAW_CONFIG": thaw_env.config, "THAW_TEST_FAULTS": "checkpoint=fail"})
    assert failed.returncode != 0 and "fault" in failed.stderr.lower(), failed.stderr
    assert _generate(src.pid()) == expected
    assert "failed" not in thaw_env.thaw("ls").stdout and os.listdir(store.staging_dir) == []
    src.destroy()

    # Restore: the files verified while CRIU restores, then read (what the page cache lacks) beside
    # the resume steps that reload them.
    dst = thaw_env.container(_worker_bundle(tmp_path, str(work), netns_pair[1],
                                            {ann.SNAPSHOT: "out:1", ann.ENGINE: "vllm"}))
    assert dst.create() == 0, dst.log_text()
    assert "cold start" not in dst.log_text(), dst.log_text()
    record = json.load(open(os.path.join(thaw_env.state, "containers", dst.id + ".json")))
    assert {"weights_open", "weights_reads", "weights_wait", "resume"} <= set(record["phases"]), record
    dst.start()
    assert _generate(dst.pid()) == expected
    dst.destroy()

    # A changed, a missing, and a symlinked-into-the-host weights file: each a cold start, with the reason.
    bad = tmp_path / "bad"
    # (The snapshot whose engine kept its weights too: its resume steps reload from the file as well.)
    for case, name, reason in (("changed", "out:1", "changed: digest"), ("missing", "out:1", "No such file"),
                               ("symlink", "out:1", "No such file"), ("changed", "kept:1", "changed: digest")):
        if bad.exists():
            shutil.rmtree(bad)
        bad.mkdir()
        if case == "changed":
            data = bytearray(open(weights_path, "rb").read())
            data[-100] ^= 0xFF
            (bad / "w.safetensors").write_bytes(bytes(data))
        elif case == "symlink":
            os.symlink(weights_path, bad / "w.safetensors")       # a host path: outside the volume
        c = thaw_env.container(_worker_bundle(tmp_path, str(bad), netns_pair[1],
                                              {ann.SNAPSHOT: name, ann.ENGINE: "vllm"}))
        try:
            assert c.create() == 0, c.log_text()
            log = c.log_text()
            assert "cold start" in log and reason in log, (case, name, log)
            assert c.state()["status"] == "created"                     # runc's own create went ahead
        finally:
            c.destroy()
    assert thaw_env.runc_ids() == []
