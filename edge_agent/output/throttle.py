"""The one rate limiter: progress messages, mask/overlay publishing, progress printers.

Every "at most one X every N seconds" in the agent (benchmark and deployment progress, the
mask and overlay rate caps) goes through :class:`Throttle`, so the rule — the first event
passes, then one per ``interval``, and a forced (final) event always passes — is written once.
"""

from __future__ import annotations

import time
from typing import Callable, Optional


class Throttle:
    """Lets an event through at most once every ``interval`` seconds (``interval <= 0``: always).

    ``ready(force=True)`` always passes (a final 100 % or a phase change must not be lost) and
    restarts the interval. Not thread-safe: one throttle per producer.
    """

    def __init__(self, interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = max(0.0, float(interval))
        self._clock = clock
        self._last: Optional[float] = None

    def ready(self, force: bool = False) -> bool:
        now = self._clock()
        if not force and self._last is not None and now - self._last < self.interval:
            return False
        self._last = now
        return True

    def remaining(self) -> float:
        """Seconds until the next event may pass (0 when it may pass now): a wait bound for loops."""
        if self._last is None:
            return 0.0
        return max(0.0, self.interval - (self._clock() - self._last))


class RateGate:
    """Let through every ``every_n``-th event and at most ``max_hz`` per second (0 = no cap)."""

    def __init__(self, every_n: int = 1, max_hz: float = 0.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.every_n = max(1, int(every_n))
        self._throttle = Throttle(1.0 / max_hz if max_hz and max_hz > 0 else 0.0, clock)
        self._count = 0

    def allow(self) -> bool:
        self._count += 1
        if (self._count - 1) % self.every_n:
            return False
        return self._throttle.ready()
