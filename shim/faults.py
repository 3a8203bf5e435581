"""Test-only fault injection. The fault-injection tests set THAW_TEST_FAULTS in the environment
of one thaw process, e.g. "runc_restore=killgroup@0.3,publish=kill"; each named point in the
restore, capture and pull paths then acts:

  kill        SIGKILL this process (its children, e.g. runc and CRIU, go on)
  killgroup   SIGKILL this process's whole process group (runc and CRIU die too)
  fail        raise FaultInjected (an ordinary failure at that point)
  sleep:S     wait S seconds there (so that a test can act meanwhile)
  ACTION@S    do ACTION S seconds later, from a timer, while the work goes on

Points inside CRIU's restore: "criu.STAGE=TARGET", STAGE one of CRIU's action-script stages
(pre-restore, setup-namespaces, post-setup-namespaces, post-restore, pre-resume, post-resume),
TARGET one of kill (thaw-runtime alone), killgroup (its process group), killrunc, killcriu,
stallrunc (runc stopped, thaw-runtime killed). A capture's dump takes them too (stages pre-dump,
post-dump; "kill" is then `thaw capture`).
criu_options() then adds an action script to the restore's CRIU config that SIGKILLs the target
when CRIU reaches that stage: a deterministic place inside runc and CRIU, where a timer is not.

Without the variable a point costs one dictionary lookup; passthrough never reaches one.
"""

from __future__ import annotations

import os
import signal
import threading
import time

from thaw.oci import ThawError


class FaultInjected(ThawError):
    pass


def env() -> dict[str, str]:
    """What a thaw process it starts (the hook, the watcher, a prepare) must inherit for the armed
    faults to reach it: empty unless a test armed some. The one place that names the variable."""
    spec = os.environ.get("THAW_TEST_FAULTS")
    return {"THAW_TEST_FAULTS": spec} if spec else {}


def point(name: str) -> None:
    spec = os.environ.get("THAW_TEST_FAULTS")
    if not spec:
        return
    for item in spec.split(","):
        where, _, action = item.strip().partition("=")
        if where != name:
            continue
        action, _, delay = action.partition("@")
        if delay:
            timer = threading.Timer(float(delay), _act, (name, action))
            timer.daemon = True
            timer.start()
        else:
            _act(name, action)


def _act(name: str, action: str) -> None:
    if action.startswith("sleep:"):
        time.sleep(float(action[len("sleep:"):]))
    elif action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "killgroup":
        os.killpg(os.getpgid(0), signal.SIGKILL)
    elif action == "fail":
        raise FaultInjected(f"fault injected at {name}")
    else:
        raise FaultInjected(f"unknown fault action {action!r} at {name}")


_CRIU_TARGETS = {"kill": "-9 $THAW", "killgroup": "-9 -$GROUP", "killrunc": "-9 $RUNC", "killcriu": "-9 $PPID",
                 # runc stalled (as on a loaded node) when thaw-runtime dies: only the restore's
                 # cgroup finds it (runc moves CRIU into the container's cgroup, never itself)
                 "stallrunc": "-STOP $RUNC; kill -9 $THAW"}


def criu_options(work_dir: str) -> tuple[str, ...]:
    """CRIU config lines for the "criu.STAGE=TARGET" faults (none without them)."""
    spec = os.environ.get("THAW_TEST_FAULTS", "")
    cases = []
    for item in spec.split(","):
        where, _, target = item.strip().partition("=")
        if where.startswith("criu.") and target in _CRIU_TARGETS:
            cases.append(f'  {where[len("criu."):]}) kill {_CRIU_TARGETS[target]} ;;\n')
    if not cases:
        return ()
    # CRIU runs action scripts itself: $PPID is CRIU, its parent runc, runc's parent thaw-runtime.
    path = os.path.join(work_dir, "fault.sh")
    with open(path, "w") as f:
        f.write(f"#!/bin/sh\nTHAW={os.getpid()}; GROUP={os.getpgid(0)}\n"
                "RUNC=$(cut -d' ' -f4 /proc/$PPID/stat)\n"
                'case "$CRTOOLS_SCRIPT_ACTION" in\n' + "".join(cases) + "esac\nexit 0\n")
    os.chmod(path, 0o700)
    return (f"action-script {path}",)
