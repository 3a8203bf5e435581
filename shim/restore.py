"""The restore decision at `create`: restore the snapshot a container asks for, or fall back.

Every step that can fail raises; `create` turns any failure into a clean cold start (or, when
the restore is required, a clean failure): the half-restored container is deleted, the rootfs
diff is undone, thaw's state is removed, the reason goes to runc's log file where containerd
reads it, and the original `create` argv is handed to the next runtime.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import NoReturn

from thaw.oci import annotations as ann
from thaw.oci import runc_log
from thaw.oci.runc_args import RuncCall
from thaw.oci.spec import Bundle

from . import fingerprint
from .config import Config, make_private_dir
from .runc import Runc
from .runtime import passthrough
from .state import ContainerState


class RuntimeLog:
    """thaw's messages, in the runtime log containerd reads (never on stdout/stderr: those are
    the container's pipes), and in state_dir/events.log for operators."""

    def __init__(self, call: RuncCall, cfg: Config):
        self.path, self.format, self.cfg = call.log_path, call.log_format, cfg
        self.container_id = call.container_id

    def __call__(self, level: str, msg: str) -> None:
        if not self.cfg.logs(level):
            return
        runc_log.append(self.path, level, msg, self.format)
        try:
            make_private_dir(self.cfg.state_dir)
            runc_log.append(os.path.join(self.cfg.state_dir, "events.log"), level,
                            f"[{self.container_id}] {msg}", "json")
        except OSError:
            pass


def _phase(phases: dict[str, float], name: str, fn, *args, **kwargs):
    t = time.perf_counter()
    try:
        return fn(*args, **kwargs)
    finally:
        phases[name] = round(time.perf_counter() - t, 4)


def restore(call: RuncCall, bundle: Bundle, cfg: Config, next_runtime: str, log: RuntimeLog) -> dict:
    """Restore the container `call` creates from its snapshot; returns the state record."""
    from .store import Store
    from .rootfs import RootfsApplier

    t0 = time.perf_counter()
    phases: dict[str, float] = {}
    req = ann.parse_request(bundle.annotations)
    cid = call.container_id
    if not cid:
        raise ValueError("create without a container id")
    state = ContainerState(cfg.state_dir, cid)
    store = Store(cfg.store_dir)
    snap = _phase(phases, "resolve", store.resolve, req.snapshot)

    criu = cfg.resolve_criu()
    runc = Runc.for_call(next_runtime, criu, call)
    target_gpus = None
    gpu_fp: dict = {}
    if (snap.config.get("gpu") or {}).get("pids"):
        # The snapshot holds checkpointed CUDA processes: this node must be able to restore them.
        from . import cuda
        if not cuda.available():
            raise Incompatible(f"snapshot {snap.ref} holds GPU state, but this node has no NVIDIA "
                               "driver or cuda-python")
        target_gpus = cuda.container_gpus(bundle.spec)
        gpu_fp = cuda.gpu_fingerprint(target_gpus)
    here = {"node": fingerprint.node(criu, "", gpu_fp, make_private_dir(cfg.state_dir)),
            "container": fingerprint.container(bundle)}
    reasons = fingerprint.compare(snap.fingerprint, here, cfg.policy.allow_cross_namespace)
    phases["fingerprint"] = round(time.perf_counter() - t0 - phases["resolve"], 4)
    if reasons:
        raise Incompatible(f"snapshot {snap.ref} does not fit here: " + "; ".join(reasons))

    image_dir = _phase(phases, "verify_layer", store.cached_layer, snap, cfg.policy.verify)
    work = state.make_work_dir()
    created = time.time()
    # The prestart hook (run by runc restore) sees this and checks the target network namespace.
    state.write({"restoring": True, "snapshot": snap.ref, "created": created,
                 "netns": bundle.namespace_path("network"),
                 "listen": (snap.config.get("network") or {}).get("listen") or []})
    applier = RootfsApplier(bundle.rootfs, os.path.join(work, "undo"))
    restored = False
    try:
        deleted = store.deleted_paths(snap)
        with store.open_rootfs_layer(snap) as layer:
            def apply() -> int:
                applier.delete(deleted)
                return applier.apply_tar(layer)
            _phase(phases, "rootfs", apply)
        pid_file = call.flags.get("pid-file")
        pid_file = pid_file if isinstance(pid_file, str) else os.path.join(work, "pid")
        console = call.flags.get("console-socket")
        cuda_init = None
        if target_gpus is not None:
            # cuInit costs ~0.2 s: pay it while CRIU restores memory.
            import threading
            from . import cuda
            cuda_init = threading.Thread(target=cuda.init_quietly, daemon=True)
            cuda_init.start()
        restored = True   # from here on a runc container may exist
        _phase(phases, "runc_restore", runc.restore, cid, bundle.path, image_dir, work, pid_file,
               console if isinstance(console, str) else None, bool(call.flags.get("no-pivot")))
        if cuda_init is not None:
            _phase(phases, "cuda_init_wait", cuda_init.join)
        with open(pid_file) as f:
            pid = int(f.read().strip())
        if target_gpus is not None:
            from . import cuda
            pairs = cuda.gpu_pairs(snap.fingerprint["node"]["gpu"].get("uuids") or [],
                                   [g.uuid for g in target_gpus])
            gpu_pids = cuda.restore_tree(pid, pairs, phases)
            if not gpu_pids:
                raise RuntimeError("snapshot holds GPU state but no checkpointed CUDA process was found")
        if req.resume:
            from . import engine
            _phase(phases, "resume", engine.call, req.resume, pid)
        phases["total"] = round(time.perf_counter() - t0, 4)
        record = {"restored": True, "started": False, "snapshot": snap.ref, "created": created,
                  "manifest": snap.manifest.digest, "pid": pid, "bundle": bundle.path,
                  "root": call.root, "phases": phases}
        state.write(record)
        applier.commit()
        return record
    except BaseException as exc:
        hook_error = (state.read() or {}).get("hook_error")
        if restored:
            runc.delete_force(cid)
        applier.undo()
        state.remove()
        if hook_error:
            raise Incompatible(f"snapshot {snap.ref}: {hook_error}") from exc
        raise


class Incompatible(RuntimeError):
    """The snapshot cannot be restored into this container on this node."""


def _with_hooks(bundle: Bundle, cfg: Config, log: RuntimeLog, stages: tuple[str, ...]) -> None:
    """Add thaw-hook for `stages` to config.json (idempotent; other hooks keep their order).

    prestart is added only where thaw needs it (the restore path; a cold start with auto-capture):
    a prestart hook that fails fails the container, so a plain cold start must not depend on it.
    poststop failures are only logged by runc."""
    if not cfg.hook:
        return
    if not os.access(cfg.hook, os.X_OK):
        log("warning", f"thaw: hook {cfg.hook} not executable; container runs without thaw's hooks")
        return
    from thaw.oci.spec import add_hook
    env = [f"THAW_CONFIG={cfg.source}"] if cfg.source else []
    for stage in stages:
        hook = {"path": cfg.hook, "args": ["thaw-hook", stage], "timeout": 60}
        if env:
            hook["env"] = env
        add_hook(bundle.spec, stage, hook)
    bundle.save()


def _record_cold_start(call: RuncCall, bundle: Bundle, cfg: Config, reason: str) -> bool:
    """Remember a cold-started thaw container: for its timing record, and for auto-capture.
    Returns whether it asks for auto-capture."""
    record = {"restored": False, "created": time.time(), "root": call.root, "cold_reason": reason}
    try:
        req = ann.parse_request(bundle.annotations)
    except ann.AnnotationError:
        req = None
    if req is not None:
        record["snapshot"] = str(req.snapshot)
        if req.capture_on_ready:
            record["capture"] = {"snapshot": str(req.snapshot), "ready": req.ready, "root": call.root,
                                 "quiesce": req.quiesce, "resume": req.resume}
    ContainerState(cfg.state_dir, call.container_id).write(record)
    return "capture" in record


def create(call: RuncCall, bundle: Bundle, cfg: Config, next_runtime: str) -> NoReturn:
    """Handle `create` for a container that carries thaw.dev/snapshot."""
    log = RuntimeLog(call, cfg)
    required = cfg.policy.required or ann.is_required(bundle.annotations)
    original_spec = json.dumps(bundle.spec)
    _with_hooks(bundle, cfg, log, ("prestart", "poststop"))
    try:
        record = restore(call, bundle, cfg, next_runtime, log)
    except Exception as exc:  # noqa: BLE001 - any failure becomes a cold start
        reason = f"{type(exc).__name__}: {exc}" if not isinstance(exc, (ann.AnnotationError, Incompatible)) else str(exc)
        if required:
            log("error", f"thaw: restore required but failed, container not created: {reason}")
            bundle.spec = json.loads(original_spec)      # leave the bundle as containerd wrote it
            bundle.save()
            sys.exit(1)
        log("warning", f"thaw: cold start (restore not possible: {reason})")
        capture = False
        try:
            capture = _record_cold_start(call, bundle, cfg, reason)
        except (OSError, ValueError) as rec_exc:
            log("warning", f"thaw: cannot record cold start: {rec_exc}")
        bundle.spec = json.loads(original_spec)
        _with_hooks(bundle, cfg, log, ("prestart", "poststop") if capture else ("poststop",))
        passthrough(next_runtime, call.argv)
    log("info", f"thaw: restored {call.container_id} from {record['snapshot']} in "
                f"{record['phases']['total']:.3f}s {record['phases']}")
    sys.exit(0)
