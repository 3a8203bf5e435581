#!/usr/bin/env python3
"""Example inference worker for thaw: a Qwen3-0.6B-shaped decoder with random weights.

It behaves like a small LLM engine (vLLM-style start-up phases) so that thaw's restore can be
measured against a cold start: import torch -> load safetensors weights onto the device ->
preallocate a paged KV-cache pool -> warm up -> capture the batched decode step as CUDA graphs for
many batch sizes -> READY. Greedy decoding only, no randomness at request time: a request gives the
same token ids every time, across /quiesce + /resume, and across a CRIU + CUDA checkpoint/restore.

On CUDA the KV pool is, by default, mapped through the driver's virtual memory management API (as
vLLM's sleep mode does): /quiesce releases its physical memory but keeps its address, so the graphs
stay valid, and /resume maps new memory at the same address without capturing them again.

The HTTP server starts before torch is imported, so /health answers 503 while the engine loads.
"""

import argparse
import gc
import json
import math
import os
import signal
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

T_START = time.perf_counter()
BLOCK_SIZE = 16
SEED = 1234
GRAPH_BATCH_SIZES = [1, 2, 4, *range(8, 257, 8)]  # vLLM's default capture sizes (35)
ATTN_ROWS = 32  # decode attention gathers the K/V of at most this many sequences at a time
CONFIGS = {
    "qwen3-0.6b": dict(hidden=1024, layers=28, heads=16, kv_heads=8, head_dim=128, inter=3072,
                       vocab=151936, rope_theta=1e6, eps=1e-6, dtype="bfloat16", max_len=2048),
    # A 4B-class shape (Qwen3-4B's): 8 GB of bf16 weights, for measuring how restore grows with size.
    "qwen3-4b": dict(hidden=2560, layers=36, heads=32, kv_heads=8, head_dim=128, inter=9728,
                     vocab=151936, rope_theta=1e6, eps=1e-6, dtype="bfloat16", max_len=2048),
    # An 8B-class shape (Qwen3-8B's, untied output head like the real model): 16.4 GB of bf16 weights.
    "qwen3-8b": dict(hidden=4096, layers=36, heads=32, kv_heads=8, head_dim=128, inter=12288,
                     vocab=151936, rope_theta=1e6, eps=1e-6, dtype="bfloat16", max_len=2048, tied=False),
    # A CPU test size whose weights (~50 MiB fp32) dwarf the process's other memory, so that a
    # released engine shows in its resident memory and its snapshot.
    "small": dict(hidden=256, layers=4, heads=4, kv_heads=2, head_dim=64, inter=1024,
                  vocab=32000, rope_theta=1e6, eps=1e-6, dtype="float32", max_len=512),
    "tiny": dict(hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, inter=128,
                 vocab=512, rope_theta=1e6, eps=1e-6, dtype="float32", max_len=256),
}
torch = F = None  # imported in Engine.load(), after the HTTP server is up


def log(msg):
    print(f"[server {time.perf_counter() - T_START:8.3f}s] {msg}", flush=True)


class Unavailable(Exception):
    pass


def weight_shapes(c):
    h, hd = c["hidden"], c["head_dim"]
    shapes = {"model.embed_tokens.weight": (c["vocab"], h), "model.norm.weight": (h,)}
    if not c.get("tied", True):
        shapes["lm_head.weight"] = (c["vocab"], h)
    for i in range(c["layers"]):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (c["heads"] * hd, h),
            p + "self_attn.k_proj.weight": (c["kv_heads"] * hd, h),
            p + "self_attn.v_proj.weight": (c["kv_heads"] * hd, h),
            p + "self_attn.o_proj.weight": (h, c["heads"] * hd),
            p + "self_attn.q_norm.weight": (hd,), p + "self_attn.k_norm.weight": (hd,),
            p + "mlp.gate_proj.weight": (c["inter"], h), p + "mlp.up_proj.weight": (c["inter"], h),
            p + "mlp.down_proj.weight": (h, c["inter"]),
        })
    return shapes


def init_weights(c, path):
    """Deterministic random weights (fixed seed), written once, atomically. Drawn on the GPU where
    there is one (an 8B-class file takes minutes on the CPU; Philox gives the same numbers on
    every GPU), else on the CPU."""
    import torch
    from safetensors.torch import save_file
    where = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(where).manual_seed(SEED)
    dtype = getattr(torch, c["dtype"])
    tensors = {}
    for name, shape in weight_shapes(c).items():  # dict order is fixed -> same bytes every time
        if name.endswith("norm.weight"):
            tensors[name] = torch.ones(shape, dtype=dtype)
        else:
            std = 0.02 if "embed" in name else shape[1] ** -0.5  # O(1) block outputs: varied tokens
            tensors[name] = (torch.randn(shape, generator=gen, device=where) * std).to(dtype).cpu()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    save_file(tensors, tmp, metadata={"seed": str(SEED), "format": "pt"})
    os.chmod(tmp, 0o644)  # readable by whichever user the container runs as
    os.replace(tmp, path)


def host_memory():
    """Resident host memory by kind of mapping (bytes), as the process stands: what a snapshot
    taken now would hold before any GPU state is staged into it."""
    out = {"heap": 0, "anonymous": 0, "file": 0}
    kind = None
    try:
        with open("/proc/self/smaps") as f:
            for line in f:
                head = line.split()
                if "-" in head[0] and len(head) >= 5:
                    path = head[5] if len(head) > 5 else ""
                    kind = "heap" if path == "[heap]" else "file" if path.startswith("/") else "anonymous"
                elif head[0] == "Rss:" and kind:
                    out[kind] += int(head[1]) * 1024
    except OSError:
        pass
    return out


def load_weights(path, device, dtype):
    """Load weights the way vLLM-style engines do: map the safetensors file and copy each tensor
    straight out of the mapping to the device. The mapping is page cache, dropped when done, so
    the process keeps no CPU copy of its weights (which a snapshot would carry as heap)."""
    import mmap
    import struct
    import warnings
    kinds = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
    out = {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")          # frombuffer of a read-only mapping: we only read
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                kind = kinds[info["dtype"]]
                a, b = info["data_offsets"]
                view = torch.frombuffer(m, dtype=kind, count=(b - a) // kind.itemsize, offset=8 + n + a)
                out[name] = view.view(info["shape"]).to(device=device, dtype=dtype, copy=True)
                del view
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    finally:
        m.close()
    return out


# ---- device memory at a fixed address (CUDA VMM) ----------------------------------------------
_DLPACK_KEEP = []  # DLPack structs that torch may read until the process exits (never freed)
_DLPACK_NAME = b"dltensor"
DL_CPU, DL_CUDA = 1, 2  # DLDeviceType


def dlpack_tensor(ptr, nbytes, dl_device):
    """A uint8 torch tensor over [ptr, ptr + nbytes), zero-copy: a legacy DLPack capsule built with
    ctypes (needs no numpy). dl_device is (DL_CUDA, ordinal) or (DL_CPU, 0). The memory stays owned
    by the caller; torch gets no deleter."""
    import ctypes

    import torch

    class DLDevice(ctypes.Structure):
        _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]

    class DLDataType(ctypes.Structure):
        _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]

    class DLTensor(ctypes.Structure):
        _fields_ = [("data", ctypes.c_void_p), ("device", DLDevice), ("ndim", ctypes.c_int32),
                    ("dtype", DLDataType), ("shape", ctypes.POINTER(ctypes.c_int64)),
                    ("strides", ctypes.POINTER(ctypes.c_int64)), ("byte_offset", ctypes.c_uint64)]

    class DLManagedTensor(ctypes.Structure):
        _fields_ = [("dl_tensor", DLTensor), ("manager_ctx", ctypes.c_void_p), ("deleter", ctypes.c_void_p)]

    shape, strides = (ctypes.c_int64 * 1)(nbytes), (ctypes.c_int64 * 1)(1)
    m = DLManagedTensor()
    m.dl_tensor = DLTensor(ptr, DLDevice(*dl_device), 1, DLDataType(1, 8, 1), shape, strides, 0)  # kDLUInt 8
    _DLPACK_KEEP.append((m, shape, strides))  # torch keeps a pointer to m for the tensor's lifetime
    capsule_new = ctypes.PYFUNCTYPE(ctypes.py_object, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p)(
        ("PyCapsule_New", ctypes.pythonapi))
    t = torch.utils.dlpack.from_dlpack(capsule_new(ctypes.addressof(m), _DLPACK_NAME, None))
    if t.data_ptr() != ptr or t.numel() != nbytes:
        raise RuntimeError(f"DLPack wrap: got {t.data_ptr():#x}+{t.numel()}, wanted {ptr:#x}+{nbytes}")
    return t


class VmmRegion:
    """Device memory at a fixed virtual address whose physical backing can be released and created
    again, through the CUDA driver's virtual memory management API (what vLLM's CuMemAllocator does
    for sleep mode): cuMemAddressReserve once; cuMemCreate + cuMemMap + cuMemSetAccess to back it;
    cuMemUnmap + cuMemRelease to give the memory back. The reservation and `tensor` (uint8, zero-copy
    over the whole range) live until free(), so kernels and CUDA graphs that use the address stay
    valid; they must not run while the region is released. Uses the primary context of the device
    (the one torch uses). The caller must keep the device idle around release()."""

    def __init__(self, nbytes, ordinal, dl_device=None):
        try:
            from cuda.bindings import driver as cu  # lazily: only on CUDA with --kv-allocator vmm
        except ImportError as e:
            raise RuntimeError(f"--kv-allocator vmm needs the cuda-bindings package (cuda.bindings.driver): "
                               f"{e}; install it or use --kv-allocator torch") from e
        self.cu, self.ordinal, self.handle = cu, ordinal, None
        self._ck("cuInit", cu.cuInit(0))  # harmless when torch already initialised CUDA
        self.dev = self._ck("cuDeviceGet", cu.cuDeviceGet(ordinal))
        self.ctx = self._ck("cuDevicePrimaryCtxRetain", cu.cuDevicePrimaryCtxRetain(self.dev))
        self._ensure_context()
        self.prop = cu.CUmemAllocationProp()
        self.prop.type = cu.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
        self.prop.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        self.prop.location.id = ordinal
        self.granularity = int(self._ck("cuMemGetAllocationGranularity", cu.cuMemGetAllocationGranularity(
            self.prop, cu.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_MINIMUM)))
        self.size = -(-nbytes // self.granularity) * self.granularity
        self.dptr = self._ck("cuMemAddressReserve",
                             cu.cuMemAddressReserve(self.size, self.granularity, cu.CUdeviceptr(0), 0))
        self.ptr = int(self.dptr)
        try:
            self.map()
            self.tensor = dlpack_tensor(self.ptr, self.size, dl_device or (DL_CUDA, ordinal))
        except BaseException:
            self.free()
            raise

    def _ck(self, what, result):
        """cuda.bindings calls return (CUresult, *values): raise on an error, else return the value."""
        err, vals = result[0], result[1:]
        if err != self.cu.CUresult.CUDA_SUCCESS:
            try:
                name, desc = self.cu.cuGetErrorName(err)[1].decode(), self.cu.cuGetErrorString(err)[1].decode()
            except Exception:  # noqa: BLE001 - the message is a courtesy
                name, desc = str(err), ""
            raise RuntimeError(f"CUDA driver call {what} failed: {name} ({int(getattr(err, 'value', 0))}) {desc}")
        return vals[0] if len(vals) == 1 else None

    def _ensure_context(self):
        """HTTP handler threads may have no current context yet: make the device's primary one current."""
        ctx = self._ck("cuCtxGetCurrent", self.cu.cuCtxGetCurrent())
        if ctx is None or int(ctx) == 0:
            self._ck("cuCtxSetCurrent", self.cu.cuCtxSetCurrent(self.ctx))

    @property
    def mapped(self):
        return self.handle is not None

    def map(self):
        """Create physical memory and map it at the reserved address (read/write for the device)."""
        cu = self.cu
        if self.mapped:
            return
        self._ensure_context()
        handle = self._ck("cuMemCreate", cu.cuMemCreate(self.size, self.prop, 0))
        try:
            self._ck("cuMemMap", cu.cuMemMap(self.dptr, self.size, 0, handle, 0))
        except BaseException as e:
            cu.cuMemRelease(handle)
            raise RuntimeError(f"{e} (at {self.ptr:#x}, {self.size} bytes: was the reservation lost?)") from e
        access = cu.CUmemAccessDesc()
        access.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        access.location.id = self.ordinal
        access.flags = cu.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
        try:
            self._ck("cuMemSetAccess", cu.cuMemSetAccess(self.dptr, self.size, [access], 1))
        except BaseException:
            cu.cuMemUnmap(self.dptr, self.size)
            cu.cuMemRelease(handle)
            raise
        self.handle = handle

    def release(self):
        """Give the physical memory back to the driver; the address stays reserved. Returns bytes freed."""
        if not self.mapped:
            return 0
        self._ensure_context()
        self._ck("cuCtxSynchronize", self.cu.cuCtxSynchronize())  # nothing may still use the memory
        self._ck("cuMemUnmap", self.cu.cuMemUnmap(self.dptr, self.size))
        handle, self.handle = self.handle, None
        self._ck("cuMemRelease", self.cu.cuMemRelease(handle))
        return self.size

    def free(self):
        """Release the memory and the address (the self-test only: the engine keeps its region)."""
        self.release()
        self._ck("cuMemAddressFree", self.cu.cuMemAddressFree(self.dptr, self.size))


# ---- weights that can leave and come back (sleep mode) ------------------------------------------
def safetensors_layout(path):
    """(data offset in the file, data length, {name: (dtype name, shape, start, end)}) of a
    safetensors file: the data section is what the arena holds, byte for byte."""
    import struct
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    tensors = {k: (v["dtype"], v["shape"], *v["data_offsets"]) for k, v in header.items() if k != "__metadata__"}
    return 8 + n, max((t[3] for t in tensors.values()), default=0), tensors


def empty_host_cache():
    """Give torch's cached pinned host blocks (the loader's buffers, a level-1 copy) back: a
    snapshot would carry them."""
    fn = getattr(torch._C, "_host_emptyCache", None)
    if fn is not None:
        fn()


class WeightArena:
    """All weights in one block of memory laid out as the safetensors file's data section, with
    tags like vLLM's allocator ("weights"): release() gives the memory back, map() takes memory
    again, load() fills it from the file. On CUDA with VMM the block keeps its virtual address
    across release/map (so CUDA graphs stay valid); on the CPU it is a plain host buffer, a new
    one at each map() (nothing holds its address)."""
    tag = "weights"

    def __init__(self, path, device, dtype, vmm):
        self.path, self.device, self.dtype = path, device, dtype
        self.data_start, self.nbytes, self.tensors = safetensors_layout(path)
        kinds = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
        for name, (dt, _shape, a, _b) in self.tensors.items():
            if kinds[dt] != dtype or a % dtype.itemsize:
                raise RuntimeError(f"--enable-sleep-mode loads {path} as it is: {name} is {dt} at offset {a}, "
                                   f"the engine runs {dtype} (drop --dtype)")
        self.vmm = VmmRegion(self.nbytes, device.index) if vmm else None
        self.buf = None
        self.map()

    @property
    def mapped(self):
        return self.buf is not None

    def map(self):
        if self.buf is None:
            if self.vmm is not None:
                self.vmm.map()
                self.buf = self.vmm.tensor[:self.nbytes]
            else:
                self.buf = torch.empty(self.nbytes, dtype=torch.uint8, device=self.device)
        return self.views()

    def views(self):
        return {name: self.buf[a:b].view(self.dtype).view(shape) for name, (_, shape, a, b) in self.tensors.items()}

    def release(self):
        """Give the memory back; returns the bytes released."""
        if self.buf is None:
            return 0
        self.buf = None
        if self.vmm is not None:
            return self.vmm.release()
        gc.collect()
        return self.nbytes

    def host_copy(self):
        """Level 1 sleep on CUDA: the weights into pinned host memory before the release."""
        copy = torch.empty(self.nbytes, dtype=torch.uint8, pin_memory=True)
        copy.copy_(self.buf)
        return copy

    def load(self, streams=8, chunk=8 << 20, loader="own", depth=2):
        """Fill the mapped block from the file: parallel preads straight into host memory (CPU), or
        through pinned buffers and several CUDA streams (a multi-stream loader: each reader thread
        owns `depth` pinned buffers of `chunk` bytes and a stream, so reads and copies overlap).
        loader="fastsafetensors" reads with IBM's loader instead (see _load_fastsafetensors).
        Returns bytes/seconds (on CUDA also the pinning's share, pin_s)."""
        import concurrent.futures
        if self.buf is None:
            raise Unavailable("weights are not mapped (wake_up?tags=weights first)")
        t = time.perf_counter()
        if loader == "fastsafetensors":
            split = self._load_fastsafetensors(streams)
            return {"bytes": self.nbytes, "load_s": round(time.perf_counter() - t, 6), "streams": streams,
                    "loader": loader, **split}
        fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        split = {}
        try:
            ranges = [(off, min(chunk, self.nbytes - off)) for off in range(0, self.nbytes, chunk)]
            if self.device.type == "cuda":
                split = self._load_cuda(fd, ranges, streams, chunk, depth)
            else:
                import ctypes
                base = self.buf.data_ptr()

                def read(r):
                    off, n = r
                    view = memoryview((ctypes.c_char * n).from_address(base + off)).cast("B")
                    got = 0
                    while got < n:
                        k = os.preadv(fd, [view[got:]], self.data_start + off + got)
                        if not k:
                            raise RuntimeError(f"{self.path} ends early")
                        got += k
                with concurrent.futures.ThreadPoolExecutor(streams) as pool:
                    list(pool.map(read, ranges))
        finally:
            os.close(fd)
        return {"bytes": self.nbytes, "load_s": round(time.perf_counter() - t, 6), "streams": streams,
                "chunk": chunk, "depth": depth, "loader": loader, **split}

    def _load_fastsafetensors(self, threads):
        """fastsafetensors (IBM; imported here only, so the worker runs without it) reads the file
        into a buffer of its own on the device (no GDS: parallel preads through its bounce buffers,
        pinned on CUDA), then each tensor is copied into the arena at its file offset. It cannot
        fill a caller's block, so the arena (whose address CUDA graphs hold) costs one more copy
        at memory speed and the weights' size again, transiently."""
        try:
            from fastsafetensors import SafeTensorsFileLoader
        except ImportError as e:
            raise RuntimeError(f"--loader fastsafetensors: {e}; pip install fastsafetensors") from e
        device = self.device
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())  # it needs the index
        fst = SafeTensorsFileLoader(None, str(device), nogds=True, max_threads=threads, set_numa=False)
        try:
            t = time.perf_counter()
            fst.add_filenames({0: [self.path]})
            files = fst.copy_files_to_device()
            read_s, t = time.perf_counter() - t, time.perf_counter()
            try:
                for name, (_, _shape, a, b) in self.tensors.items():
                    self.buf[a:b].copy_(files.get_tensor(name).reshape(-1).view(torch.uint8))
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
            finally:
                files.close()
        finally:
            fst.close()
        if self.device.type == "cuda":
            empty_host_cache()
        return {"fst_read_s": round(read_s, 6), "arena_copy_s": round(time.perf_counter() - t, 6)}

    def _load_cuda(self, fd, ranges, streams, chunk, depth):
        import concurrent.futures
        import ctypes
        t = time.perf_counter()
        staging = PinnedBlock(streams * depth * chunk)
        pin_s = time.perf_counter() - t

        def worker(k):
            stream = torch.cuda.Stream(self.device)
            bufs = [staging.tensor[(k * depth + j) * chunk:(k * depth + j + 1) * chunk] for j in range(depth)]
            events = [None] * depth
            for i, (off, n) in enumerate(ranges[k::streams]):
                j = i % depth
                if events[j] is not None:
                    events[j].synchronize()      # the copy out of this buffer has finished
                view = memoryview((ctypes.c_char * n).from_address(bufs[j].data_ptr())).cast("B")
                got = 0
                while got < n:
                    m = os.preadv(fd, [view[got:]], self.data_start + off + got)
                    if not m:
                        raise RuntimeError(f"{self.path} ends early")
                    got += m
                with torch.cuda.stream(stream):
                    self.buf[off:off + n].copy_(bufs[j][:n], non_blocking=True)
                    events[j] = torch.cuda.Event()
                    events[j].record(stream)
            stream.synchronize()
        try:
            with concurrent.futures.ThreadPoolExecutor(streams) as pool:
                list(pool.map(worker, range(streams)))
            torch.cuda.synchronize(self.device)
        finally:
            staging.free()
        return {"pin_s": round(pin_s, 6)}


class PinnedBlock:
    """Host memory the GPU copies from directly, of exactly `nbytes` (torch's pinned allocator rounds
    a block up to a power of two, and pinning costs time by the byte): plain memory registered
    with cudaHostRegister, unregistered by free() so that no snapshot carries it; torch's pinned
    allocator where the runtime offers no registration."""

    def __init__(self, nbytes):
        self.tensor, self.registered = torch.empty(nbytes, dtype=torch.uint8), False
        register = getattr(torch.cuda.cudart(), "cudaHostRegister", None)
        try:
            self.registered = register is not None and int(register(self.tensor.data_ptr(), nbytes, 0)) == 0
        except Exception:  # noqa: BLE001 - a runtime without it: torch's pinned allocator instead
            self.registered = False
        if not self.registered:
            self.tensor = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)

    def free(self):
        tensor, self.tensor = self.tensor, None
        if self.registered:
            torch.cuda.cudart().cudaHostUnregister(tensor.data_ptr())
            self.registered = False
        del tensor
        empty_host_cache()


class Engine:
    def __init__(self, args):
        self.args, self.c = args, CONFIGS[args.config]
        self.lock = threading.Lock()  # one batch at a time on the device
        self.state, self.phase = "loading", "start"
        self.timings, self.info = {}, {}
        self.pool = self.kv = self.vmm = None
        self.arena = self.host_weights = None
        self.weights = "loaded"      # loaded | host (level 1 on CUDA) | released (level 2) | empty (mapped, not loaded)
        self.kv_released = False
        self.graphs = {}  # batch size -> (torch.cuda.CUDAGraph, its output tensor)
        self.sizes = args.graph_batch_sizes  # sorted, unique; also the padding sizes without graphs
        self.max_batch = self.sizes[-1]

    # ---- start-up -----------------------------------------------------------------------
    def load(self):
        global torch, F
        a, c, tm = self.args, self.c, self.timings
        t = time.perf_counter()
        self.phase = "import"
        import torch as _torch
        import torch.nn.functional as _F
        torch, F = _torch, _F
        tm["import_s"] = time.perf_counter() - t
        dev = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.dev = torch.device(f"cuda:{torch.cuda.current_device()}" if dev == "cuda" else dev)
        self.cuda = self.dev.type == "cuda"
        self.allocator = a.kv_allocator or ("vmm" if self.cuda else "torch")
        if self.allocator == "vmm" and not self.cuda:
            raise RuntimeError("--kv-allocator vmm needs --device cuda")
        self.dtype = getattr(torch, a.dtype or c["dtype"])
        torch.manual_seed(SEED)  # nothing should draw random numbers, but be sure anyway

        created = False
        if not os.path.exists(a.weights):
            self.phase, t = "init_weights", time.perf_counter()
            log(f"creating random weights {a.weights}")
            init_weights(c, a.weights)
            created, tm["init_weights_s"] = True, time.perf_counter() - t
        self.phase, t = "load", time.perf_counter()
        if a.enable_sleep_mode:
            # Weights in one tagged block that sleep can release and a wake refill from the file.
            self.arena = WeightArena(a.weights, self.dev, self.dtype, vmm=self.cuda)
            tm["weights_loader"] = self.arena.load(a.load_streams, a.load_chunk_mib << 20, a.loader)["load_s"]
            w = self.arena.views()
        else:
            w = load_weights(a.weights, self.dev, self.dtype)
        self._bind(w)
        self.weight_bytes = sum(v.numel() * v.element_size() for v in w.values())
        inv = 1.0 / (c["rope_theta"] ** (torch.arange(0, c["head_dim"], 2, dtype=torch.float64) / c["head_dim"]))
        ang = torch.outer(torch.arange(a.max_model_len or c["max_len"], dtype=torch.float64), inv)
        self.cos, self.sin = ang.cos().float().to(self.dev), ang.sin().float().to(self.dev)
        self._sync()
        tm["load_s"] = time.perf_counter() - t

        self.phase, t = "kv_alloc", time.perf_counter()
        self.block_bytes = (c["layers"] * 2 * BLOCK_SIZE * c["kv_heads"] * c["head_dim"]
                            * torch.empty(0, dtype=self.dtype).element_size())
        if a.kv_blocks:
            self.num_blocks = a.kv_blocks
        elif self.cuda:
            free, _ = torch.cuda.mem_get_info(self.dev)
            self.num_blocks = int(free * a.kv_fraction) // self.block_bytes
        else:
            self.num_blocks = 64
        # The last block is the null block: padding rows and unused block-table entries point there.
        self.null_block = self.num_blocks - 1
        self.max_len = min(self.cos.shape[0], self.null_block * BLOCK_SIZE) // BLOCK_SIZE * BLOCK_SIZE
        if self.max_len < BLOCK_SIZE:
            raise RuntimeError(f"KV pool too small: {self.num_blocks} blocks")
        self.nb = self.max_len // BLOCK_SIZE  # block-table width
        with torch.inference_mode():  # the decode step's static inputs, sized for the largest batch
            self.tok_buf = torch.zeros(self.max_batch, dtype=torch.long, device=self.dev)
            self.pos_buf = torch.zeros(self.max_batch, dtype=torch.long, device=self.dev)
            self.bt_buf = torch.full((self.max_batch, self.nb), self.null_block, dtype=torch.long, device=self.dev)
            self.ar = torch.arange(self.max_len, device=self.dev)
        self._alloc_kv()
        tm["kv_alloc_s"] = time.perf_counter() - t

        self.phase, t = "warmup", time.perf_counter()
        with torch.inference_mode():
            self._run([(7 * i + 3) % c["vocab"] for i in range(min(32, self.max_len // 2))], 4, eager=True)
        tm["warmup_s"] = time.perf_counter() - t
        self.phase, t = "graph", time.perf_counter()
        self._capture()
        tm["graph_s"] = time.perf_counter() - t
        tm["total_s"] = time.perf_counter() - T_START
        self.info = dict(device=str(self.dev), dtype=str(self.dtype).replace("torch.", ""),
                         config=a.config, torch=torch.__version__, weights=a.weights,
                         weights_created=created, weight_bytes=self.weight_bytes,
                         num_blocks=self.num_blocks, block_size=BLOCK_SIZE, max_model_len=self.max_len,
                         kv_bytes=self.kv_bytes, kv_allocator=self.allocator, kv_ptr=hex(self.pool.data_ptr()),
                         cuda_graph=bool(self.graphs), graphs=len(self.graphs), max_batch=self.max_batch,
                         graph_batch_sizes=sorted(self.graphs), host_memory=host_memory(),
                         sleep_mode=self.arena is not None,
                         weights_ptr=hex(self.emb.data_ptr()) if self.arena is not None else None)
        self._ready()
        print("READY " + json.dumps({**{k: round(v, 4) for k, v in tm.items()}, **self.info}), flush=True)

    def _bind(self, w):
        """Point the model at weight tensors (the arena's views after a wake, or loaded ones)."""
        self.emb, self.norm = w["model.embed_tokens.weight"], w["model.norm.weight"]
        self.lm_head = w.get("lm_head.weight", self.emb)   # tied unless the config has its own head
        names = ("input_layernorm", "post_attention_layernorm", "self_attn.q_proj", "self_attn.k_proj",
                 "self_attn.v_proj", "self_attn.o_proj", "self_attn.q_norm", "self_attn.k_norm",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
        self.layers = [[w[f"model.layers.{i}.{n}.weight"] for n in names] for i in range(self.c["layers"])]

    def _unbind(self):
        self.emb = self.norm = self.lm_head = None
        self.layers = []

    def _sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.dev)

    def _alloc_kv(self):
        """One big pool, as vLLM does; zero-filled so masked-out slots never hold NaN (0 * NaN = NaN)."""
        c = self.c
        shape = (self.num_blocks, c["layers"], 2, c["kv_heads"], BLOCK_SIZE, c["head_dim"])
        self.kv_bytes = self.num_blocks * self.block_bytes
        with torch.inference_mode():
            if self.allocator == "vmm":
                self.vmm = VmmRegion(self.kv_bytes, self.dev.index)
                self.pool = self.vmm.tensor[:self.kv_bytes].view(self.dtype).view(shape)
                if self.pool.data_ptr() != self.vmm.ptr:
                    raise RuntimeError(f"KV pool at {self.pool.data_ptr():#x}, reserved {self.vmm.ptr:#x}")
                self.pool.zero_()
            else:
                self.pool = torch.zeros(shape, dtype=self.dtype, device=self.dev)
            self.kv = [(self.pool[:, i, 0], self.pool[:, i, 1]) for i in range(c["layers"])]
        self._sync()

    def _capture(self):
        """Capture the decode step for each batch size, largest first, sharing one memory pool (what
        vLLM does): one eager run of each size on a side stream, then its capture; then every graph
        is replayed once."""
        self.graphs = {}
        if not self.cuda or self.args.no_cuda_graph:
            return
        with torch.inference_mode():
            self._clear_batch()  # capture/warm-up rows: token 0 at position 0 in the null block
            mempool = torch.cuda.graph_pool_handle()
            cur, side = torch.cuda.current_stream(self.dev), torch.cuda.Stream(self.dev)
            for b in sorted(self.sizes, reverse=True):
                side.wait_stream(cur)
                with torch.cuda.stream(side):
                    self._decode(b)
                cur.wait_stream(side)
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, pool=mempool, capture_error_mode="thread_local"):
                    out = self._decode(b)
                self.graphs[b] = (g, out)
            for b in sorted(self.graphs):
                self.graphs[b][0].replay()
            self._sync()
        torch.cuda.empty_cache()  # the eager runs' cached blocks; the graphs' pool stays

    def _ready(self):
        self.state = "ready"
        if self.args.ready_file:
            tmp = self.args.ready_file + ".tmp"
            with open(tmp, "w") as f:
                f.write(json.dumps({"pid": os.getpid(), **self.info}) + "\n")
            os.replace(tmp, self.args.ready_file)

    # ---- model ----------------------------------------------------------------------------
    def _rms(self, x, w):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.c["eps"])).to(x.dtype) * w

    def _rope(self, x, cos, sin):  # x [T, n, hd]; cos/sin [T, hd/2]; Qwen/Llama "rotate half"
        h = x.shape[-1] // 2
        x1, x2 = x[..., :h].float(), x[..., h:].float()
        cos, sin = cos[:, None, :], sin[:, None, :]
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), -1).to(x.dtype)

    def _layers(self, ids, pos, attend):
        """The decoder layers over T rows (ids/pos: [T]) -> hidden states [T, hidden];
        attend(layer, q [T,H,hd], k [T,KV,hd], v [T,KV,hd]) -> [T, H*hd]."""
        c = self.c
        T, H, KV, hd = ids.shape[0], c["heads"], c["kv_heads"], c["head_dim"]
        x, cos, sin = self.emb[ids], self.cos[pos], self.sin[pos]
        for i, (ln1, ln2, wq, wk, wv, wo, qn, kn, wg, wu, wd) in enumerate(self.layers):
            h = self._rms(x, ln1)
            q = self._rope(self._rms(F.linear(h, wq).view(T, H, hd), qn), cos, sin)
            k = self._rope(self._rms(F.linear(h, wk).view(T, KV, hd), kn), cos, sin)
            v = F.linear(h, wv).view(T, KV, hd)
            x = x + F.linear(attend(i, q, k, v), wo)
            h = self._rms(x, ln2)
            x = x + F.linear(F.silu(F.linear(h, wg)) * F.linear(h, wu), wd)
        return x

    def _head(self, x):  # [T, hidden] -> greedy next token [T]
        return F.linear(self._rms(x, self.norm), self.lm_head).argmax(-1)

    def _prefill(self, ids, bt):
        """One sequence from position 0: ids [T], bt [nb] its block table. Writes its K/V into the
        pool; returns the next token, [1]."""
        T, g = ids.shape[0], self.c["heads"] // self.c["kv_heads"]
        pos = self.ar[:T]
        blk, off = bt[pos // BLOCK_SIZE], pos % BLOCK_SIZE

        def attend(i, q, k, v):
            kc, vc = self.kv[i]
            kc[blk, :, off] = k
            vc[blk, :, off] = v
            kk = k.repeat_interleave(g, dim=1).transpose(0, 1)
            vv = v.repeat_interleave(g, dim=1).transpose(0, 1)
            o = F.scaled_dot_product_attention(q.transpose(0, 1), kk, vv, is_causal=True)
            return o.transpose(0, 1).reshape(T, -1)
        return self._head(self._layers(ids, pos, attend)[-1:])

    def _decode(self, b):
        """One decode step for the first b rows of the static buffers: row r has token tok_buf[r] at
        position pos_buf[r] and block table bt_buf[r]; it attends over its blocks, masked by its
        position. Returns the next tokens, [b]. This is what the CUDA graph of size b replays."""
        KV, hd, L = self.c["kv_heads"], self.c["head_dim"], self.max_len
        g, scale = self.c["heads"] // KV, 1.0 / math.sqrt(hd)
        tok, pos, bt = self.tok_buf[:b], self.pos_buf[:b], self.bt_buf[:b]
        blk, off = bt.gather(1, (pos // BLOCK_SIZE)[:, None])[:, 0], pos % BLOCK_SIZE
        mask = (self.ar[None, :] <= pos[:, None])[None, :, None, :]  # [1, b, 1, L]
        # Attend in equal chunks of rows (every row runs the same kernels), so that the gathered
        # K/V, and with them the graphs' memory, stay small at large batch sizes.
        ch = max(d for d in range(1, min(b, ATTN_ROWS) + 1) if b % d == 0)
        # The pool as rows of [16 slots, hd]: block n, layer i, K/V t, head h is row ((n*layers+i)*2+t)*KV+h.
        pool_rows, per_block = self.pool.view(-1, BLOCK_SIZE * hd), self.c["layers"] * 2 * KV
        tables = bt.reshape(b // ch, ch * self.nb) * per_block
        heads = torch.arange(KV, device=self.dev)

        def gather(i, t, c):  # K (t=0) or V (t=1) of layer i for the rows of chunk c: [KV, ch, L, hd]
            idx = tables[c][None, :] + ((i * 2 + t) * KV + heads)[:, None]  # [KV, ch*nb]
            return pool_rows.index_select(0, idx.view(-1)).view(KV, ch, L, hd)

        def attend(i, q, k, v):
            kc, vc = self.kv[i]
            kc[blk, :, off] = k
            vc[blk, :, off] = v
            q, out = q.view(b, KV, g, hd).transpose(0, 1), []  # [KV, b, g, hd]
            for c in range(b // ch):
                rows = slice(c * ch, (c + 1) * ch)
                s = torch.matmul(q[:, rows], gather(i, 0, c).transpose(-1, -2)).float() * scale  # [KV, ch, g, L]
                p = torch.softmax(s.masked_fill(~mask[:, rows], float("-inf")), -1).to(q.dtype)
                out.append(torch.matmul(p, gather(i, 1, c)))
            return torch.cat(out, 1).transpose(0, 1).reshape(b, -1)
        return self._head(self._layers(tok, pos, attend))

    def _clear_batch(self):
        self.tok_buf.zero_()
        self.pos_buf.zero_()
        self.bt_buf.fill_(self.null_block)

    def _graph_size(self, n):
        return next(b for b in self.sizes if b >= n)

    def _run(self, ids, max_tokens, n=1, eager=False):
        """n copies of the prompt: each is prefilled on its own (eagerly) into its own blocks, then
        all decode together through the graph of the smallest captured size >= n (the extra rows are
        padding in the null block). Returns (n rows of max_tokens tokens, ttft, total, size)."""
        t0 = time.perf_counter()
        b, nbl = self._graph_size(n), -(-(len(ids) + max_tokens) // BLOCK_SIZE)
        self._clear_batch()
        self.bt_buf[:n, :nbl] = torch.arange(n * nbl, device=self.dev).view(n, nbl)  # row r: blocks r*nbl..
        ids_t = torch.tensor(ids, dtype=torch.long, device=self.dev)
        self.tok_buf[:n] = torch.cat([self._prefill(ids_t, self.bt_buf[r]) for r in range(n)])
        rows = [[t] for t in self.tok_buf[:n].tolist()]
        ttft = time.perf_counter() - t0
        graph = None if eager else self.graphs.get(b)
        for i in range(max_tokens - 1):
            self.pos_buf[:n].fill_(len(ids) + i)
            if graph is not None:
                graph[0].replay()
                nxt = graph[1][:n]
            else:
                nxt = self._decode(b)[:n]
            self.tok_buf[:n].copy_(nxt)
            for row, t in zip(rows, nxt.tolist()):
                row.append(t)
        return rows, ttft, time.perf_counter() - t0, b

    # ---- requests ------------------------------------------------------------------------
    def generate(self, prompt, max_tokens, batch=None):
        if self.state != "ready":  # also before the engine has loaded (no max_len, no torch yet)
            raise Unavailable(self.state)
        if isinstance(prompt, str):
            ids = [b % self.c["vocab"] for b in prompt.encode("utf-8")]
        elif isinstance(prompt, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in prompt):
            ids = prompt
        else:
            raise ValueError("prompt must be a string or a list of token ids")
        if not ids or any(i < 0 or i >= self.c["vocab"] for i in ids):
            raise ValueError(f"prompt must be non-empty with ids in [0, {self.c['vocab']})")
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise ValueError("max_tokens must be a positive integer")
        if len(ids) + max_tokens > self.max_len:
            raise ValueError(f"prompt + max_tokens exceeds max_model_len {self.max_len}")
        n = 1 if batch is None else batch
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= self.max_batch:
            raise ValueError(f"batch must be an integer in [1, {self.max_batch}]")
        blocks = n * -(-(len(ids) + max_tokens) // BLOCK_SIZE)
        if blocks > self.null_block:
            raise ValueError(f"batch needs {blocks} KV blocks, the pool has {self.null_block}")
        with self.lock:
            if self.state != "ready":
                raise Unavailable(self.state)
            with torch.inference_mode():
                rows, ttft, total, size = self._run(ids, max_tokens, n)
        out = {"tokens": rows[0], "prompt_tokens": len(ids), "ttft_s": round(ttft, 6), "total_s": round(total, 6),
               "blocks_used": blocks}
        if batch is not None:
            out.update(batch=n, batch_size_run=size, cuda_graph=size in self.graphs, batch_tokens=rows)
        return out

    def _mem(self):
        if not self.cuda:
            return {}
        free, total = torch.cuda.mem_get_info(self.dev)
        return {"allocated": torch.cuda.memory_allocated(self.dev), "reserved": torch.cuda.memory_reserved(self.dev),
                "gpu_free": free, "gpu_total": total}

    def _release_kv(self):
        """The KV pool's memory back: vmm keeps its address, its tensor and the graphs; torch drops
        the pool and the graphs."""
        if self.kv_released:
            return 0
        self._sync()
        if self.vmm is not None:
            released = self.vmm.release()
        else:
            released = self.kv_bytes
            self.graphs, self.pool, self.kv = {}, None, None
            gc.collect()
        self.kv_released = True
        return released

    def _map_kv(self):
        """vmm: new memory at the same address, zeroed; the graphs are used as they are. torch: a new
        pool and the graphs captured again."""
        if not self.kv_released:
            return {}
        t = time.perf_counter()
        if self.vmm is not None:
            self.vmm.map()
            with torch.inference_mode():
                self.pool.zero_()  # the same tensor object, at the same address
            self._sync()
            t_kv = t_g = time.perf_counter()
        else:
            self._alloc_kv()
            t_kv = time.perf_counter()
            self._capture()
            t_g = time.perf_counter()
        self.kv_released = False
        self.info["kv_ptr"] = hex(self.pool.data_ptr())
        return {"kv_alloc_s": round(t_kv - t, 6), "graph_s": round(t_g - t_kv, 6)}

    def _not_ready(self):
        """Leave the ready state: no request touches the engine's memory from here on."""
        if self.state not in ("ready", "sleeping"):
            raise Unavailable(self.state)
        self.state = "sleeping"
        if self.args.ready_file and os.path.exists(self.args.ready_file):
            os.unlink(self.args.ready_file)

    def _maybe_ready(self):
        if self.weights == "loaded" and not self.kv_released and self.state == "sleeping":
            self._ready()

    def is_sleeping(self):
        return {"is_sleeping": self.state == "sleeping"}

    def sleep(self, level):
        """vLLM's /sleep: level 1 keeps a host copy of the weights (on CUDA; on the CPU they stay
        where they are), level 2 discards them; both release the KV cache. Needs --enable-sleep-mode."""
        if self.arena is None:
            raise ValueError("sleep mode is off: start the server with --enable-sleep-mode")
        if level not in (1, 2):
            raise ValueError("level must be 1 or 2")
        with self.lock:
            t, before = time.perf_counter(), self._mem()
            self._not_ready()
            out = {"kv_bytes_released": self._release_kv(), "weight_bytes_released": 0}
            if self.weights in ("loaded", "empty") and (level == 2 or self.cuda):
                self._sync()
                if level == 1 and self.weights == "loaded":
                    self.host_weights = self.arena.host_copy()
                self._unbind()
                out["weight_bytes_released"] = self.arena.release()
                self.weights = "host" if self.host_weights is not None else "released"
            if self.cuda:
                torch.cuda.empty_cache()
            return {"status": "sleeping", "level": level, "weights": self.weights, **out, "before": before,
                    "after": self._mem(), "sleep_s": round(time.perf_counter() - t, 6)}

    def wake_up(self, tags=None):
        """vLLM's /wake_up: tags "weights" (memory mapped again: level 1's copy restored; after level
        2 it holds nothing until reload_weights), "kv_cache", or both (no tags)."""
        tags = tags or ["weights", "kv_cache"]
        if set(tags) - {"weights", "kv_cache"}:
            raise ValueError(f"unknown tags {tags}: weights, kv_cache")
        with self.lock:
            if self.state == "ready":
                return {"status": "ready", "noop": True, "num_blocks": self.num_blocks}
            if self.state != "sleeping":
                raise Unavailable(self.state)
            t, out = time.perf_counter(), {}
            if "weights" in tags and self.weights in ("host", "released"):
                self._bind(self.arena.map())
                if self.weights == "host":
                    self.arena.buf.copy_(self.host_weights)
                    self._sync()
                    self.host_weights = None
                    empty_host_cache()
                    self.weights = "loaded"
                else:
                    self.weights = "empty"
            if "kv_cache" in tags:
                out.update(self._map_kv())
            self._maybe_ready()
            return {"status": self.state, "weights": self.weights, "kv_cache": not self.kv_released,
                    "num_blocks": self.num_blocks, **out, "wake_s": round(time.perf_counter() - t, 6)}

    def reload_weights(self):
        """vLLM's collective_rpc reload_weights: the weights file read again into the mapped memory."""
        with self.lock:
            if self.arena is None:
                raise ValueError("sleep mode is off: start the server with --enable-sleep-mode")
            if self.state == "ready":                  # reload in place: the lock keeps requests out
                self._not_ready()
            if self.weights in ("host", "released"):
                raise Unavailable("weights are not mapped (wake_up?tags=weights first)")
            out = self.arena.load(self.args.load_streams, self.args.load_chunk_mib << 20, self.args.loader)
            self.weights = "loaded"
            self._maybe_ready()
            return {"status": self.state, **out}

    def quiesce(self):
        """Today's /quiesce (kept): the KV cache leaves, the weights stay."""
        with self.lock:
            if self.state == "sleeping" and self.kv_released:  # idempotent, so that callers may retry
                return {"status": "quiesced", "noop": True, "after": self._mem()}
            t, before = time.perf_counter(), self._mem()
            self._not_ready()
            released = self._release_kv()
            if self.cuda:
                torch.cuda.empty_cache()
            return {"status": "quiesced", "kv_bytes_released": released, "num_blocks": self.num_blocks,
                    "kv_allocator": self.allocator, "graphs_kept": len(self.graphs),
                    "before": before, "after": self._mem(), "quiesce_s": round(time.perf_counter() - t, 6)}

    def resume(self):
        """Today's /resume (kept): wake everything, reloading weights that a level-2 sleep discarded."""
        t = time.perf_counter()
        out = self.wake_up(["weights"])
        if out.get("noop"):
            return out
        if self.weights == "empty":
            self.reload_weights()
        out = self.wake_up(["kv_cache"])
        return {**out, "kv_bytes": self.kv_bytes, "kv_allocator": self.allocator, "kv_ptr": self.info.get("kv_ptr"),
                "graphs": len(self.graphs), "graphs_recaptured": self.vmm is None and bool(self.graphs),
                "total_s": round(time.perf_counter() - t, 6), "resume_s": round(time.perf_counter() - t, 6),
                "mem": self._mem()}


def selftest_vmm(a):
    """--selftest-vmm: a small VMM region written and read through torch, a CUDA graph over it, then
    release + map again at the same address, zeroed, with the old graph still working. Exit 0/1."""
    import torch
    res = {}
    try:
        if not torch.cuda.is_available():
            raise RuntimeError("CUDA is not available")
        torch.cuda.init()
        dev = torch.device("cuda", torch.cuda.current_device())
        torch.zeros(1, device=dev)  # a current context, as the engine has after loading weights
        torch.cuda.synchronize(dev)
        nbytes = 256 * 2**20 + 12345  # not a multiple of the granularity
        r = VmmRegion(nbytes, dev.index)
        res.update(ptr=hex(r.ptr), size=r.size, granularity=r.granularity, requested=nbytes)
        t = r.tensor.view(torch.bfloat16)

        def ok(cond, what):
            if not cond:
                raise AssertionError(what)
        ok(r.tensor.is_cuda and t.data_ptr() == r.ptr and r.size >= nbytes and r.size % r.granularity == 0,
           f"tensor {t.device} at {t.data_ptr():#x}, region {r.ptr:#x}")
        ref = (torch.arange(t.numel(), device=dev) % 251).to(torch.bfloat16)
        t.copy_(ref)
        ok(torch.equal(t, ref), "read back != written")
        ok(torch.equal(t.cpu()[:1000], ref.cpu()[:1000]), "host copy != written")
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            t.add_(1)
        torch.cuda.current_stream(dev).wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            t.add_(1)
        g.replay()
        torch.cuda.synchronize(dev)
        ok(torch.equal(t, ref + 2), "graph replay before release")
        for cycle in range(2):
            free0 = torch.cuda.mem_get_info(dev)[0]
            released = r.release()
            free1 = torch.cuda.mem_get_info(dev)[0]
            r.map()
            free2 = torch.cuda.mem_get_info(dev)[0]
            res[f"cycle{cycle}"] = dict(released=released, freed=free1 - free0, taken=free1 - free2)
            ok(released == r.size and free1 - free0 >= r.size // 2, f"release freed {free1 - free0} of {r.size}")
            ok(t.data_ptr() == r.ptr == int(r.dptr), "address changed")
            t.zero_()
            torch.cuda.synchronize(dev)
            ok(int(torch.count_nonzero(t)) == 0, "not zero after zero_()")
            g.replay()  # captured before the release: must work on the new memory at the same address
            torch.cuda.synchronize(dev)
            ok(bool((t == 1).all()), "graph replay after re-map")
        x = t[:2**20].view(1024, 1024)
        x.copy_(torch.eye(1024, dtype=torch.bfloat16, device=dev) * 3)
        ok(bool((x @ x == torch.eye(1024, dtype=torch.bfloat16, device=dev) * 9).all()), "matmul on the region")
        del g
        r.free()
        print("VMM SELFTEST OK " + json.dumps(res), flush=True)
        return 0
    except Exception as e:  # noqa: BLE001
        import traceback
        traceback.print_exc()
        print(f"VMM SELFTEST FAILED: {e!r} " + json.dumps(res), flush=True)
        return 1


class Handler(BaseHTTPRequestHandler):
    engine = None
    server_version = "thaw-example/0.1"

    def log_message(self, fmt, *args):
        log(f"{self.address_string()} {fmt % args}")

    def _send(self, code, obj):
        body = (json.dumps(obj) + "\n").encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _call(self, fn, *a):
        try:
            self._send(200, fn(*a))
        except Unavailable as e:
            self._send(503, {"status": str(e), "error": "engine not ready"})
        except (ValueError, TypeError) as e:
            self._send(400, {"error": str(e)})
        except Exception as e:  # noqa: BLE001 - keep serving; report what broke
            log(f"error: {e!r}")
            self._send(500, {"error": repr(e)})

    def do_GET(self):
        url = urllib.parse.urlsplit(self.path)
        e = self.engine
        if url.path == "/health":
            body = {"status": e.state, "pid": os.getpid(), **e.info}
            if e.state == "loading":
                body["phase"] = e.phase
            self._send(200 if e.state == "ready" else 503, body)
        elif url.path == "/is_sleeping":
            self._send(200, e.is_sleeping())
        elif url.path == "/generate":
            q = urllib.parse.parse_qs(url.query)
            try:
                n = int(q.get("max_tokens", ["16"])[0])
                batch = int(q["batch"][0]) if "batch" in q else None
            except ValueError:
                return self._send(400, {"error": "max_tokens and batch must be integers"})
            self._call(e.generate, q.get("prompt", ["hello"])[0], n, batch)
        else:
            self._send(404, {"error": "not found"})

    def do_POST(self):
        e, url = self.engine, urllib.parse.urlsplit(self.path)
        path, q = url.path, urllib.parse.parse_qs(url.query)
        try:
            n = int(self.headers.get("Content-Length") or 0)
            req = json.loads(self.rfile.read(n) or b"{}") if n else {}
            if not isinstance(req, dict):
                raise ValueError("body must be a JSON object")
        except ValueError as err:
            return self._send(400, {"error": f"bad request body: {err}"})
        if path == "/generate":
            self._call(e.generate, req.get("prompt", "hello"), req.get("max_tokens", 16), req.get("batch"))
        elif path == "/quiesce":
            self._call(e.quiesce)
        elif path == "/resume":
            self._call(e.resume)
        # vLLM's sleep-mode endpoints (its dev mode): never to face users.
        elif path == "/sleep":
            try:
                level = int(q.get("level", ["1"])[0])
            except ValueError:
                return self._send(400, {"error": "level must be 1 or 2"})
            self._call(e.sleep, level)
        elif path == "/wake_up":
            self._call(e.wake_up, q.get("tags"))
        elif path == "/collective_rpc":
            if req.get("method") != "reload_weights":
                return self._send(400, {"error": "only the reload_weights method is implemented"})
            self._call(e.reload_weights)
        else:
            self._send(404, {"error": "not found"})


def batch_sizes(text):
    """'1,2,4' or '1 2 4' -> [1, 2, 4] (sorted, unique, positive)."""
    try:
        sizes = sorted({int(x) for x in text.replace(",", " ").split()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of integers: {text!r}") from None
    if not sizes or sizes[0] < 1:
        raise argparse.ArgumentTypeError(f"batch sizes must be positive integers: {text!r}")
    return sizes


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--config", choices=sorted(CONFIGS), default="qwen3-0.6b")
    p.add_argument("--weights", "--model", dest="weights",
                   help="safetensors file (default /tmp/thaw-example-<config>.safetensors); --model as vLLM names it")
    p.add_argument("--enable-sleep-mode", action="store_true",
                   help="weights in one tagged block (CUDA VMM on cuda) that /sleep?level=2 releases and "
                        "/wake_up + /collective_rpc reload_weights bring back from the file (vLLM's API)")
    p.add_argument("--load-streams", type=int, default=8, help="parallel readers (and CUDA streams) of the loader")
    p.add_argument("--load-chunk-mib", type=int, default=8,
                   help="the loader's reads and copies, in MiB (each reader pins two such buffers)")
    p.add_argument("--loader", choices=["own", "fastsafetensors"], default="own",
                   help="the sleep-mode weights loader: own (parallel preads; multi-stream pinned on cuda) or "
                        "fastsafetensors (IBM's, if installed; --load-streams = its threads)")
    p.add_argument("--init-weights-only", action="store_true", help="create the weights file and exit")
    p.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda if available else cpu")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], help="default: from --config")
    p.add_argument("--kv-fraction", type=float, default=0.5, help="fraction of free GPU memory for the KV pool")
    p.add_argument("--kv-blocks", type=int, help="KV pool size in blocks (default: 64 on cpu, --kv-fraction on cuda)")
    p.add_argument("--kv-allocator", choices=["vmm", "torch"],
                   help="KV pool memory: vmm (CUDA driver VMM; /quiesce keeps the address and the graphs) "
                        "or torch (/quiesce drops pool and graphs). Default: vmm on cuda, torch on cpu")
    p.add_argument("--max-model-len", type=int, help="max prompt+output tokens (default: from --config)")
    p.add_argument("--graph-batch-sizes", type=batch_sizes, default=GRAPH_BATCH_SIZES, metavar="N,N,...",
                   help="decode batch sizes to capture as CUDA graphs (default: vLLM's 1,2,4,8,16,...,256); "
                        "a batch of n runs at the smallest of them >= n")
    p.add_argument("--no-cuda-graph", action="store_true", help="run the decode step eagerly on cuda")
    p.add_argument("--ready-file", help="write this file (atomically) when ready; removed on /quiesce")
    p.add_argument("--selftest-vmm", action="store_true",
                   help="check the CUDA VMM allocator on a 256 MiB region, print VMM SELFTEST OK/FAILED, exit 0/1")
    a = p.parse_args(argv)
    a.weights = a.weights or f"/tmp/thaw-example-{a.config}.safetensors"
    return a


def main(argv=None):
    sys.stdout.reconfigure(line_buffering=True)
    a = parse_args(argv)
    if a.selftest_vmm:
        return selftest_vmm(a)
    if a.init_weights_only:
        if not os.path.exists(a.weights):
            init_weights(CONFIGS[a.config], a.weights)
        log(f"weights at {a.weights}")
        return 0

    def on_term(signum, _frame):
        raise SystemExit(0)
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)

    engine = Engine(a)
    Handler.engine = engine
    ThreadingHTTPServer.request_queue_size = 128  # listen backlog (default 5)
    httpd = ThreadingHTTPServer((a.host, a.port), Handler)
    threading.Thread(target=httpd.serve_forever, name="http", daemon=True).start()
    log(f"listening on {a.host}:{httpd.server_address[1]} pid {os.getpid()}")
    try:
        try:
            engine.load()
        except Exception as e:
            engine.state = "failed"
            log(f"load failed: {e!r}")
            raise
        threading.Event().wait()  # serve until SIGTERM/SIGINT
    except SystemExit:
        log("shutting down")
        httpd.shutdown()
        httpd.server_close()
        engine.lock.acquire(timeout=30)  # let an in-flight request finish with the device
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
