"""The recent traffic the planner plans for: every request the scheduler's Route handler saw in the last
`window_s` seconds, as (when, prompt tokens, max_tokens). A bounded deque: recording is O(1) on the event loop."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

#: Requests kept at most, whatever the window: the planner samples lengths from them, more adds nothing.
MAX_SAMPLES = 4096
#: The output length assumed for a request that set no max_tokens (0): the gateway's usual default.
DEFAULT_MAX_TOKENS = 128


@dataclass(frozen=True)
class WindowStats:
    """What the window saw: arrivals per second and each request's (prompt tokens, max_tokens), oldest first."""

    rate_per_s: float
    lengths: tuple[tuple[int, int], ...]

    @property
    def num_requests(self) -> int:
        """Requests in the window."""
        return len(self.lengths)

    def mean_lengths(self) -> tuple[float, float]:
        """(mean prompt tokens, mean max_tokens); (0, 0) for an empty window."""
        if not self.lengths:
            return 0.0, 0.0
        n = len(self.lengths)
        return sum(p for p, _ in self.lengths) / n, sum(m for _, m in self.lengths) / n


class ArrivalWindow:
    """The requests routed in the last window_s seconds (at most max_samples of them)."""

    def __init__(self, window_s: float, max_samples: int = MAX_SAMPLES,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if window_s <= 0 or max_samples < 1:
            raise ValueError(f"window_s must be > 0 and max_samples >= 1, got {window_s}, {max_samples}")
        self.window_s = window_s
        self._clock = clock
        self._started = clock()  # a window younger than window_s rates over its own age
        self._seen: deque[tuple[float, int, int]] = deque(maxlen=max_samples)

    def record(self, num_prompt_tokens: int, max_tokens: int) -> None:
        """One request arrived at Route (called on the event loop: constant time)."""
        self._seen.append((self._clock(), max(1, num_prompt_tokens), max_tokens if max_tokens > 0
                           else DEFAULT_MAX_TOKENS))

    def stats(self) -> WindowStats:
        """The window as of now; the arrival rate counts the requests over the window's length (its age, while
        younger), or over the span the deque still covers when it overflowed (a burst above max_samples a window)."""
        now = self._clock()
        while self._seen and self._seen[0][0] < now - self.window_s:
            self._seen.popleft()
        seen = list(self._seen)
        if not seen:
            return WindowStats(0.0, ())
        span = min(self.window_s, now - self._started)
        if len(seen) >= (self._seen.maxlen or 0):
            span = now - seen[0][0]
        span = max(span, 1e-3)
        return WindowStats(len(seen) / span, tuple((p, m) for _, p, m in seen))
