"""runc's log line format: what containerd's shim reads back from the `--log` file.

With `--log-format json` each line is a JSON object with `level`, `msg` and an RFC 3339 `time`
(the shim reports the last `"level":"error"` line). With the text format, logrus's key=value form.
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def format_line(level: str, msg: str, log_format: str = "json") -> str:
    if log_format == "json":
        return json.dumps({"level": level, "msg": msg, "time": _now()}) + "\n"
    return f'time="{_now()}" level={level} msg={json.dumps(msg)}\n'


def append(path: str | None, level: str, msg: str, log_format: str = "json") -> None:
    """Append one line to the runtime log. Never raises: logging must not break container create."""
    if not path:
        return
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, format_line(level, msg, log_format).encode())
        finally:
            os.close(fd)
    except OSError:
        pass
