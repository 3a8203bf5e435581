"""thaw-hook: the OCI hooks thaw-runtime adds to thaw containers. The runtime passes the
container's state (id, pid, bundle, annotations) as JSON on stdin.

  prestart  restore path (runc restore runs it before the processes come back): check that the
            target network namespace has the addresses the snapshot's listening sockets need;
            a failure fails the restore, and thaw-runtime then cold-starts the container.
            cold path with `thaw.dev/capture: on-ready`: start the capture watcher.
  poststop  stop the watcher, write the container's timing record, remove its thaw state.

A hook's stdout/stderr may be the runtime's pipes: it writes there only to report its own
failure, never lingers, and the watcher it starts is detached with its stdio on /dev/null.
"""

from __future__ import annotations

import sys


def prestart(oci_state, cfg) -> int:
    from thaw.shim.state import ContainerState
    try:
        st = ContainerState(cfg.state_dir, oci_state.id)
    except ValueError:
        return 0
    record = st.read()
    if record is None:
        return 0                               # not a container thaw handles
    if record.get("restoring"):
        if not record.get("netns"):
            return 0                           # CRIU recreates a namespace of its own
        from thaw.shim import netcheck
        problems = netcheck.problems(record["netns"], record.get("listen") or [])
        if problems:
            # thaw-runtime reads the reason from the record: runc's stderr here is the container's.
            st.update(hook_error="; ".join(problems))
            sys.stderr.write("thaw-hook: " + "; ".join(problems) + "\n")
            return 1
        return 0
    if record.get("capture") and not record.get("watcher_pid") and oci_state.pid:
        try:
            from thaw.shim import autocapture
            watcher = autocapture.spawn(cfg, oci_state.id, oci_state.pid)
            st.update(watcher_pid=watcher)
        except Exception as exc:  # noqa: BLE001 - auto-capture must never fail a cold start
            from thaw.oci import runc_log
            import os
            runc_log.append(os.path.join(cfg.state_dir, "events.log"), "error",
                            f"[{oci_state.id}] auto-capture watcher not started: {exc}")
    return 0


def poststop(oci_state, cfg) -> int:
    from thaw.shim.state import finish
    finish(cfg.state_dir, oci_state.id, "poststop")
    return 0


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    stages = {"prestart": prestart, "createRuntime": prestart, "poststop": poststop}
    if not argv or argv[0] not in stages:
        sys.stderr.write("usage: thaw-hook prestart|poststop < state.json\n")
        sys.exit(2)
    from thaw.oci.state import ContainerState as OciState, StateError
    from thaw.shim.config import ConfigError, load
    try:
        oci_state = OciState.read(sys.stdin.buffer)
        cfg = load()
    except (StateError, ConfigError) as exc:
        sys.stderr.write(f"thaw-hook: {exc}\n")
        sys.exit(1)
    sys.exit(stages[argv[0]](oci_state, cfg))


if __name__ == "__main__":
    main()
