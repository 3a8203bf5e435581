"""thaw-hook: OCI hook entry point. The runtime passes the container state on stdin.

poststop: remove the container's thaw state (a container deleted without `thaw-runtime delete`,
e.g. by a runtime crash, must not leave records behind).
prestart: nothing yet on the CPU path; it accepts the state so that it can be injected safely.

A hook's stdout/stderr may be the runtime's: write nothing there, and never linger.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("prestart", "poststop", "createRuntime"):
        sys.stderr.write("usage: thaw-hook prestart|poststop < state.json\n")
        sys.exit(2)
    from thaw.oci.state import ContainerState as OciState, StateError
    try:
        oci_state = OciState.read(sys.stdin.buffer)
    except StateError as exc:
        sys.stderr.write(f"thaw-hook: {exc}\n")
        sys.exit(1)
    from thaw.shim.config import load
    cfg = load()
    if argv[0] == "poststop":
        from thaw.shim.state import ContainerState
        try:
            ContainerState(cfg.state_dir, oci_state.id).remove()
        except ValueError:
            pass
    sys.exit(0)


if __name__ == "__main__":
    main()
