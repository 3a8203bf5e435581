"""Capture: checkpoint a running container into a published snapshot.

quiesce URL -> (GPU: lock + checkpoint every CUDA process) -> runc checkpoint [--leave-running]
-> (GPU: restore + unlock, the source keeps serving) -> resume URL -> rootfs diff -> layers,
config, manifest -> publish. Everything is written under a staging directory of the store; only
the final publish makes the snapshot visible, so a capture killed half-way leaves none.
"""

from __future__ import annotations

import os
from datetime import datetime
from typing import Callable

from thaw.oci import ThawError
from thaw.oci import snapshot as fmt
from thaw.oci.annotations import SnapshotRef
from thaw.oci.spec import Bundle

from . import fingerprint, rootfs
from .config import Config
from .phases import Phases
from .runc import Runc
from .store import Store


class CaptureError(ThawError):
    pass


def _created_epoch(state: dict) -> float | None:
    raw = state.get("created")
    if not raw:
        return None
    try:
        head, _, frac = raw.rstrip("Z").partition(".")
        frac = "".join(c for c in frac if c.isdigit())[:6]
        return datetime.fromisoformat(f"{head}.{frac or '0'}+00:00").timestamp()
    except ValueError:
        return None


def capture(cfg: Config, container_id: str, ref: SnapshotRef, root: str | None = None,
            leave_running: bool = True, quiesce: str | None = None, resume: str | None = None,
            gpu: bool | None = None, log: Callable[[str], None] = lambda msg: None) -> fmt.Snapshot:
    """Capture `container_id` (a runc container under `root`) as snapshot `ref`.

    gpu: None = checkpoint GPU state if the container has CUDA processes; False = never.
    """
    runc = Runc.with_root(cfg.resolve_next_runtime(), cfg.resolve_criu(), root)
    state = runc.state(container_id)
    if state is None:
        raise CaptureError(f"container {container_id} not found (runc root {root or 'default'})")
    if state.get("status") != "running":
        raise CaptureError(f"container {container_id} is {state.get('status')}, not running")
    bundle = Bundle.load(state["bundle"])
    pid = int(state["pid"])
    store = Store.for_config(cfg).init()
    phases = Phases()

    with store.staging("capture") as staging:
        images = os.path.join(staging, "images")
        work = os.path.join(staging, "work")
        os.mkdir(images, 0o700)
        os.mkdir(work, 0o700)

        from . import (
            engine,  # quiesce/resume calls into the container's network namespace
            netcheck,
        )
        listen = netcheck.listening_sockets(pid)
        gpu_session = None
        if gpu is not False:
            from . import cuda
            gpu_session = cuda.CaptureSession.for_tree(pid, bundle.spec) if cuda.available() else None
            if gpu_session is not None and not gpu_session.pids:
                gpu_session = None
        if quiesce:
            phases.run("quiesce", engine.call, quiesce, pid)
        try:
            if gpu_session:
                phases.run("cuda_checkpoint", gpu_session.checkpoint)
                log(f"GPU state of pids {gpu_session.pids} checkpointed")
            phases.run("runc_checkpoint", runc.checkpoint, container_id, images, work,
                       leave_running=leave_running)
        finally:
            # The source keeps serving whatever happened to the dump.
            if gpu_session and leave_running:
                phases.run("cuda_resume_source", gpu_session.resume_source)
            if resume and leave_running:
                phases.run("resume", engine.call, resume, pid)

        diff = phases.run("rootfs_diff", rootfs.compute_diff, bundle.rootfs, bundle.mount_destinations,
                          _created_epoch(state))
        rootfs_desc = phases.run("package_rootfs", store.add_stream_blob, staging,
                                 lambda w: rootfs.write_diff_tar(diff, w), fmt.ROOTFS_LAYER)
        layout = store.staged_layout(staging)
        deleted_desc = layout.put_bytes(fmt.deleted_blob(diff.deleted), fmt.DELETED_LAYER)
        criu_bytes = sum(os.path.getsize(os.path.join(images, n)) for n in os.listdir(images))
        criu_desc = phases.run("package_criu", store.add_criu_dir, staging, images)

        fp = fmt.Fingerprint(
            fingerprint.node(cfg.resolve_criu(), runc.version(),
                             gpu=gpu_session.fingerprint if gpu_session else None),
            fingerprint.container(bundle))
        phases.add("total", phases.elapsed())
        config = fmt.SnapshotConfig(
            ref=str(ref), fingerprint=fp,
            source=fmt.Source(container_id=container_id, image=fp.container.image,
                              namespace=fp.container.namespace,
                              container_name=fp.container.container_name, left_running=leave_running),
            sizes=fmt.Sizes(criu_bytes=criu_bytes, rootfs_bytes=rootfs_desc.size,
                            rootfs_entries=len(diff.entries), rootfs_deleted=len(diff.deleted),
                            gpu_bytes=gpu_session.gpu_bytes if gpu_session else 0),
            phases=phases.rounded(),
            gpu=gpu_session.describe() if gpu_session else fmt.GpuState(),
            network=fmt.Network(tuple(listen), bundle.namespace_path("network") is not None))
        snap = fmt.write_snapshot(layout, config, criu_desc, rootfs_desc, deleted_desc)
        store.publish(snap)
        if diff.skipped:
            log(f"rootfs entries not carried (sockets, devices, fifos): {diff.skipped[:10]}")
        return snap


def report(cfg: Config, trigger: str, container_id: str, ref: SnapshotRef,
           snap: fmt.Snapshot | None, error: BaseException | None = None) -> None:
    """A capture's outcome in the events log and metrics (`trigger`: cli or auto)."""
    from . import events, metrics
    if snap is not None:
        events.emit(cfg, "captured", f"captured {container_id} as {snap.ref} ({snap.manifest.digest}, "
                    f"{snap.config.phases.get('total', 0):.2f}s)", container_id, snapshot=snap.ref,
                    manifest=snap.manifest.digest, phases=snap.config.phases, trigger=trigger)
    else:
        events.emit(cfg, "capture_failed", f"capture of {container_id} as {ref} failed: {error}",
                    container_id, "error", snapshot=str(ref), trigger=trigger)
    metrics.record_capture(cfg, snap is not None, trigger)
