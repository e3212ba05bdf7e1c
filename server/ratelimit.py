"""Per-principal token buckets (submit rate limits), in memory, per server process."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from server.domain import ResourceExhausted


@dataclass
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    """`rate` actions per second per key, with bursts up to `burst`. rate <= 0: unlimited.

    Buckets of keys idle long enough to be full again are forgotten, so memory stays bounded by
    the number of recently active principals."""

    def __init__(
        self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate = rate
        self.burst = max(1, burst)
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}
        self._last_prune = clock()

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def acquire(self, key: str, what: str = "requests") -> None:
        """Take one token for `key`, or raise ResourceExhausted with the wait before the next."""
        if not self.enabled:
            return
        now = self._clock()
        self._prune(now)
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = _Bucket(float(self.burst), now)
        bucket.tokens = min(float(self.burst), bucket.tokens + (now - bucket.updated) * self.rate)
        bucket.updated = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return
        wait = (1.0 - bucket.tokens) / self.rate
        raise ResourceExhausted(
            f"rate limit: {key} may send {self.rate:g} {what} per second (bursts of "
            f"{self.burst}); retry in {int(wait * 1000) + 1} ms",
            retry_after_seconds=wait,
        )

    def _prune(self, now: float) -> None:
        refill = self.burst / self.rate
        if now - self._last_prune < refill:
            return
        self._last_prune = now
        idle = [k for k, b in self._buckets.items() if now - b.updated >= refill]
        for key in idle:
            del self._buckets[key]
