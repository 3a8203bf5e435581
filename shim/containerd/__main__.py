"""python -m thaw.shim.containerd install|check|uninstall: what install/containerd.sh and the
bundle's thaw-node.sh run.

Exit status of `install`: 0 nothing changed, 100 files changed (containerd needs a restart),
2 nothing could be changed (the reason on stderr); `uninstall` likewise. `check`: 0 all good, 1 problems.
"""

from __future__ import annotations

import argparse
import sys

from . import ContainerdConfigError
from .checks import doctor_checks
from .discovery import find_config, find_containerd
from .dropin import DEFAULT_BINARY, DEFAULT_CONF_D
from .install import install, uninstall

CHANGED = 100


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m thaw.shim.containerd",
                                description="register thaw's runtime handler with containerd, or check it")
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("install", "check", "uninstall"):
        s = sub.add_parser(name)
        s.add_argument("--config", default=None, help="containerd's main config (default: found)")
        s.add_argument("--conf-d", default=None, help=f"drop-in directory (default {DEFAULT_CONF_D})")
        s.add_argument("--containerd", default=None, help="containerd binary (default: on PATH)")
        s.add_argument("--binary", default=DEFAULT_BINARY, help="thaw-runtime path for BinaryName")
    a = p.parse_args(argv)
    containerd_bin = a.containerd or find_containerd()
    main_cfg = a.config or find_config()
    conf_d = a.conf_d or DEFAULT_CONF_D
    if a.cmd == "check":
        bad = 0
        for ok, what, detail in doctor_checks(main_cfg, containerd_bin, conf_d):
            bad += not ok
            print(f"[{'ok' if ok else 'FAIL':>4}] {what}: {detail}")
        return 1 if bad else 0
    say = lambda m: print(f"[thaw containerd] {m}", flush=True)  # noqa: E731
    if a.cmd == "uninstall":
        try:
            return CHANGED if uninstall(main_cfg, conf_d, say=say) else 0
        except (ContainerdConfigError, OSError) as exc:
            print(f"[thaw containerd] ERROR: {exc}", file=sys.stderr)
            return 2
    if not containerd_bin:
        print("containerd is not installed", file=sys.stderr)
        return 2
    try:
        changed = install(main_cfg, conf_d, containerd_bin, a.binary,
                          say=say)
    except ContainerdConfigError as exc:
        print(f"[thaw containerd] ERROR: {exc}", file=sys.stderr)
        return 2
    return CHANGED if changed else 0


if __name__ == "__main__":
    raise SystemExit(main())
