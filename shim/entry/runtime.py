"""thaw-runtime: a runc-compatible runtime (containerd's runc v2 shim calls it as BinaryName).

Hot path: every call that is not `create`/`start`/`delete` of a container thaw handles becomes
an `execv` of the next runtime with the same argv, after importing as little as possible (the
modules imported at the top here are all that passthrough loads; bench/passthrough.py measures
it). Only a `create` whose config.json carries `thaw.dev/snapshot` loads the restore machinery.
"""

from __future__ import annotations

import os
import sys

from thaw.oci import runc_args

from ..node import config
from ..node.config_schema import ConfigError

TYPE_CHECKING = False   # not typing's: the passthrough path imports nothing it does not use
if TYPE_CHECKING:
    from typing import NoReturn

    from thaw.oci.annotations import ThawRequest

    from ..lifecycle.container import Container


def passthrough(binary: str, argv: list[str]) -> NoReturn:
    """Replace this process by the next runtime with the same argv: same pid, same fds."""
    os.execv(binary, [binary, *argv[1:]])


def _mentions_thaw(bundle_dir: str) -> bool:
    """Pre-filter: a config.json without the annotation key's bytes cannot ask for a snapshot,
    so most containers pass through without paying for a JSON parser (json imports re)."""
    try:
        with open(os.path.join(bundle_dir, "config.json"), "rb") as f:
            return b"thaw.dev/snapshot" in f.read()
    except OSError:
        return False


def _config() -> config.Config:
    try:
        return config.load()
    except ConfigError as exc:
        # A broken config must not break containers: run with defaults and say why.
        from ..node import events
        cfg = config.Config()
        events.emit(cfg, "config_error", f"thaw: {exc}; using defaults", level="error")
        return cfg


def _create(call: runc_args.RuncCall, cfg: config.Config, next_runtime: str) -> None:
    """A thaw container's create: exit 0 restored, exit 1 refused; return to cold-start it."""
    bundle_dir = call.flags.get("bundle")
    bundle_dir = bundle_dir if isinstance(bundle_dir, str) else os.getcwd()
    if not _mentions_thaw(bundle_dir):
        return
    from thaw.oci import annotations as ann
    from thaw.oci.spec import Bundle, SpecError
    try:
        bundle = Bundle.load(bundle_dir)
    except SpecError:
        return                                      # the next runtime reports it
    if not ann.wants_thaw(bundle.annotations):
        if ann.is_sandbox(bundle.annotations) and ann.SNAPSHOT in bundle.annotations:
            _prepare_in_background(cfg, bundle.annotations, call.container_id)
        return
    from ..lifecycle import create
    from ..lifecycle.container import Container
    try:
        c = Container.of(call, bundle, cfg, next_runtime)
    except ValueError:
        return                                      # an id runc refuses: the next runtime says so
    try:
        request: ann.ThawRequest | None = c.request
    except ann.AnnotationError:
        request = None                              # create reports it
    remote = request is not None and request.snapshot.remote is not None
    if request is not None and remote and request.pull_wait:
        _wait_for_pull(c, request)
    outcome = create.create(c)
    create.report(call, cfg, outcome)
    if remote and isinstance(outcome, create.ColdStart) and outcome.code == "not_found":
        _prepare_in_background(cfg, bundle.annotations, call.container_id)   # pull it: the next pod restores
    if isinstance(outcome, create.Restored):
        sys.exit(0)
    if isinstance(outcome, (create.Refused, create.Unrecovered)):
        sys.exit(1)


def _wait_for_pull(c: Container, request: ThawRequest) -> None:
    """thaw.dev/pull: wait — a registry snapshot the node lacks is pulled (or its pull, started by
    the pod's sandbox, awaited) for at most registry.pull_timeout; then the create goes on either
    way (restore, or cold start)."""
    from thaw.oci import annotations as ann

    from ..lifecycle import distribution
    try:
        namespace = c.namespace
    except ann.AnnotationError:
        return                                          # create reports it
    ref = request.snapshot
    if not distribution.present(c.cfg, ref, namespace):
        _prepare_in_background(c.cfg, c.bundle.annotations, c.id)   # a no-op if the sandbox's is under way
        distribution.wait_present(c.cfg, ref, namespace, c.cfg.registry.pull_timeout)


def _prepare_in_background(cfg: config.Config, annotations: dict[str, str], container_id: str | None = None) -> None:
    """A pod asking for a snapshot has its sandbox created first: start getting the snapshot ready
    (shim/lifecycle/prefetch.py) beside it, without waiting and without ever failing the sandbox. Spawned
    directly (posix_spawn: no subprocess import on this path), in a session of its own, with
    /dev/null for stdio: the sandbox's pipes must not be held by it."""
    if not cfg.hook:
        return
    from thaw.oci import annotations as ann
    env = {"PATH": os.environ.get("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")}
    if cfg.source:
        env["THAW_CONFIG"] = cfg.source
    from .. import faults
    env.update(faults.env())
    namespace = annotations.get(ann.CRI_SANDBOX_NAMESPACE) or ann.LOCAL_NAMESPACE
    if container_id and ("/" in container_id or container_id.startswith(".")):
        container_id = None
    try:
        pid = os.posix_spawn(cfg.hook, [cfg.hook, "prepare", namespace, annotations[ann.SNAPSHOT],
                                        *([container_id] if container_id else [])], env,
                             file_actions=[(os.POSIX_SPAWN_OPEN, fd, "/dev/null", os.O_RDWR, 0) for fd in (0, 1, 2)],
                             setsid=True)
    except OSError:
        return                                # only a later restore is slower for it
    if container_id:
        from ..lifecycle import prefetch
        try:
            prefetch.register_prepare(cfg, container_id, pid)   # its delete stops it
        except OSError:
            pass


def _cancel_prepare(cfg: config.Config, container_id: str) -> None:
    """A container's delete stops the prepare (pull, page-cache read) started for it: one stat
    on every delete, more only when there is one (shim/lifecycle/prefetch.py, cancel_prepare)."""
    if "/" in container_id or container_id.startswith("."):
        return
    if os.path.exists(os.path.join(cfg.state_dir, "prepare", container_id + ".json")):
        from ..lifecycle import prefetch
        prefetch.cancel_prepare(cfg, container_id)


def _start_or_delete(call: runc_args.RuncCall, cfg: config.Config) -> None:
    """`start` of a restored container is a no-op (exit 0); `delete` clears thaw's state first."""
    from ..node.state_path import record_path
    container_id = call.container_id or ""
    try:
        known = os.path.exists(record_path(cfg.state_dir, container_id))
    except ValueError:
        known = False
    if not known:
        return
    if call.command == "delete":
        from ..lifecycle import recovery
        try:
            recovery.before_delete(cfg, container_id, bool(call.flags.get("force")))
        except recovery.RecoveryError as exc:
            _fail(call, str(exc))
    else:
        from ..node.state import ContainerState
        if ContainerState(cfg.state_dir, container_id).started():
            sys.exit(0)


def _fail(call: runc_args.RuncCall, msg: str) -> None:
    """Exit 1 with `msg` where runc reports its errors (the --log file, else stderr)."""
    from thaw.oci import runc_log
    if call.log_path:
        runc_log.append(call.log_path, "error", f"thaw: {msg}", call.log_format)
    sys.stderr.write(f"thaw-runtime: {msg}\n")
    sys.exit(1)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv if argv is None else argv)
    cfg = _config()
    try:
        next_runtime = cfg.resolve_next_runtime()
    except ConfigError as exc:
        sys.stderr.write(f"thaw-runtime: {exc}\n")
        sys.exit(127)
    try:
        call = runc_args.parse(argv)
    except runc_args.ArgvError:
        passthrough(next_runtime, argv)
        return
    if call.container_id:
        if call.command == "create":
            _create(call, cfg, next_runtime)
        elif call.command in ("start", "delete"):
            if call.command == "delete":
                _cancel_prepare(cfg, call.container_id)
            _start_or_delete(call, cfg)
    passthrough(next_runtime, argv)


if __name__ == "__main__":
    main()
