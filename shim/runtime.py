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

from . import config


def passthrough(binary: str, argv: list[str]) -> None:
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
    except config.ConfigError as exc:
        # A broken config must not break containers: run with defaults and say why.
        from thaw.oci import runc_log
        cfg = config.Config()
        runc_log.append(os.path.join(cfg.state_dir, "events.log"), "error", f"thaw: {exc}; using defaults")
        return cfg


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv if argv is None else argv)
    cfg = _config()
    try:
        next_runtime = cfg.resolve_next_runtime()
    except config.ConfigError as exc:
        sys.stderr.write(f"thaw-runtime: {exc}\n")
        sys.exit(127)
    try:
        call = runc_args.parse(argv)
    except runc_args.ArgvError:
        passthrough(next_runtime, argv)
    cid = call.container_id

    if call.command == "create" and cid:
        bundle_dir = call.flags.get("bundle")
        bundle_dir = bundle_dir if isinstance(bundle_dir, str) else os.getcwd()
        if _mentions_thaw(bundle_dir):
            from thaw.oci import annotations as ann
            from thaw.oci.spec import Bundle, SpecError
            try:
                bundle = Bundle.load(bundle_dir)
            except SpecError:
                passthrough(next_runtime, argv)
            if ann.wants_thaw(bundle.annotations):
                from .restore import create
                create(call, bundle, cfg, next_runtime)

    elif call.command in ("start", "delete") and cid:
        from . import state
        try:
            known = os.path.exists(state.record_path(cfg.state_dir, cid))
        except ValueError:
            known = False
        if known:
            st = state.ContainerState(cfg.state_dir, cid)
            if call.command == "delete":
                state.finish(cfg.state_dir, cid, "delete")   # then runc deletes the container
            else:
                record = st.read() or {}
                if record.get("restored") and not record.get("started"):
                    # runc refuses `start` on the running container restore made: a no-op.
                    st.update(started=True)
                    sys.exit(0)

    passthrough(next_runtime, argv)


if __name__ == "__main__":
    main()
