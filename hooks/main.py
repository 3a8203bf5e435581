"""thaw-hook: the OCI hooks thaw-runtime adds to thaw containers (hooks/stages.py says what each
does), and the auto-capture watcher they start. The runtime passes the container's state (id,
pid, bundle, annotations) as JSON on stdin.

A hook's stdout/stderr may be the runtime's pipes: it writes there only to report its own
failure, and never lingers (the watcher is a process of its own with its stdio on /dev/null).

  thaw-hook prestart|poststop < state.json
  thaw-hook watch CONTAINER_ID PID        the auto-capture watcher
  thaw-hook prepare NAMESPACE SNAPSHOT [CONTAINER_ID]
                                          started beside a pod sandbox's create (shim/lifecycle/prefetch.py);
                                          stopped when CONTAINER_ID is deleted
"""

from __future__ import annotations

import sys

from thaw.oci import ThawError
from thaw.oci.runtime_state import OciState
from thaw.shim.node.config import load

from . import stages

USAGE = ("usage: thaw-hook prestart|poststop < state.json | thaw-hook watch CONTAINER_ID PID | "
         "thaw-hook prepare NAMESPACE SNAPSHOT [CONTAINER_ID]\n")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("prestart", "createRuntime", "poststop", "watch", "prepare"):
        sys.stderr.write(USAGE)
        sys.exit(2)
    try:
        cfg = load()
        if argv[0] == "watch":
            if len(argv) != 3 or not argv[2].isdigit():
                sys.stderr.write(USAGE)
                sys.exit(2)
            from thaw.shim.lifecycle import autocapture  # the watcher's own process: stages.py says why here
            autocapture.watch(cfg, argv[1], int(argv[2]))
            sys.exit(0)
        if argv[0] == "prepare":
            if len(argv) not in (3, 4):
                sys.stderr.write(USAGE)
                sys.exit(2)
            sys.exit(stages.prepare(cfg, argv[1], argv[2], argv[3] if len(argv) == 4 else None))
        oci_state = OciState.read(sys.stdin.buffer)
    except ThawError as exc:
        sys.stderr.write(f"thaw-hook: {exc}\n")
        sys.exit(1)
    stage = stages.poststop if argv[0] == "poststop" else stages.prestart
    sys.exit(stage(oci_state, cfg))


if __name__ == "__main__":
    main()
