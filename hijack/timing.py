"""Where the time of a freeze goes: consecutive named laps of one stopwatch.

A move's freeze is the sum of steps on two nodes (docs/protocol.md, "Moving"):
each side keeps a `Laps` from the moment the process stops, and ends a lap
at each step's end. `hijack move --timing` prints both sides' laps, and the
number of system calls each side injected while the process was frozen
(each one costs a few ptrace round trips), so a bench can tell the fixed part
of a freeze from the part that grows with the memory written.

Reading the clock costs well under a microsecond: the laps are always kept.
"""

from __future__ import annotations

import time


class Laps:
    """Named, consecutive intervals of time (milliseconds), in the order they ended."""

    def __init__(self, started_at: float | None = None) -> None:
        self.started_at = time.perf_counter() if started_at is None else started_at
        self._last = self.started_at
        self.laps: dict[str, float] = {}
        self.injected = 0  # system calls injected during the laps (by whoever keeps them)

    def lap(self, name: str) -> None:
        """End the lap `name` now (time since the last lap; a name used again adds up)."""
        now = time.perf_counter()
        self.laps[name] = self.laps.get(name, 0.0) + (now - self._last) * 1000
        self._last = now

    def total_ms(self) -> float:
        return (self._last - self.started_at) * 1000

    def rounded(self) -> dict[str, float]:
        """The laps in milliseconds, to the microsecond (for a JSON message)."""
        return {name: round(ms, 3) for name, ms in self.laps.items()}


def describe(laps: dict[str, float]) -> str:
    """`name 1.2, other 0.3` (ms), in the order given."""
    return ", ".join(f"{name} {ms:.1f}" for name, ms in laps.items())
