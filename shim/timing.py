"""How long things take: the one clock thaw measures durations with (no other module reads
time.perf_counter; time.monotonic elsewhere makes deadlines, never durations). PhaseTimer
for named phases (restore, capture, the CUDA steps), Stopwatch for one duration."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


class Stopwatch:
    """Seconds since it was made (`started`: the clock's reading then)."""

    __slots__ = ("started",)

    def __init__(self) -> None:
        self.started = time.perf_counter()

    def seconds(self) -> float:
        return time.perf_counter() - self.started


class PhaseTimer:
    """Seconds per named phase, in the order first seen; a repeated name adds up."""

    def __init__(self) -> None:
        self.times: dict[str, float] = {}
        self._clock = Stopwatch()

    def run(self, name: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        clock = Stopwatch()
        try:
            return fn(*args, **kwargs)
        finally:
            self.add(name, clock.seconds())

    def add(self, name: str, seconds: float) -> None:
        self.times[name] = self.times.get(name, 0.0) + seconds

    def elapsed(self) -> float:
        """Seconds since this timer was made."""
        return self._clock.seconds()

    def rounded(self) -> dict[str, float]:
        return {k: round(v, 4) for k, v in self.times.items()}
