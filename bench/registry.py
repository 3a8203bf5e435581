"""Push and pull throughput of the registry transport against a local registry (Debian's
docker-registry on 127.0.0.1, TLS with a test CA and plain HTTP), one stream vs several.

  python bench/registry.py [--gib 2] [--blob-mib 256] [--parallel 4] [--dir /var/tmp]

The data set is one file of --gib GiB of random bytes pushed as blobs that are --blob-mib MiB
byte ranges of it (as a snapshot's pages file would be). Each push goes to a new repository (the
registry has no link to the blobs there, so every byte is uploaded); each pull writes into a new
file. Everything runs on loopback on this machine, so the numbers are CPU-bound (TLS, SHA-256 in
the registry and here, HTTP parsing) and page-cache-bound, not network-bound: each phase also
records the CPU seconds of the client (this process) and of the registry, which share the cores.
Then the same through thaw: a stand-in snapshot whose pages file is --gib of random bytes,
`thaw push` from one store and `thaw pull` into another (shim/lifecycle/distribution.py: file parts read
and written in place, every blob verified, published when complete).
JSON goes to bench/results/registry-*.json.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import tempfile
import time

import psutil

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from registry_fixture.server import PASSWORD, USER, RegistryServer, TestCA, new_repo

from common import machine, save
from thaw.shim.registry.blobs import BlobRange
from thaw.shim.registry.client import RegistryClient
from thaw.shim.registry.transfer import pull_blobs, push_blobs
from thaw.shim.registry.transport import Settings

MiB = 1 << 20


def make_data(path: str, size: int, blob: int) -> list[BlobRange]:
    """Random bytes in `path`, hashed as consecutive ranges of `blob` bytes."""
    blobs = []
    with open(path, "wb") as f:
        off = 0
        while off < size:
            n = min(blob, size - off)
            h = hashlib.sha256()
            left = n
            while left:
                chunk = os.urandom(min(16 * MiB, left))
                f.write(chunk)
                h.update(chunk)
                left -= len(chunk)
            blobs.append(BlobRange("sha256:" + h.hexdigest(), path, off, n))
            off += n
    return blobs


def sha256_rate(path: str, size: int) -> float:
    h = hashlib.sha256()
    t = time.perf_counter()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MiB):
            h.update(chunk)
    return size / (time.perf_counter() - t)


class Clock:
    """Wall time, this process's CPU time (the client) and the registry's CPU time of a phase."""

    def __init__(self, registry_pid: int):
        self.registry = psutil.Process(registry_pid)

    def __enter__(self) -> Clock:
        self._wall, self._times = time.perf_counter(), os.times()
        self._reg = sum(self.registry.cpu_times()[:2])
        return self

    def __exit__(self, *exc) -> None:
        self.wall = time.perf_counter() - self._wall
        t = os.times()
        # user and kernel time apart: kernel time here is mostly page-cache work of pwrite/pread.
        self.client_user, self.client_sys = t.user - self._times.user, t.system - self._times.system
        self.registry_cpu = sum(self.registry.cpu_times()[:2]) - self._reg


def run(client: RegistryClient, registry_pid: int, blobs: list[BlobRange], parallel: int, workdir: str) -> dict:
    total = sum(b.size for b in blobs)
    repo = new_repo("bench/r")
    out = {"parallel": parallel}
    with Clock(registry_pid) as push:
        prog = push_blobs(client, repo, blobs, parallel=parallel)
    assert {b.outcome for b in prog.blobs.values()} == {"uploaded"}
    dst = os.path.join(workdir, "pulled")
    targets = [BlobRange(b.digest, dst, b.offset, b.size) for b in blobs]
    with Clock(registry_pid) as pull:
        prog = pull_blobs(client, repo, targets, parallel=parallel)
    assert {b.outcome for b in prog.blobs.values()} == {"downloaded"}
    os.unlink(dst)
    for name, c in (("push", push), ("pull", pull)):
        out.update({f"{name}_s": round(c.wall, 3), f"{name}_MBps": round(total / c.wall / 1e6, 1),
                    f"{name}_client_user_s": round(c.client_user, 2), f"{name}_client_sys_s": round(c.client_sys, 2),
                    f"{name}_registry_cpu_s": round(c.registry_cpu, 2)})
    return out


def snapshot_run(work: str, size: int, server: RegistryServer, settings: Settings) -> dict:
    """thaw push / thaw pull of a snapshot between two stores, through the library calls."""
    from helpers import fake_snapshot
    from thaw.oci.annotations import SnapshotRef
    from thaw.shim.lifecycle import distribution
    from thaw.shim.node import provenance
    from thaw.shim.node.config import Config, Registry, Trust
    from thaw.shim.node.store import Store
    reg = Registry(auth_file=settings.auth_config or "", ca_file=settings.ca_bundle or "",
                   insecure=tuple(settings.insecure_hosts))
    # Pushed signed, pulled verified: what a node requiring provenance does (the default).
    private, public, _ = provenance.generate(work, "bench")
    a = Config(store_dir=os.path.join(work, "store-a"), state_dir=os.path.join(work, "state"), registry=reg,
               trust=Trust(signing_key=private))
    b = Config(store_dir=os.path.join(work, "store-b"), state_dir=os.path.join(work, "state"), registry=reg,
               trust=Trust(keys={f"{server.host}/bench": (public,)}))
    store_a, store_b = Store.for_config(a).init(), Store.for_config(b).init()
    t = time.perf_counter()
    snap = fake_snapshot(store_a, "bench:1", payload=os.urandom(size), namespace="bench")
    capture_s = time.perf_counter() - t
    target = SnapshotRef.registry(f"{server.host}/{new_repo('bench/s')}:v1").remote
    with Clock(server.proc.pid) as push:
        distribution.push(a, store_a, SnapshotRef.parse("bench:1"), "bench", target, sign=True)
    with Clock(server.proc.pid) as pull:
        got = distribution.pull(b, store_b, target, owner="bench")
    assert got.manifest.digest == snap.manifest.digest
    out = {"snapshot_bytes": snap.size, "parts": len(snap.parts), "write_and_package_s": round(capture_s, 3)}
    for name, c in (("push", push), ("pull", pull)):
        out.update({f"thaw_{name}_s": round(c.wall, 3), f"thaw_{name}_MBps": round(snap.size / c.wall / 1e6, 1),
                    f"thaw_{name}_registry_cpu_s": round(c.registry_cpu, 2)})
    shutil.rmtree(a.store_dir, ignore_errors=True)
    shutil.rmtree(b.store_dir, ignore_errors=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gib", type=float, default=2.0)
    ap.add_argument("--blob-mib", type=int, default=256)
    ap.add_argument("--parallel", type=int, default=4)
    ap.add_argument("--dir", default="/var/tmp")
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="thaw-bench-registry-", dir=args.dir)
    size = int(args.gib * (1 << 30))
    results = {"machine": machine(), "loadavg_at_start": os.getloadavg(), "bytes": size, "blob_bytes": args.blob_mib * MiB, "runs": []}
    try:
        src = os.path.join(work, "pages.img")
        blobs = make_data(src, size, args.blob_mib * MiB)
        results["blobs"] = len(blobs)
        results["sha256_single_stream_MBps"] = round(sha256_rate(src, size) / 1e6, 1)
        ca = TestCA(os.path.join(work, "ca"))
        for tls in (True, False):
            server = RegistryServer(os.path.join(work, f"registry-{'tls' if tls else 'plain'}"),
                                    tls=ca if tls else None, users={USER: PASSWORD})
            creds = server.auth_config(os.path.join(work, "config.json"), USER, PASSWORD)
            settings = Settings(auth_config=creds, ca_bundle=ca.ca, insecure_hosts=() if tls else (server.host,))
            with server, RegistryClient(server.host, settings) as client:
                for parallel in (1, args.parallel):
                    r = {"tls": tls, **run(client, server.proc.pid, blobs, parallel, work)}
                    results["runs"].append(r)
                    print(f"{'tls  ' if tls else 'plain'} parallel {parallel}: "
                          + "  ".join(f"{n} {r[n + '_MBps']:6.1f} MB/s ({r[n + '_s']:.1f} s; CPU s: client user "
                                      f"{r[n + '_client_user_s']:.1f} sys {r[n + '_client_sys_s']:.1f}, "
                                      f"registry {r[n + '_registry_cpu_s']:.1f})" for n in ("push", "pull")), flush=True)
                if tls:
                    s = snapshot_run(work, size, server, settings)
                    results["snapshot"] = s
                    print(f"thaw push {s['thaw_push_MBps']:.1f} MB/s ({s['thaw_push_s']:.1f} s), thaw pull "
                          f"{s['thaw_pull_MBps']:.1f} MB/s ({s['thaw_pull_s']:.1f} s) of a {s['snapshot_bytes'] / 2**30:.2f} "
                          f"GiB snapshot ({s['parts']} file parts)", flush=True)
            shutil.rmtree(server.storage, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"sha256 single stream here: {results['sha256_single_stream_MBps']} MB/s")
    print("saved", save("registry", results))


if __name__ == "__main__":
    sys.exit(main())
