"""vLLM, an engine nobody here wrote, captured by thaw and restored through thaw-runtime.

The stock OpenAI-compatible server (`python -m vllm.entrypoints.openai.api_server`, uvloop, an API
server process, an engine core and a worker process, ZeroMQ between them, shared memory and
multiprocessing semaphores in /dev/shm) of vLLM's CPU build, serving a tiny random-weight Qwen3
made here, in a runc container through thaw-runtime: cold start, `thaw capture`, a second
container of the same spec restored. Needs bench/vllm/install.sh's virtualenv: without it the
test skips (also under THAW_TEST_STRICT; see conftest._vllm_skip). Takes a few minutes on 2 cores.
"""

from __future__ import annotations

import json

import pytest

import vllm_container

pytestmark = [pytest.mark.root, pytest.mark.runc, pytest.mark.criu, pytest.mark.vllm]


def test_vllm_restored_serves_the_same_greedy_completions(thaw_env, tmp_path, netns_pair):
    containers: list = []
    try:
        out = vllm_container.run(str(tmp_path), vllm_container.venv_path(), thaw_env.config, thaw_env.root, netns_pair,
                           containers)
    finally:
        for c in containers:
            c.destroy()
    summary = {k: out[k] for k in ("cold_first_token_s", "restore_first_token_s", "capture_s")}
    print(f"\nvLLM CPU: {json.dumps(summary)}; snapshot {out['snapshot']['size']} bytes")
    cold, restored = out["cold_outputs"], out["restored_outputs"]
    assert all(r.get("tokens") == vllm_container.MAX_TOKENS and r.get("text") for r in cold), cold
    # The stock command ran without io_uring (thaw-runtime's seccomp rule; uvloop fell back to
    # epoll) and with multiprocessing semaphores linked in /dev/shm (dumped with link-remap).
    assert out["cold_io_uring_holders"] == []
    assert any(name.startswith("sem.") for name in out["cold_shm"]), out["cold_shm"]
    assert [r["text"] for r in out["cold_after_capture"]] == [r["text"] for r in cold[:2]]  # the source serves on

    events = [json.loads(line) for line in out["events"]]
    restored_ids = [e["container"] for e in events if e.get("kind") == "restored"]
    cold_ids = [e["container"] for e in events if e.get("kind") == "cold_start"]
    assert len(restored_ids) == 1 and len(cold_ids) == 1 and restored_ids != cold_ids, events
    # Restored, not cold-started: the same greedy completions, several prompts, the first one too.
    assert [r["text"] for r in restored] == [r["text"] for r in cold], (cold, restored)
    assert out["first_outputs"]["restored"] == out["first_outputs"]["cold"]
    assert out["outputs_identical"]
    # It keeps serving: a new prompt, concurrent requests, and again after them.
    new = out["restored_new"][0]
    assert new.get("tokens") == 24 and new.get("text"), new
    assert all(r.get("tokens") == vllm_container.MAX_TOKENS and r.get("text") for r in out["restored_concurrent"]), \
        out["restored_concurrent"]
    assert out["restored_after"][0]["text"] == cold[0]["text"]
    # CRIU's link_remap.N links are gone from the restored container's /dev/shm.
    assert not [n for n in out["restored_shm"] if n.startswith("link_remap")], out["restored_shm"]
