"""thaw-runtime: a runc-compatible runtime (containerd's runc v2 shim calls it as BinaryName).

Hot path: every call that is not `create`/`start`/`delete` of a container thaw handles becomes
an `execv` of the next runtime with the same argv, after importing as little as possible. Only a
`create` whose config.json carries `thaw.dev/snapshot` loads the restore machinery.
"""

from __future__ import annotations

import os
import sys


def _config():
    from .config import Config, ConfigError, load
    try:
        return load()
    except ConfigError as exc:
        # A broken config must not break containers: run with defaults and say why.
        from thaw.oci import runc_log
        cfg = Config()
        runc_log.append(os.path.join(cfg.state_dir, "events.log"), "error", f"thaw: {exc}; using defaults")
        return cfg


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv if argv is None else argv)
    from thaw.oci import runc_args
    from .runc import passthrough

    cfg = _config()
    try:
        next_runtime = cfg.resolve_next_runtime()
    except ValueError as exc:
        sys.stderr.write(f"thaw-runtime: {exc}\n")
        sys.exit(127)
    try:
        call = runc_args.parse(argv)
    except runc_args.ArgvError:
        passthrough(next_runtime, argv)
    cid = call.container_id

    if call.command == "create" and cid:
        from thaw.oci import annotations as ann
        from thaw.oci.spec import Bundle, SpecError
        bundle_dir = call.flags.get("bundle")
        try:
            bundle = Bundle.load(bundle_dir if isinstance(bundle_dir, str) else os.getcwd())
        except SpecError:
            passthrough(next_runtime, argv)
        if ann.wants_thaw(bundle.annotations):
            from .restore import create
            create(call, bundle, cfg, next_runtime)

    elif call.command == "start" and cid:
        from .state import ContainerState
        try:
            state = ContainerState(cfg.state_dir, cid)
        except ValueError:
            passthrough(next_runtime, argv)
        record = state.read() if state.exists() else None
        if record and record.get("restored") and not record.get("started"):
            # runc refuses `start` on the running container restore produced: make it a no-op.
            state.update(started=True)
            sys.exit(0)

    elif call.command == "delete" and cid:
        from .state import ContainerState
        try:
            state = ContainerState(cfg.state_dir, cid)
            if os.path.lexists(state.record_path) or os.path.lexists(state.work_dir):
                state.remove()
        except ValueError:
            pass

    passthrough(next_runtime, argv)


if __name__ == "__main__":
    main()
