"""Wall-clock timing of named phases: the one timer restore, capture and the CUDA steps share."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


class PhaseTimer:
    """Seconds per named phase, in the order first seen; a repeated name adds up."""

    def __init__(self) -> None:
        self.times: dict[str, float] = {}
        self._t0 = time.perf_counter()

    def run(self, name: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            self.add(name, time.perf_counter() - t)

    def add(self, name: str, seconds: float) -> None:
        self.times[name] = self.times.get(name, 0.0) + seconds

    def elapsed(self) -> float:
        """Seconds since this timer was made."""
        return time.perf_counter() - self._t0

    def rounded(self) -> dict[str, float]:
        return {k: round(v, 4) for k, v in self.times.items()}
