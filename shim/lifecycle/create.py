"""What `create` does for a container that carries thaw.dev/snapshot, as an outcome:

  Restored    the snapshot was restored (shim/lifecycle/restore.py); the runtime exits 0
  ColdStart   restore not possible (reason named); config.json is as containerd wrote it plus
              thaw's hooks and io_uring denied (oci/spec.deny_io_uring), and the runtime hands
              the original create to the next runtime
  Refused     restore required (thaw.dev/required or policy.required) but not possible: the
              runtime exits 1, leaving nothing behind (config.json as containerd wrote it)

Nothing here execs or exits: shim/entry/runtime.py (the thaw-runtime entry point) does, from the outcome. `report()` writes the
outcome where operators and containerd look (runc's log file, the events log, metrics).
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass

from thaw.oci import ThawError, runc_log
from thaw.oci import annotations as ann
from thaw.oci.layout import LayoutError
from thaw.oci.runc_args import RuncCall
from thaw.oci.spec import Bundle, add_hook, deny_io_uring

from .. import faults
from ..drivers.runc import Runc
from ..node import events, metrics
from ..node.config import Config
from ..node.provenance import Untrusted
from ..node.state import Phase, Record
from ..node.store import CorruptSnapshot, SnapshotNotFound, Store
from . import recovery, restore
from .container import Container
from .recovery import RecoveryError, finish
from .restore import Incompatible


@dataclass
class Restored:
    record: Record


@dataclass
class ColdStart:
    reason: str
    code: str             # a short reason class for metrics: not_found, incompatible, ...


@dataclass
class Refused:
    reason: str
    code: str


@dataclass
class NotOurs:
    """The id belongs to a container that exists (runc's, or another create's): thaw touches
    nothing and hands the create to runc, whose answer ("already exists") is the result."""
    reason: str


@dataclass
class Unrecovered:
    """What a restore of this id that did not finish left could not be cleaned up: the runtime
    exits 1 (a create on top of it would fail or, worse, half-work)."""
    reason: str


Outcome = Restored | ColdStart | Refused | NotOurs | Unrecovered


def reason_code(exc: BaseException) -> str:
    """A short, stable class of why a restore was not possible (a metrics label)."""
    for kind, code in ((ann.AnnotationError, "bad_annotation"), (SnapshotNotFound, "not_found"),
                       (Untrusted, "untrusted"),
                       (CorruptSnapshot, "corrupt"), (LayoutError, "corrupt"),
                       (Incompatible, "incompatible")):
        if isinstance(exc, kind):
            return code
    name = type(exc).__name__
    return {"RuncError": "restore_failed", "CudaError": "gpu", "EngineError": "resume_failed",
            "WeightsError": "weights"}.get(name, "error")


def describe(exc: BaseException) -> str:
    """One line for an operator: thaw's own errors speak for themselves."""
    return str(exc) if isinstance(exc, ThawError) else f"{type(exc).__name__}: {exc}"


def create(c: Container) -> Outcome:
    """Restore the container `c` is, or prepare its cold start."""
    bundle, cfg = c.bundle, c.cfg
    try:
        in_use = _id_in_use(c)
    except RecoveryError as exc:
        return Unrecovered(str(exc))
    if in_use:
        return NotOurs(in_use)
    required = cfg.policy.required or ann.is_required(bundle.annotations)
    original_spec = json.dumps(bundle.spec)
    _add_thaw_hooks(bundle, cfg, ("poststop",))   # runc runs poststop after a failed restore too
    try:
        return Restored(_restore(c))
    except Exception as exc:  # noqa: BLE001 - any failure becomes a cold start
        reason, code = describe(exc), reason_code(exc)
    bundle.spec = json.loads(original_spec)
    if required:
        bundle.save()                            # leave the bundle as containerd wrote it
        return Refused(reason, code)
    capture = _record_cold_start(c, reason)
    # A cold-started thaw container is the one a snapshot is captured from: it runs without
    # io_uring, which CRIU cannot checkpoint (restore.check narrows a new spec alike to match).
    deny_io_uring(bundle.spec, os.uname().machine)
    bundle.save()
    _add_thaw_hooks(bundle, cfg, ("prestart", "poststop") if capture else ("poststop",))
    return ColdStart(reason, code)


def _id_in_use(c: Container) -> str | None:
    """Why this create's id is not free for thaw, if it is not. A record left by a thaw-runtime
    that died mid-restore is cleaned up first (then the id is free)."""
    cid, cfg = c.id, c.cfg
    record = c.state.read()
    runc_has_it = Runc.for_call(c.next_runtime, cfg.resolve_criu(), c.call).state(cid) is not None
    if record is not None:
        if recovery.stale(record):
            recovery.recover(cfg, cid, record, "found by the next create of its id")
            runc_has_it = False
        elif runc_has_it or record.phase == Phase.RESTORING:
            return f"container {cid} is already thaw's ({record.phase})"
        else:                  # its create died, or its container was deleted behind thaw's back
            recovery.dead_create_leftovers(record)
            finish(cfg, cid, "stale")
    if runc_has_it:
        return f"a container {cid} exists"
    return None


def _restore(c: Container) -> Record:

    store = Store.for_config(c.cfg)
    plan = restore.check(c, store)
    return restore.bring_up(plan, c, store)


def _add_thaw_hooks(bundle: Bundle, cfg: Config, stages: tuple[str, ...]) -> None:
    """Add thaw-hook for `stages` to config.json (idempotent; other hooks keep their order).

    prestart is added only where thaw needs it (a cold start with auto-capture):
    a prestart hook that fails fails the container, so a plain cold start must not depend on it.
    poststop failures are only logged by runc."""
    if not cfg.hook or not os.access(cfg.hook, os.X_OK):
        return                                   # doctor reports a hook that is not executable
    env = [f"THAW_CONFIG={cfg.source}"] if cfg.source else []
    env += [f"{k}={v}" for k, v in faults.env().items()]     # armed faults reach the hook and watcher
    for stage in stages:
        hook = {"path": cfg.hook, "args": ["thaw-hook", stage], "timeout": 60}
        if env:
            hook["env"] = env
        add_hook(bundle.spec, stage, hook)
    bundle.save()


def _record_cold_start(c: Container, reason: str) -> bool:
    """Remember a cold-started thaw container: for its `finished` event, and for auto-capture.
    Returns whether it asks for auto-capture. A record that cannot be written costs only that."""
    capture = snapshot = None
    call = c.call
    try:
        req = c.request
        snapshot = str(req.snapshot)
        if req.capture_on_ready:
            capture = {"snapshot": snapshot, "namespace": c.namespace,
                       "ready": req.ready, "root": call.root, "quiesce": req.quiesce, "resume": req.resume,
                       "push": req.push}
    except ann.AnnotationError:
        pass
    try:
        pid_file = call.flags.get("pid-file")
        c.state.cold(
            time.time(), call.root, reason, snapshot, capture,
            os.path.abspath(pid_file) if isinstance(pid_file, str) else None)
    except (OSError, ValueError):
        return False
    return capture is not None


def report(call: RuncCall, cfg: Config, outcome: Outcome) -> None:
    """Write the outcome to runc's log file (containerd reads it), the events log and metrics."""
    cid = call.container_id
    if isinstance(outcome, Restored):
        r = outcome.record
        total = (r.phases or {}).get("total", 0.0)
        level, kind, code = "info", "restored", None
        msg = f"thaw: restored {cid} from {r.snapshot} in {total:.3f}s (fill: {r.fill}) {r.phases}"
        fields = {"snapshot": r.snapshot, "phases": r.phases, "fill": r.fill}
    elif isinstance(outcome, ColdStart):
        level, kind, code = "warning", "cold_start", outcome.code
        msg = f"thaw: cold start (restore not possible: {outcome.reason})"
        fields = {"reason": outcome.reason, "code": code}
    elif isinstance(outcome, Unrecovered):
        level, kind, code = "error", "refused", "recovery_failed"
        msg = f"thaw: container not created: {outcome.reason}"
        fields = {"reason": outcome.reason, "code": code}
    elif isinstance(outcome, NotOurs):
        # runc reports the create's failure itself; thaw only tells its own log.
        events.emit(cfg, "not_ours", f"thaw: left to runc: {outcome.reason}", cid, "warning")
        return
    else:
        level, kind, code = "error", "refused", outcome.code
        msg = f"thaw: restore required but failed, container not created: {outcome.reason}"
        fields = {"reason": outcome.reason, "code": code}
    if cfg.logs(level):
        if call.log_path:
            runc_log.append(call.log_path, level, msg, call.log_format)
        elif level == "error":
            # No --log (Podman's conmon passes none): runc reports errors on stderr, so does thaw.
            # A cold start's reason stays off the container's stderr (it is in the events log).
            sys.stderr.write(runc_log.format_line(level, msg, "text"))
    events.emit(cfg, kind, msg, cid, level, **fields)
    phases = outcome.record.phases if isinstance(outcome, Restored) else None
    metrics.record_create(cfg, kind, code, phases)
