"""Per-key request rate limits: a token bucket per owner, answered with an OpenAI-shaped 429."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from overnight.batches.errors import OvernightError


class RateLimited(OvernightError):
    status_code = 429
    error_type = "requests"

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message, code="rate_limit_exceeded")
        self.headers = {"retry-after": str(max(1, math.ceil(retry_after)))}


class RateLimiter:
    """`per_minute` requests per owner, with bursts up to `burst`. 0 turns it off."""

    def __init__(self, per_minute: int, burst: int | None = None, clock: Callable[[], float] = time.monotonic):
        self.rate = per_minute / 60.0
        self.burst = float(burst if burst is not None else max(1, per_minute // 6))
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # owner -> (tokens, last refill)

    def check(self, owner: str) -> None:
        if self.rate <= 0:
            return
        now = self.clock()
        tokens, last = self._buckets.get(owner, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        if tokens < 1.0:
            self._buckets[owner] = (tokens, now)
            wait = (1.0 - tokens) / self.rate
            raise RateLimited(
                f"Rate limit reached for this API key: {int(self.rate * 60)} requests per minute. "
                f"Try again in {wait:.1f}s.",
                retry_after=wait,
            )
        self._buckets[owner] = (tokens - 1.0, now)
