"""The rate of a running count over the last few seconds: env steps/s in the rollout service's and the
buffer's statistics."""

from __future__ import annotations

from collections import deque


class RecentRate:
    """Keep (time, count) samples of about the last `window_s` seconds; not thread-safe on its own."""

    def __init__(self, window_s: float = 5.0):
        self.window_s = window_s
        self._samples: deque[tuple[float, int]] = deque()

    def add(self, now: float, count: int) -> None:
        self._samples.append((now, count))
        while len(self._samples) > 2 and now - self._samples[0][0] > self.window_s:
            self._samples.popleft()

    def per_second(self, now: float | None = None) -> float:
        """Growth per second from the oldest sample kept to the newest; 0 before two samples, and
        when `now` is given and the newest is older than the window (the count stopped)."""
        if len(self._samples) < 2 or (now is not None and now - self._samples[-1][0] > self.window_s):
            return 0.0
        (t0, c0), (t1, c1) = self._samples[0], self._samples[-1]
        return (c1 - c0) / (t1 - t0) if t1 > t0 else 0.0
