"""Retry policy as a value: given what happened, it returns a decision; the engine just obeys."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

# Transient: the same request may well succeed later. Everything else (400, 401, 404, 422 ...) is
# the request's own fault and is reported once, with the upstream's status and body.
RETRYABLE_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})
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
        if status is not None and status not in RETRYABLE_STATUS:
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


def parse_retry_after(headers: dict[str, str] | object) -> float | None:
    """`retry-after-ms` (OpenAI's) or `Retry-After` in seconds; HTTP-dates are ignored."""
    get = getattr(headers, "get", None)
    if get is None:
        return None
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        value = get(name)
        if value:
            try:
                return float(value) * scale
            except ValueError:
                continue
    return None
