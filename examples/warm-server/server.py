"""A service with an expensive warm-up, for the thaw demo (stdlib only, no GPU).

Warm-up does real CPU work that builds in-memory state: a chain of SHA-256 digests, kept in a
table, seeded from fresh randomness (so a cold start can never reproduce the state: seeing the
same digest after a restore proves the memory itself came back). Then it serves HTTP:
  GET /health  200 once warm, 503 before
  GET /state   JSON: state digest (recomputed from the live table), table size, warm-up seconds,
               requests served by this process so far, pid as seen inside the container
"""

import hashlib
import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

WORK = int(os.environ.get("WARM_WORK", "40000000"))     # SHA-256 rounds: ~20 s of one core here
PORT = int(os.environ.get("PORT", "8080"))

state = {"ready": False, "table": [], "warmup_s": None, "served": 0, "seed": None}
lock = threading.Lock()


def warm_up() -> None:
    t = time.perf_counter()
    seed = os.urandom(16)
    table = []
    h = seed
    for i in range(WORK):
        h = hashlib.sha256(h).digest()
        if i % 64 == 0:
            table.append(h)
    state.update(table=table, seed=seed.hex(), warmup_s=round(time.perf_counter() - t, 3), ready=True)
    print(f"warm: {len(table)} entries in {state['warmup_s']}s", flush=True)


def digest() -> str:
    return hashlib.sha256(b"".join(state["table"])).hexdigest()


class Handler(BaseHTTPRequestHandler):
    def _send(self, code: int, obj) -> None:
        body = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if not state["ready"]:
            return self._send(503, {"status": "warming"})
        with lock:
            state["served"] += 1
            served = state["served"]
        if self.path == "/health":
            return self._send(200, {"status": "ready"})
        if self.path == "/state":
            return self._send(200, {"digest": digest(), "entries": len(state["table"]), "seed": state["seed"],
                                    "warmup_s": state["warmup_s"], "served": served, "pid": os.getpid()})
        return self._send(404, {"error": "not found"})

    def log_message(self, *args):
        pass


def main() -> None:
    server = ThreadingHTTPServer(("0.0.0.0", PORT), Handler)
    server.daemon_threads = True
    print(f"listening on :{PORT}, warming up ({WORK} rounds)", flush=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    warm_up()
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    sys.exit(main())
