"""Capture: checkpoint a running container into a published snapshot.

weights manifest (files named, hashed) -> quiesce steps -> memory the engine released -> (GPU:
lock + checkpoint every CUDA process) -> runc checkpoint [--leave-running] -> (GPU: restore +
unlock, the source keeps serving) -> resume steps (also after a failure) -> rootfs diff -> layers,
config, manifest -> publish. Everything is written under a staging area of the store; only the
final publish makes the snapshot visible, so a capture killed half-way leaves none. The snapshot
belongs to the namespace of the container's pod (or `_local` outside Kubernetes).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from datetime import datetime
from typing import Any

from thaw.oci import ThawError
from thaw.oci import annotations as ann
from thaw.oci import snapshot as fmt
from thaw.oci.annotations import SnapshotRef
from thaw.oci.files import make_private_dir
from thaw.oci.spec import Bundle

from .. import faults
from ..drivers import criu, criu_images, cuda, engine, netcheck, rootfs
from ..drivers.cuda import process_tree
from ..drivers.runc import CRIU_CONFIG, Runc
from ..node import events, metrics
from ..node.config import Config
from ..node.store import Store
from ..timing import PhaseTimer
from . import confinement, fingerprint
from . import weights as wts


class CaptureError(ThawError):
    pass


def _created_epoch(state: dict[str, Any]) -> float | None:
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
    """Capture `container_id` (a runc container under `root`) as snapshot `ref` of its namespace.

    quiesce/resume: one-step URLs that replace the engine steps the container's annotations name
    (thaw.dev/engine, thaw.dev/engine-steps, thaw.dev/quiesce, thaw.dev/resume).
    gpu: None = checkpoint GPU state if the container has CUDA processes; False = never.
    """
    runc = Runc.with_root(cfg.resolve_next_runtime(), cfg.resolve_criu(), root)
    state = runc.state(container_id)
    if state is None:
        raise CaptureError(f"container {container_id} not found (runc root {root or 'default'})")
    if state.get("status") != "running":
        raise CaptureError(f"container {container_id} is {state.get('status')}, not running")
    bundle = Bundle.load(state["bundle"])
    _refuse_foreign_criu_config(cfg, container_id, state, bundle)
    namespace = ann.namespace_of(bundle.annotations)
    pid = int(state["pid"])
    args = (bundle.spec.get("process") or {}).get("args") or []
    try:
        steps = ann.parse_engine_steps(bundle.annotations, args)
        weight_paths = ann.weight_paths(bundle.annotations, steps)
    except ann.AnnotationError as exc:
        raise CaptureError(str(exc)) from exc
    if quiesce or resume:
        steps = ann.EngineSteps((ann.Step("POST", quiesce, timeout=120.0),) if quiesce else (),
                                (ann.Step("POST", resume, timeout=120.0),) if resume else ())
    store = Store.for_config(cfg).init()
    phases = PhaseTimer()

    with store.staging("capture") as staging:
        images = staging.new_dir("images")
        work = staging.new_dir("work")

        _refuse_io_uring(pid)
        _refuse_linked_deleted_outside_tmpfs(pid, bundle)
        dump_options = criu.dump_options(cfg.resolve_criu(), make_private_dir(cfg.state_dir))
        listen = netcheck.listening_sockets(pid)
        gpu_session = None
        if gpu is not False and cuda.available():
            gpu_session = cuda.CaptureSession.for_tree(pid, bundle.spec)
            if not gpu_session.pids:
                gpu_session = None
        weights = fmt.Weights()
        files: tuple[fmt.WeightFile, ...] = ()
        if weight_paths:
            digests = wts.DigestCache(cfg.state_dir)
            with engine.ContainerView(pid) as view:
                files = phases.run("weights_manifest", wts.manifest, view.root_fd, bundle, weight_paths,
                                   digests, make_private_dir(cfg.state_dir))
            digests.save()                 # the restores on this node need not hash them again
            held_before, measure = wts.held_memory(pid, gpu_session is not None)
        try:
            if steps.quiesce:
                phases.run("quiesce", engine.steps, steps.quiesce, pid, "quiesce")
            if files:
                held_after, _ = wts.held_memory(pid, gpu_session is not None)
                weights = wts.judge(files, held_before, held_after, measure)
                log(f"weights: {weights.bytes} bytes in {len(files)} files; the engine released "
                    f"{weights.released} bytes ({measure}): {'outside' if weights.outside else 'inside'} the snapshot")
            if gpu_session:
                phases.run("cuda_checkpoint", gpu_session.checkpoint)
                log(f"GPU state of pids {gpu_session.pids} checkpointed")
            # What the processes really hold (CRIU restores exactly this), read just before and
            # just after the dump: a privilege gained in between shows in the second reading.
            processes = _creds(pid)
            composition = _composition(pid)
            with runc.resumed_if_we_die(container_id):
                faults.point("checkpoint")
                phases.run("runc_checkpoint", runc.checkpoint, container_id, images, work,
                           leave_running=leave_running, criu_options=dump_options + faults.criu_options(work))
                faults.point("checkpointed")
            processes += _creds(pid) if leave_running else ()
            _record_seccomp(cfg, container_id, images, bundle, log)
        finally:
            # The source keeps serving whatever happened to the dump.
            if gpu_session and leave_running:
                phases.run("cuda_resume_source", gpu_session.resume_source)
            if steps.resume and leave_running:
                phases.run("resume", engine.steps, steps.resume, pid, "resume")

        diffs: list[rootfs.Diff] = []
        rootfs_desc = phases.run("package_rootfs", staging.put_stream, lambda w: diffs.append(
            rootfs.write_diff(bundle.rootfs, bundle.mount_destinations, w, _created_epoch(state))),
            fmt.ROOTFS_LAYER)
        summary = diffs[0]
        deleted_desc = staging.put_bytes(fmt.deleted_blob(summary.deleted), fmt.DELETED_LAYER)
        faults.point("package")
        whole, parts, hashes, criu_bytes = phases.run("package_criu", staging.package_images, images)

        cache = make_private_dir(cfg.state_dir)
        fp = fmt.Fingerprint(
            fingerprint.node(cfg.resolve_criu(), runc.version(), cache,
                             gpu=gpu_session.fingerprint if gpu_session else None),
            fingerprint.container(bundle, cache))
        phases.add("total", phases.elapsed())
        config = fmt.SnapshotConfig(
            ref=str(ref), fingerprint=fp, namespace=namespace,
            identity=fingerprint.identity(bundle.spec), processes=processes,
            source=fmt.Source(container_id=container_id, image=fp.container.image,
                              container_name=fp.container.container_name, left_running=leave_running),
            sizes=fmt.Sizes(criu_bytes=criu_bytes, rootfs_bytes=rootfs_desc.size,
                            rootfs_entries=summary.entries, rootfs_deleted=len(summary.deleted),
                            gpu_bytes=gpu_session.gpu_bytes if gpu_session else 0, composition=composition),
            phases=phases.rounded(),
            gpu=gpu_session.describe() if gpu_session else fmt.GpuState(),
            network=fmt.Network(tuple(listen), bundle.namespace_path("network") is not None),
            weights=weights)
        snap = staging.write_snapshot(config, whole, parts, rootfs_desc, deleted_desc)
        faults.point("publish")
        store.publish(snap, images, "captured", hashes)
        if summary.skipped:
            log(f"rootfs entries not carried (sockets, devices, fifos): {summary.skipped[:10]}")
        return snap


def _record_seccomp(cfg: Config, container_id: str, images: str, bundle: Bundle,
                    log: Callable[[str], None]) -> None:
    """Remember the filter this node's runtime installs for the container's seccomp profile: a
    restore proves its snapshot's filters start with it (shim/lifecycle/confinement/)."""
    try:
        confinement.record_from_capture(cfg.state_dir, images, bundle.spec, cfg.resolve_next_runtime(),
                                        f"capture of {container_id}")
    except (criu_images.ImageError, OSError) as exc:
        log(f"seccomp filter not recorded: {exc}")


def _refuse_foreign_criu_config(cfg: Config, container_id: str, state: dict[str, Any], bundle: Bundle) -> None:
    """runc hands CRIU the configuration file a container's spec names (org.criu.config) when it
    checkpoints it, and CRIU runs as root: a spec that names one could run its own action
    scripts on the host. Only the file thaw itself named for a restore (gone by now) is fine."""
    for named in ((state.get("annotations") or {}).get(CRIU_CONFIG), bundle.annotations.get(CRIU_CONFIG)):
        ours = os.path.join(cfg.state_dir, "containers", container_id + ".d", "criu.conf")
        if named and named != ours:
            raise CaptureError(f"container {container_id} names a CRIU configuration file ({CRIU_CONFIG}: "
                               f"{named!r}); a container must not choose CRIU's options, so thaw does not "
                               "capture it")


IO_URING = "anon_inode:[io_uring]"


def io_uring_holders(pid: int) -> list[tuple[int, str]]:
    """The processes of the tree under `pid` that hold an io_uring instance (a descriptor or a
    mapping of its rings): (pid, command name)."""
    found = []
    for p in process_tree(pid):
        held = False
        try:
            for fd in os.listdir(f"/proc/{p}/fd"):
                try:
                    if os.readlink(f"/proc/{p}/fd/{fd}") == IO_URING:
                        held = True
                        break
                except OSError:
                    continue
            if not held:
                with open(f"/proc/{p}/maps") as f:
                    held = any(line.rstrip().endswith(IO_URING) for line in f)
            if held:
                with open(f"/proc/{p}/comm") as f:
                    found.append((p, f.read().strip()))
        except OSError:
            continue                                  # gone meanwhile
    return found


def _refuse_io_uring(pid: int) -> None:
    """CRIU cannot dump an io_uring instance (it fails deep in the dump with "Can't open ...
    mapfile link"): say so up front, naming who holds one and what to do."""
    holders = io_uring_holders(pid)
    if holders:
        names = ", ".join(f"pid {p} ({comm})" for p, comm in holders[:8])
        raise CaptureError(
            f"{names} hold{'s' if len(holders) == 1 else ''} an io_uring instance, which CRIU cannot checkpoint. "
            "Containers that thaw-runtime creates with thaw.dev/snapshot run without io_uring (its calls "
            "fail with ENOSYS, as under Docker's and containerd's default seccomp profiles; libuv, and so "
            "uvloop, then uses epoll): create the container through thaw-runtime, or give it a seccomp "
            "profile that denies io_uring_setup")


_DELETED = " (deleted)"


def linked_deleted_outside_tmpfs(pid: int, bundle: Bundle) -> list[tuple[int, str, str]]:
    """Files the processes under `pid` hold open or mapped under a removed name while another
    name still links them, outside the container's tmpfs mounts: (pid, command name, path).
    CRIU dumps such a file as a link it makes beside it (link-remap) and removes again when the
    dump ends: in a tmpfs (/dev/shm) CRIU's own copy of the mount carries that link, but on the
    root file system thaw's rootfs diff, taken after the dump, cannot."""
    tmpfs = [os.path.normpath(m.get("destination", "")) for m in bundle.spec.get("mounts") or []
             if m.get("type") == "tmpfs"]

    def in_tmpfs(path: str) -> bool:
        return any(path == d or path.startswith(d.rstrip("/") + "/") for d in tmpfs)

    found = []
    for p in process_tree(pid):
        try:
            entries = [f"/proc/{p}/fd/{fd}" for fd in os.listdir(f"/proc/{p}/fd")]
            with open(f"/proc/{p}/maps") as f:
                entries += [f"/proc/{p}/map_files/{line.split()[0]}" for line in f if line.rstrip().endswith(_DELETED)]
            with open(f"/proc/{p}/comm") as f:
                comm = f.read().strip()
        except OSError:
            continue                                  # gone meanwhile
        seen = set()
        for entry in entries:
            try:
                target = os.readlink(entry)
                if not target.startswith("/") or not target.endswith(_DELETED):
                    continue
                path = target[:-len(_DELETED)]
                if path in seen or in_tmpfs(path) or os.stat(entry).st_nlink == 0:
                    continue                          # a tmpfs, or a ghost CRIU copies whole
            except OSError:
                continue
            seen.add(path)
            found.append((p, comm, path))
    return found


def _refuse_linked_deleted_outside_tmpfs(pid: int, bundle: Bundle) -> None:
    held = linked_deleted_outside_tmpfs(pid, bundle)
    if held:
        names = ", ".join(f"pid {p} ({comm}) {path}" for p, comm, path in held[:8])
        raise CaptureError(
            f"{names}: open under a removed name that another name still links, outside a tmpfs; CRIU "
            "would carry it through a link that thaw's rootfs diff cannot hold, so no restore could open "
            "it. Keep such files (POSIX semaphores, temporary files linked into place) in /dev/shm or "
            "another tmpfs mount, or close them before capture")


_SMAPS_HEAD = re.compile(r"^[0-9a-f]+-[0-9a-f]+ (\S{4}) \S+ \S+ \d+\s*(.*)$")


def _composition(pid: int) -> dict[str, int]:
    """What the container's processes hold in memory, by kind of mapping (from smaps), just
    before the dump: what the snapshot will carry (file mappings: their private dirty pages)."""
    out = {"heap": 0, "anonymous": 0, "stack": 0, "file_private": 0, "shared": 0}
    for p in process_tree(pid):
        try:
            with open(f"/proc/{p}/smaps") as f:
                lines = f.read().splitlines()
        except OSError:
            continue
        kind = None
        for line in lines:
            head = _SMAPS_HEAD.match(line)
            if head:
                perms, name = head.group(1), head.group(2).strip()
                kind = ("shared" if perms[3] == "s" else "heap" if name == "[heap]" else
                        "stack" if name.startswith("[stack") else
                        "file_private" if name.startswith("/") else "anonymous")
            elif kind and line.startswith("Private_Dirty:" if kind == "file_private" else "Rss:"):
                out[kind] += int(line.split()[1]) * 1024
    return out


def _creds(pid: int) -> tuple[fmt.ProcessCreds, ...]:
    return tuple(p for p in (fingerprint.process_creds(q) for q in process_tree(pid)) if p)


def report(cfg: Config, trigger: str, container_id: str, ref: SnapshotRef,
           snap: fmt.Snapshot | None, error: BaseException | None = None) -> None:
    """A capture's outcome in the events log and metrics (`trigger`: cli or auto)."""
    if snap is not None:
        events.emit(cfg, "captured", f"captured {container_id} as {snap.ref} in namespace {snap.namespace} "
                    f"({snap.manifest.digest}, {snap.config.phases.get('total', 0):.2f}s)", container_id,
                    snapshot=snap.ref, namespace=snap.namespace, manifest=snap.manifest.digest,
                    phases=snap.config.phases, trigger=trigger)
    else:
        events.emit(cfg, "capture_failed", f"capture of {container_id} as {ref} failed: {error}",
                    container_id, "error", snapshot=str(ref), trigger=trigger)
    metrics.record_capture(cfg, snap is not None, trigger)
