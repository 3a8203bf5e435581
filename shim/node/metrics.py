"""Metrics in Prometheus text format, for node_exporter's textfile collector (`metrics_dir` in the
node config; off when unset).

  metrics_dir/thaw.prom         creates by outcome and reason, captures, restore duration
                                histogram by phase (counters live in state_dir/metrics.json)
  metrics_dir/thaw_store.prom   snapshots and bytes in the store (gauges)

Counters are updated under a lock after a thaw create or a capture (never on passthrough); the
store gauges whenever capture, rm, import or gc change the store. Each .prom file is replaced by
rename, so the collector never reads half a file.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Callable
from typing import Any

from thaw.oci.files import atomic_write, make_private_dir

from .config import Config

Change = Callable[[dict[str, Any]], None]  # edits the counters in place, under the lock

# Restore phases take from milliseconds (fingerprint) to tens of seconds (a large page fill).
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0)

_HELP = {
    "thaw_creates_total": ("counter", "Container creates thaw handled, by outcome (restored, cold_start, "
                           "refused) and reason."),
    "thaw_captures_total": ("counter", "Captures, by result (ok, failed) and trigger (cli, auto)."),
    "thaw_restore_phase_seconds": ("histogram", "Wall time of each restore phase (total: the whole create)."),
    "thaw_store_snapshots": ("gauge", "Snapshots published in the store."),
    "thaw_store_bytes": ("gauge", "Bytes of the store's published snapshots (blobs counted once)."),
}


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    esc = {k: str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") for k, v in labels.items()}
    return "{" + ",".join(f'{k}="{v}"' for k, v in sorted(esc.items())) + "}"


class _Counters:
    """The persistent counters (state_dir/metrics.json), changed under state_dir/metrics.lock."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.path = os.path.join(cfg.state_dir, "metrics.json")

    def update(self, change: Change) -> dict[str, Any]:
        make_private_dir(self.cfg.state_dir)
        fd = os.open(os.path.join(self.cfg.state_dir, "metrics.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                with open(self.path) as f:
                    data: dict[str, Any] = json.load(f)
            except (OSError, ValueError):
                data = {}
            data.setdefault("counters", {})
            data.setdefault("histograms", {})
            change(data)
            atomic_write(self.path, json.dumps(data).encode(), durable=False)
            if self.cfg.metrics_dir:
                _write_prom(self.cfg.metrics_dir, "thaw.prom", _render(data))
            return data
        finally:
            os.close(fd)


def _count(data: dict[str, Any], name: str, labels: dict[str, str], by: float = 1) -> None:
    key = name + _labels(labels)
    data["counters"][key] = data["counters"].get(key, 0) + by


def _observe(data: dict[str, Any], name: str, labels: dict[str, str], value: float) -> None:
    key = name + _labels(labels)
    h = data["histograms"].setdefault(key, {"buckets": [0] * len(BUCKETS), "sum": 0.0, "count": 0})
    for i, le in enumerate(BUCKETS):
        if value <= le:
            h["buckets"][i] += 1
    h["sum"] += value
    h["count"] += 1


def _family(key: str) -> tuple[str, str]:
    name, _, labels = key.partition("{")
    return name, ("{" + labels) if labels else ""


def _render(data: dict[str, Any]) -> str:
    lines: list[str] = []
    by_family: dict[str, list[str]] = {}
    for key, value in sorted(data["counters"].items()):
        name, labels = _family(key)
        by_family.setdefault(name, []).append(f"{name}{labels} {value:g}")
    for key, h in sorted(data["histograms"].items()):
        name, labels = _family(key)
        inner = labels[1:-1]
        out = by_family.setdefault(name, [])
        for le, n in zip(BUCKETS, h["buckets"]):
            out.append(f'{name}_bucket{{{inner + "," if inner else ""}le="{le:g}"}} {n}')
        out.append(f'{name}_bucket{{{inner + "," if inner else ""}le="+Inf"}} {h["count"]}')
        out.append(f"{name}_sum{labels} {h['sum']:.6f}")
        out.append(f"{name}_count{labels} {h['count']}")
    for name in sorted(by_family):
        kind, help_text = _HELP.get(name, ("untyped", name))
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", *by_family[name]]
    return "\n".join(lines) + "\n"


def _write_prom(metrics_dir: str, name: str, text: str) -> None:
    os.makedirs(metrics_dir, mode=0o755, exist_ok=True)
    # Readable by the collector (node_exporter may not run as root); metrics hold no secrets.
    atomic_write(os.path.join(metrics_dir, name), text.encode(), mode=0o644)


def record_create(cfg: Config, outcome: str, reason: str | None, phases: dict[str, float] | None) -> None:
    """After a thaw create: count its outcome; observe a restore's phases. Never raises."""
    def change(data: dict[str, Any]) -> None:
        _count(data, "thaw_creates_total", {"outcome": outcome, "reason": reason or ""})
        for phase, seconds in (phases or {}).items():
            _observe(data, "thaw_restore_phase_seconds", {"phase": phase}, seconds)
    _safely(cfg, change)


def record_capture(cfg: Config, ok: bool, trigger: str) -> None:
    _safely(cfg, lambda data: _count(data, "thaw_captures_total",
                                     {"result": "ok" if ok else "failed", "trigger": trigger}))


def _safely(cfg: Config, change: Change) -> None:
    try:
        _Counters(cfg).update(change)
    except OSError:
        pass


def record_store(cfg: Config, snapshots: int, size: int) -> None:
    """The store changed: rewrite its gauges (only where metrics are on)."""
    if not cfg.metrics_dir:
        return
    text = "".join(f"# HELP {n} {_HELP[n][1]}\n# TYPE {n} gauge\n{n} {v}\n"
                   for n, v in (("thaw_store_snapshots", snapshots), ("thaw_store_bytes", size)))
    try:
        _write_prom(cfg.metrics_dir, "thaw_store.prom", text)
    except OSError:
        pass


def parse(text: str) -> dict[str, float]:
    """Samples of a .prom file, {'name{labels}': value} (for tests and `thaw doctor`)."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out
