"""Where the example worker's [heap] comes from (GPU machine): host memory by kind of mapping
after each step of its start. Prints one JSON line per step.

    python3 bench/device/heap_probe.py WEIGHTS [CONFIG]"""

import ctypes
import gc
import importlib.util
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
spec = importlib.util.spec_from_file_location(
    "server", os.path.join(HERE, "..", "..", "examples", "inference-server", "server.py"))
server = importlib.util.module_from_spec(spec)
spec.loader.exec_module(server)


def step(name: str) -> None:
    print(json.dumps({"step": name, **server.host_memory()}), flush=True)


step("python")
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

server.torch, server.F = torch, F   # what Engine.load() sets
step("import torch")
dev = torch.device("cuda")
torch.zeros(1, device=dev)
torch.cuda.synchronize()
step("cuda context")
w = server.load_weights(sys.argv[1], dev, torch.bfloat16)
step("weights loaded")
x = torch.randn(64, 1024, device=dev, dtype=torch.bfloat16)
(x @ x.T).sum().item()
step("a matmul")
gc.collect()
step("gc")
ctypes.CDLL("libc.so.6").malloc_trim(0)
step("malloc_trim(0)")
