"""Restoring a container from its snapshot, in two steps:

  check()    may this snapshot be restored into this container on this node? It reads the store,
             the spec and the node's facts, runs nothing, needs no root; any "no" is Incompatible
             (or the store's not-found/corrupt error) naming why.
  bring_up() rootfs diff, `runc restore`, CUDA restore + unlock, the resume call. On any failure
             it leaves nothing behind (the half-restored container deleted, the rootfs diff
             undone, the state record removed) and raises.

Neither decides what happens next: shim/lifecycle/create.py turns the outcome into a restore, a cold start
or a refusal.
"""

from __future__ import annotations

import contextlib
import copy
import os
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from thaw.oci import ThawError
from thaw.oci import annotations as ann
from thaw.oci import snapshot as fmt
from thaw.oci.files import atomic_write, make_private_dir
from thaw.oci.spec import Bundle, deny_io_uring

from .. import faults
from ..drivers import criu, criu_images, netcheck
from ..drivers.rootfs import RootfsApplier, undo_dir_for
from ..drivers.runc import Runc, cgroup_dirs
from ..node import cgroups, provenance
from ..node.config import Config
from ..node.state import Record
from ..node.store import Store
from ..timing import PhaseTimer, Stopwatch
from . import confinement, fingerprint, recovery
from .container import Container

if TYPE_CHECKING:
    from ..drivers.cuda import Gpu
    from .weights import Prefetch

# Measured lazy imports (PLC0415): the CUDA driver (psutil), the engine's endpoints (urllib,
# http.client, email), the weights prefetch and the image encoder cost a create ~30 ms to import;
# only a restore that has GPU state, resume steps, weights or a joined UTS namespace loads them.


class Incompatible(ThawError):
    """The snapshot cannot be restored into this container on this node."""


LEAVE_STOPPED = "leave-stopped"      # CRIU's option: restored tasks stay stopped until thaw resumes them


@dataclass
class Plan:
    """A restore that check() allowed."""
    request: ann.ThawRequest
    snapshot: fmt.Snapshot
    gpus: list[Gpu] | None         # the container's GPUs (cuda.Gpu) when the snapshot holds CUDA state
    phases: PhaseTimer
    cuda_init: threading.Thread | None = None   # importing cuda-python and cuInit, meanwhile
    weights: Prefetch | None = None   # the weight files, being verified and read meanwhile


# All resume steps of one restore together: the create must answer inside kubelet's runtime
# request timeout (2 minutes by default) with time left for the rest of the restore.
RESUME_BUDGET = 100.0


def check(c: Container, store: Store, node: fmt.NodeFingerprint | None = None) -> Plan:
    """Decide whether what `c` asks can be restored into it here. `node`: this node's facts
    (default: measured now)."""
    phases = PhaseTimer()
    request, bundle, cfg, namespace = c.request, c.bundle, c.cfg, c.namespace
    snap = phases.run("resolve", store.resolve, request.snapshot, namespace,
                      cfg.policy.readable_from(namespace))
    # Provenance first: CRIU images are root-level instructions, only trusted ones are even read.
    provenance.check_restorable(cfg, store.provenance(snap), f"snapshot {snap.ref} ({snap.namespace})")
    clock = Stopwatch()
    gpus = None
    cuda_init = None
    gpu_fp = fmt.GpuFingerprint()
    if snap.config.gpu.pids:
        # The snapshot holds checkpointed CUDA processes: this node must be able to restore them.
        from ..drivers import cuda  # noqa: PLC0415 - measured lazy import (above)
        if not cuda.available():
            raise Incompatible(f"snapshot {snap.ref} holds GPU state, but this node has no NVIDIA "
                               "driver or cuda-python")
        gpus = cuda.container_gpus(bundle.spec)
        gpu_fp = cuda.gpu_fingerprint(gpus)
        cuda_init = _start_cuda_init(bool(request.steps.resume))   # ~0.5 s, while the rest goes on
    cache = make_private_dir(cfg.state_dir)
    if node is None:
        node = fingerprint.node(cfg.resolve_criu(), "", cache)
    here = fmt.Fingerprint(fingerprint.with_gpu(node, gpu_fp), fingerprint.container(bundle, cache, c.mounts))
    reasons = fingerprint.compare(snap.fingerprint, here)
    _narrow_like_capture(snap, bundle)
    # Who the processes will be: the new spec must ask for what the capturing one did, and no
    # captured process may hold more than it grants.
    reasons += fingerprint.compare_identity(snap.config.identity, fingerprint.identity(bundle.spec),
                                            cfg.policy.env_may_differ)
    reasons += fingerprint.excess_privileges(snap.config.processes, bundle.spec)
    reasons += _network_problems(snap, bundle)
    phases.add("fingerprint", clock.seconds())
    if reasons:
        raise Incompatible(f"snapshot {snap.ref} does not fit here: " + "; ".join(reasons))
    prefetch = None
    if snap.config.weights.outside and not request.steps.resume:
        raise Incompatible(f"snapshot {snap.ref} holds no weights (its engine released them before the "
                           "capture), and this container names no resume steps to reload them")
    if snap.config.weights.files and request.steps.resume:
        # The resume steps may reload them (even where the capture could not see the memory
        # fall): opened and checked now (a missing or changed file is a cold start before
        # anything changes); read and verified in the background while the restore goes on.
        from . import weights  # noqa: PLC0415 - measured lazy import (above)
        prefetch = phases.run("weights_open", weights.Prefetch, bundle, snap.config.weights,
                              weights.DigestCache(cfg.state_dir))
    return Plan(request, snap, gpus, phases, cuda_init, prefetch)


def _narrow_like_capture(snap: fmt.Snapshot, bundle: Bundle) -> None:
    """A thaw container that cold-starts runs with io_uring denied (create.py): a snapshot of one
    records that narrowed seccomp profile. The new container's spec, narrowed alike, is then the
    one compared and restored under (only ever narrower than it asked for; a snapshot of a
    container thaw-runtime did not create is compared with the spec as it is)."""
    captured = (snap.config.identity or {}).get("seccomp")
    if captured == fingerprint.identity(bundle.spec)["seccomp"]:
        return
    narrowed = copy.deepcopy(bundle.spec)
    if deny_io_uring(narrowed, os.uname().machine) and fingerprint.identity(narrowed)["seccomp"] == captured:
        bundle.spec = narrowed


def _network_problems(snap: fmt.Snapshot, bundle: Bundle) -> list[str]:
    """CRIU re-binds the snapshot's listening sockets: in a network namespace joined by path (a
    pod's, set up by CNI before any container's create) their addresses must exist. Checked here,
    before anything changes, rather than from a prestart hook inside runc restore (a process
    start per restore for the same answer)."""
    netns = bundle.namespace_path("network")
    if not netns or not snap.config.network.listen:
        return []
    return netcheck.problems(netns, [s.addr for s in snap.config.network.listen])


def bring_up(plan: Plan, c: Container, store: Store) -> Record:
    """Restore the container `c` is as `plan` says; returns its RESTORED record."""
    cfg = c.cfg
    runc = Runc.for_call(c.next_runtime, cfg.resolve_criu(), c.call)
    clock = Stopwatch()
    try:
        with store.image_dir(plan.snapshot, cfg.policy.verify) as image_dir:
            plan.phases.add("verify_layer", clock.seconds())
            proof = plan.phases.run("image_check", _check_images, store, plan.snapshot, c)
            record = _bring_up(plan, c, store, runc, image_dir, proof)
    finally:
        if plan.weights is not None:
            plan.weights.abort()
    store.touch(plan.snapshot)
    return record


def _check_images(store: Store, snap: fmt.Snapshot, c: Container) -> Proof:
    """What the images would restore (the facts the store decoded from them when they were
    sealed), within the new spec (else Incompatible naming the excess): the snapshot's config
    said so too, but only the images are what CRIU reads. The caller holds the image directory."""
    bundle, cfg, next_runtime = c.bundle, c.cfg, c.next_runtime
    seccomp = (bundle.spec.get("linux") or {}).get("seccomp")
    reference = None
    if seccomp:
        reference = confinement.reference(cfg.state_dir, confinement.profile_key(seccomp, next_runtime))
        if reference is None:         # once per profile on a node: learnt from a container that runs nothing
            reference = confinement.probe_reference(cfg.state_dir, seccomp, next_runtime)
    # A fresh IPC namespace's sysctls matter only where the spec makes one (a pod's joins by path).
    fresh = None if bundle.namespace_path("ipc") is not None else confinement.fresh_ipc_sysctls(cfg.state_dir)
    grant = confinement.Grant.of(bundle.spec, reference, fresh)
    try:
        images = store.image_facts(snap)
        return Proof(grant, images, confinement.check_images(images, bundle.spec, grant))
    except (confinement.ConfinementError, criu_images.ImageError) as exc:
        raise Incompatible(str(exc)) from exc


@dataclass
class Proof:
    """The grant of the new spec and the images' tasks, proven within it: what the kernel check
    compares the restored tasks with."""
    grant: confinement.Grant
    images: criu_images.Images
    # The names to hand CRIU for a UTS namespace the spec joins by path (its own), or None.
    uts_names: tuple[str, str] | None = None


def _check_kernel(pid: int, proof: Proof) -> None:
    """Before the restored tasks run (CRIU left them stopped): what the kernel says they hold."""
    try:
        restored = confinement.check_kernel(pid, proof.images, proof.grant)
    except confinement.ConfinementError as exc:
        raise Incompatible(str(exc)) from exc
    confinement.resume(restored, proof.images)


def _bring_up(plan: Plan, c: Container, store: Store, runc: Runc, image_dir: str, proof: Proof) -> Record:
    call, bundle, cfg, state, cid = c.call, c.bundle, c.cfg, c.state, c.id
    snap, phases = plan.snapshot, plan.phases
    work = state.make_work_dir()
    undo = undo_dir_for(bundle.rootfs, cid, c.mounts)
    pid_file = call.flags.get("pid-file")
    pid_file = os.path.abspath(pid_file) if isinstance(pid_file, str) else None
    systemd = bool(call.global_flags.get("systemd-cgroup"))
    # Whoever finds this record after this process died cleans up from it (shim/lifecycle/recovery.py).
    record = state.begin_restore(snap.ref, time.time(), bundle.path, call.root, systemd, undo,
                                 rootfs=os.path.realpath(bundle.rootfs), pid_file=pid_file)
    applier = RootfsApplier(bundle.rootfs, undo, c.mounts)
    runc_started = False
    try:
        faults.point("restore_recorded")
        deleted = store.deleted_paths(snap)
        with store.open_rootfs_layer(snap) as layer:
            def apply() -> int:
                applier.delete(deleted)
                faults.point("rootfs_deleted")          # half applied
                return applier.apply_tar(layer)
            phases.run("rootfs", apply)
        faults.point("rootfs_applied")
        unproven = confinement.unproven_masks(proof.images, bundle.spec)
        if unproven:
            excess = phases.run("mask_check", confinement.rootfs_mask_excess, unproven, bundle.spec, bundle.rootfs)
            if excess:
                raise Incompatible(excess)
        console = call.flags.get("console-socket")
        fill = _fill_options(cfg)
        # runc, CRIU and all CRIU forks run in a cgroup of their own, named in the record before
        # it exists: a restore killed at any moment is found whole by what the record says.
        scratch = cgroups.scratch_path(f"thaw-restore-{os.getpid()}", c.mounts)
        record.cgroups = [scratch, *cgroup_dirs(bundle.spec, systemd, c.mounts)]
        state.write(record)
        runc_started = True
        cgroups.make(scratch)
        faults.point("runc_restore")
        # runc writes its own pid file in the work dir: a runc killed while writing it leaves its
        # O_EXCL temporary file there, never beside the caller's (shim/drivers/runc.py pid_file_temp).
        own_pid_file = os.path.join(work, "pid")
        with contextlib.ExitStack() as for_criu:
            images = image_dir
            if proof.uts_names is not None:      # CRIU's write into the joined namespace changes nothing
                area = for_criu.enter_context(store.staging("restore"))
                from ..drivers import criu_decode  # noqa: PLC0415 - measured lazy import (above)
                images = criu_decode.with_uts(image_dir, os.path.join(area.path, "images"), *proof.uts_names)
            # CRIU leaves the restored tasks stopped: none runs user code before the kernel check.
            phases.run("runc_restore", runc.restore, cid, bundle, images, work, own_pid_file,
                       console if isinstance(console, str) else None, bool(call.flags.get("no-pivot")),
                       (*fill, LEAVE_STOPPED, *faults.criu_options(work)), cgroup=scratch)
        cgroups.remove([scratch])            # runc is gone; what it restored is in the container's
        faults.point("runc_restored")
        with open(own_pid_file) as f:
            pid = int(f.read().strip())
        if plan.weights is not None:       # CRIU had the disk to itself: now the weights
            phases.run("weights_reads", plan.weights.start_reads)
        # Credentials before anything else: the CUDA restore needs the tasks running (the driver's
        # thread in the process does the work) and changes no credentials; their CUDA calls stay
        # blocked until the unlock anyway.
        phases.run("kernel_check", _check_kernel, pid, proof)
        if plan.cuda_init is not None:
            phases.run("cuda_init_wait", plan.cuda_init.join)
        if bundle.creates_namespace("network"):
            # CRIU restored the sockets into a namespace runc made empty (runc checkpoints no
            # network state): without lo, a server on 127.0.0.1 and the resume URL are unreachable.
            phases.run("loopback", _loopback_up, pid)
        if plan.gpus is not None:
            _restore_gpus(plan, pid)
        if plan.weights is not None:
            phases.run("weights_wait", plan.weights.verified)
        if plan.request.steps.resume:
            from ..drivers import engine  # noqa: PLC0415 - measured lazy import (above)
            phases.run("resume", engine.steps, plan.request.steps.resume, pid, "resume", RESUME_BUDGET)
        faults.point("resumed")
        if pid_file:
            atomic_write(pid_file, str(pid).encode(), mode=0o644, durable=False)
        phases.add("total", phases.elapsed())
        # The rootfs diff stays undoable until the shim's `start` (state.started): until then a
        # delete undoes this whole restore, the way it would a create that never finished.
        applier.close()
        record = state.restored(record, pid=pid, manifest=snap.manifest.digest, bundle=bundle.path,
                                root=call.root, phases=phases.rounded(), fill=" ".join(fill) or "stock")
        faults.point("restored")
        return record
    except BaseException:
        left: list[str] = []
        if runc_started:
            _done, left = recovery.take_down(cfg, cid, record)
        applier.undo()
        if left:        # the record stays (its owner, this process, is about to be gone): the next
            raise recovery.RecoveryError("restore failed and could not be cleaned up: " + "; ".join(left)) from None
        state.remove()
        raise


def _fill_options(cfg: Config) -> tuple[str, ...]:
    """How CRIU fills memory for this restore: the node config, what the node's CRIU can do, and
    (for hugepages: auto) the node's measured probe."""
    return criu.restore_options(cfg.restore.worker_count(), cfg.restore.hugepages,
                                criu.features(cfg.resolve_criu(), cfg.state_dir), criu.read_thp_probe(cfg.state_dir))


def _loopback_up(pid: int) -> None:
    from ..drivers import engine  # noqa: PLC0415 - measured lazy import (above)
    with engine.ContainerView(pid) as view:
        view.loopback_up()


def _start_cuda_init(resume: bool) -> threading.Thread:
    """Importing cuda-python and cuInit cost ~0.5 s: pay them while the fingerprint is checked,
    the rootfs diff applied and CRIU restores memory; the engine's HTTP client too (~30 ms on
    the H100), which the resume steps need only after the CUDA restore."""
    from ..drivers import cuda  # noqa: PLC0415 - measured lazy import (above)

    def init() -> None:
        cuda.init_quietly()
        if resume:
            from ..drivers import engine  # noqa: F401, PLC0415 - imported ahead of its use (above)

    thread = threading.Thread(target=init, daemon=True)
    thread.start()
    return thread


def _restore_gpus(plan: Plan, pid: int) -> None:
    from ..drivers import cuda  # noqa: PLC0415 - measured lazy import (above)
    pairs = cuda.gpu_pairs(list(plan.snapshot.fingerprint.node.gpu.uuids),
                           [g.uuid for g in plan.gpus or []])
    if not cuda.restore_tree(pid, pairs, plan.phases):
        raise cuda.CudaError(pid, "restore", "the snapshot holds GPU state but no checkpointed "
                                             "CUDA process was found")
