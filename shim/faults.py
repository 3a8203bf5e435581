"""Test-only fault injection. The fault-injection tests set THAW_TEST_FAULTS in the environment
of one thaw process, e.g. "runc_restore=killgroup@0.3,publish=kill"; each named point in the
restore and capture paths then acts:

  kill        SIGKILL this process (its children, e.g. runc and CRIU, go on)
  killgroup   SIGKILL this process's whole process group (runc and CRIU die too)
  fail        raise FaultInjected (an ordinary failure at that point)
  sleep:S     wait S seconds there (so that a test can act meanwhile)
  ACTION@S    do ACTION S seconds later, from a timer, while the work goes on

Without the variable a point costs one dictionary lookup; passthrough never reaches one.
"""

from __future__ import annotations

import os
import signal
import threading

from thaw.oci import ThawError


class FaultInjected(ThawError):
    pass


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
        import time
        time.sleep(float(action[len("sleep:"):]))
    elif action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "killgroup":
        os.killpg(os.getpgid(0), signal.SIGKILL)
    elif action == "fail":
        raise FaultInjected(f"fault injected at {name}")
    else:
        raise FaultInjected(f"unknown fault action {action!r} at {name}")
