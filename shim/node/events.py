"""The node's event log: what thaw did, for operators (`thaw events`).

  state_dir/events.log     one JSON object per line: time, level, kind, container, msg, fields
  state_dir/events.log.1   the previous file: events.log is rotated when it passes the size cap

Kinds: restored, cold_start, refused (a required restore that failed), finished (a thaw
container ended: its timings), captured, capture_failed, auto_capture (watcher outcomes),
hook_error, config_error, removed, gc, prefetch, pull (on demand: started, pulled, failed), store,
untrusted (a pull or import refused for provenance).
This module is the one writer; the runtime log that
containerd reads (runc's --log) is oci/runc_log's.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

from thaw.oci.files import make_private_dir

from .config import Config

NAME = "events.log"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def emit(cfg: Config, kind: str, msg: str, container: str | None = None, level: str = "info",
         **fields: Any) -> None:
    """Append one event. Never raises: reporting must not break a container's create."""
    event = {"time": _now(), "level": level, "kind": kind, "container": container, "msg": msg, **fields}
    state_dir, max_bytes = cfg.state_dir, cfg.events_max_bytes
    path = os.path.join(state_dir, NAME)
    try:
        make_private_dir(state_dir)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, (json.dumps(event, default=str) + "\n").encode())
            size = os.fstat(fd).st_size
        finally:
            os.close(fd)
        if size > max_bytes:
            _rotate(state_dir, max_bytes)
    except OSError:
        pass


def _rotate(state_dir: str, max_bytes: int) -> None:
    """Move events.log to events.log.1 once it is over the cap; a lock makes concurrent writers
    rotate once (the second sees a small file and leaves it)."""
    lock = os.open(os.path.join(state_dir, NAME + ".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        path = os.path.join(state_dir, NAME)
        try:
            if os.stat(path).st_size > max_bytes:
                os.replace(path, path + ".1")     # rotation moves the log; nothing is written
        except FileNotFoundError:
            pass
    finally:
        os.close(lock)


def _parse(line: str) -> dict[str, Any] | None:
    try:
        event = json.loads(line)
    except ValueError:
        return None
    return event if isinstance(event, dict) else None


def read(state_dir: str, container: str | None = None) -> Iterator[dict[str, Any]]:
    """Every event still kept, oldest first."""
    for name in (NAME + ".1", NAME):
        try:
            with open(os.path.join(state_dir, name), errors="replace") as f:
                for line in f:
                    event = _parse(line)
                    if event and (container is None or event.get("container") == container):
                        yield event
        except FileNotFoundError:
            continue


def follow(state_dir: str, container: str | None = None, poll: float = 0.5,
           stop: float | None = None) -> Iterator[dict[str, Any]]:
    """Events as they are written, from now on (a rotation is followed). `stop`: seconds to give
    up after (None: forever)."""
    path = os.path.join(state_dir, NAME)
    deadline = None if stop is None else time.monotonic() + stop
    f = None
    inode = None
    buf = ""
    while deadline is None or time.monotonic() < deadline:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            st = None
        if st is not None and (f is None or st.st_ino != inode):
            if f is not None:
                f.close()
            first = f is None
            f = open(path, errors="replace")  # noqa: SIM115 - followed across rotations
            inode = st.st_ino
            if first:
                f.seek(0, os.SEEK_END)
        if f is not None:
            buf += f.read()
            *lines, buf = buf.split("\n")
            for line in lines:
                event = _parse(line)
                if event and (container is None or event.get("container") == container):
                    yield event
        time.sleep(poll)
    if f is not None:
        f.close()
