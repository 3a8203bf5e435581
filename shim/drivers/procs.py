"""Handles on processes that outlive the one that recorded them (a capture watcher, the owner of
a staging directory, a thaw-runtime mid-restore): a pid alone can be reused by an unrelated
process, so a handle is (pid, start time) and is checked through a pidfd before it is trusted."""

from __future__ import annotations

import os
import signal
from typing import Any


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat), or None;
    None too for a process that has exited and waits to be reaped (a zombie is dead to thaw: a
    shim may reap a SIGKILLed thaw-runtime only after the next call for its container)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    try:
        fields = stat[stat.rindex(b")") + 2:].split()
        return None if fields[0] in (b"Z", b"X") else int(fields[19])
    except (ValueError, IndexError):
        return None


class ProcessHandle:
    """A process identified by pid and start time."""
    __slots__ = ("pid", "start")

    def __init__(self, pid: int, start: int | None):
        self.pid, self.start = pid, start

    @classmethod
    def of(cls, pid: int) -> ProcessHandle:
        return cls(pid, start_time(pid))

    @classmethod
    def me(cls) -> ProcessHandle:
        return cls.of(os.getpid())

    def to_json(self) -> dict[str, int | None]:
        return {"pid": self.pid, "start": self.start}

    @classmethod
    def from_json(cls, obj: Any) -> ProcessHandle | None:
        try:
            return cls(int(obj["pid"]), int(obj["start"]) if obj.get("start") is not None else None)
        except (TypeError, KeyError, ValueError):
            return None

    def _pidfd(self) -> int | None:
        """A pidfd of this very process, or None if it is gone (or its pid now names another)."""
        if self.start is None:
            return None
        try:
            fd = os.pidfd_open(self.pid)
        except OSError:
            return None
        # The pidfd pins whatever process has the pid now; it is ours if the start time matches.
        if start_time(self.pid) != self.start:
            os.close(fd)
            return None
        return fd

    def alive(self) -> bool:
        fd = self._pidfd()
        if fd is None:
            return False
        os.close(fd)
        return True

    def signal(self, sig: int = signal.SIGTERM) -> bool:
        """Send `sig` if this process still runs; never to a process that reused its pid."""
        fd = self._pidfd()
        if fd is None:
            return False
        try:
            signal.pidfd_send_signal(fd, sig)
            return True
        except OSError:
            return False
        finally:
            os.close(fd)
