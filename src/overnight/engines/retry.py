"""Retry policy as a value: given what happened, it returns a decision; the engine just obeys."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime

# Transient: the same request may well succeed later - these and every 5xx (a proxy's 520-524 as
# much as 500-504), as the OpenAI SDK retries them. Everything else (400, 401, 404, 422 ...) is the
# request's own fault and is reported once, with the upstream's status and body.
RETRYABLE_STATUS = frozenset({408, 409, 429})
# Signals that the upstream is overloaded: the adaptive limiter backs off on these.
OVERLOAD_STATUS = frozenset({429, 503, 504})


@dataclass(frozen=True, slots=True)
class RetryDecision:
    retry: bool
    delay: float = 0.0


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_attempts: int = 8
    base_delay: float = 0.5
    max_delay: float = 30.0
    rng: random.Random = field(default_factory=random.Random, compare=False)

    def decide(
        self,
        attempt: int,
        status: int | None,
        retry_after: float | None,
        now: float,
        deadline: float,
    ) -> RetryDecision:
        """`attempt` is the 1-based attempt that just failed; `status` None means no response
        (connection error, reset, timeout), which is always transient."""
        if status is not None and status < 500 and status not in RETRYABLE_STATUS:
            return RetryDecision(False)
        if attempt >= self.max_attempts:
            return RetryDecision(False)
        if retry_after is not None:
            delay = max(0.0, retry_after)
        else:  # full jitter: spreads a burst of failures instead of re-synchronising it
            delay = self.rng.uniform(0, min(self.max_delay, self.base_delay * 2 ** (attempt - 1)))
        if now + delay >= deadline:
            return RetryDecision(False)
        return RetryDecision(True, delay)


def parse_retry_after(headers: dict[str, str] | object, now: float | None = None) -> float | None:
    """`retry-after-ms` (OpenAI's) or `Retry-After`, in seconds or as an HTTP-date (RFC 9110)."""
    get = getattr(headers, "get", None)
    if get is None:
        return None
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        value = get(name)
        if value:
            try:
                return float(value) * scale
            except ValueError:
                pass
            if scale == 1.0:
                try:
                    when = parsedate_to_datetime(value).timestamp()
                except (TypeError, ValueError, IndexError, OverflowError):
                    continue
                return max(0.0, when - (time.time() if now is None else now))
    return None
