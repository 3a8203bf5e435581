"""Two listeners for transfer progress: a one-line terminal display (bytes, rate, time left,
redrawn at most a few times a second) and JSON lines for machines (one line per finished blob
and a summary; byte-level lines only when asked for)."""

from __future__ import annotations

import json
import sys
import time
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:            # the byte formatter is also the CLI's: no client import for it
    from .transfer import BlobProgress, Progress

REDRAW_S = 0.25


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def human_duration(s: float | None) -> str:
    if s is None:
        return "--:--"
    s = int(s + 0.5)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class TerminalProgress:
    """`push  1.2 GiB / 4.4 GiB  27%  310.2 MiB/s  0:11 left  blobs 3/9`, redrawn in place."""

    def __init__(self, stream: TextIO | None = None, label: str | None = None):
        self.stream = stream or sys.stderr
        self.label = label
        self._last = 0.0
        self._width = 0

    def line(self, p: Progress) -> str:
        total = p.total
        pct = 100.0 * p.done / total if total else 100.0
        return (f"{self.label or p.operation}  {human_bytes(p.done)} / {human_bytes(total)}  {pct:3.0f}%  "
                f"{human_bytes(p.rate())}/s  {human_duration(p.eta())} left  blobs {p.finished}/{len(p.blobs)}")

    def __call__(self, event: str, p: Progress, blob: BlobProgress | None) -> None:
        now = time.monotonic()
        if event in ("bytes", "blob") and now - self._last < REDRAW_S:   # n blobs: not n redraws
            return
        self._last = now
        text = self.line(p)
        if event == "end":
            text = (f"{self.label or p.operation}  {'failed: ' + str(p.error) if p.error else 'done'}  "
                    f"{human_bytes(p.total)} in {p.elapsed():.1f} s ({human_bytes(p.rate())}/s)")
        pad = max(0, self._width - len(text))
        self._width = len(text)
        self.stream.write("\r" + text + " " * pad + ("\n" if event == "end" else ""))
        self.stream.flush()


class JsonLinesProgress:
    """One JSON object per line: {"event": "blob", "digest", "size", "outcome", ...} for each
    finished blob and {"event": "end", "ok", "bytes", "seconds", "error"} at the end.
    `interval_s` adds {"event": "progress", ...} lines at most that often."""

    def __init__(self, stream: TextIO | None = None, interval_s: float | None = None):
        self.stream = stream or sys.stdout
        self.interval_s = interval_s
        self._last = 0.0

    def __call__(self, event: str, p: Progress, blob: BlobProgress | None) -> None:
        if event == "start":
            rec = {"event": "start", "operation": p.operation, "blobs": len(p.blobs), "bytes": p.total}
        elif event == "blob" and blob is not None:
            rec = {"event": "blob", "digest": blob.digest, "size": blob.total, "outcome": blob.outcome,
                   "reused": blob.reused}
        elif event == "end":
            rec = {"event": "end", "operation": p.operation, "ok": p.error is None, "bytes": p.total,
                   "seconds": round(p.elapsed(), 3), "bytes_per_second": round(p.rate()),
                   "error": str(p.error) if p.error else None}
        else:
            now = time.monotonic()
            if self.interval_s is None or now - self._last < self.interval_s:
                return
            self._last = now
            rec = {"event": "progress", "done": p.done, "bytes": p.total, "bytes_per_second": round(p.rate())}
        self.stream.write(json.dumps(rec) + "\n")
        self.stream.flush()
