"""Per-tenant request rate limits: one token bucket per tenant, `rate_per_minute` tokens a minute up to `burst`.
Every authenticated request takes a token; one that finds none is refused (HTTP 429 with Retry-After, gRPC
RESOURCE_EXHAUSTED) and told how long until a token is there. Runs on the event loop: no lock."""

from __future__ import annotations

import math
import time
from collections.abc import Callable


class TokenBucket:
    """`rate` tokens a second, holding at most `capacity`; starts full."""

    def __init__(self, rate: float, capacity: float, now: float):
        self.rate, self.capacity = rate, capacity
        self.tokens, self.updated = capacity, now

    def take(self, now: float) -> float:
        """Take one token: 0.0 when there was one, else the seconds until there will be (nothing taken)."""
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


class TenantLimits:
    """One bucket per tenant, made on the tenant's first request."""

    def __init__(self, rate_per_minute: float, burst: int = 0, clock: Callable[[], float] = time.monotonic):
        self.rate = rate_per_minute / 60.0
        self.burst = burst or max(1, math.floor(rate_per_minute))
        self.clock = clock
        self.buckets: dict[str, TokenBucket] = {}

    def take(self, tenant: str) -> float:
        """0.0 when tenant may send this request now, else the seconds it must wait."""
        now = self.clock()
        bucket = self.buckets.get(tenant)
        if bucket is None:
            bucket = self.buckets[tenant] = TokenBucket(self.rate, self.burst, now)
        return bucket.take(now)

    @staticmethod
    def retry_after(wait_s: float) -> int:
        """Whole seconds for a Retry-After header (at least 1)."""
        return max(1, math.ceil(wait_s))

    def message(self, tenant: str, wait_s: float) -> str:
        """What a refused client is told."""
        who = f"tenant {tenant!r}" if tenant else "this API key's tenant"
        return (f"rate limit exceeded: {who} may send {self.rate * 60:g} requests a minute (bursts of "
                f"{self.burst}); retry after {self.retry_after(wait_s)} s")
