"""Adaptive concurrency: additive increase while the upstream is healthy, multiplicative decrease
when it signals overload (429/503/timeouts), between a floor and a ceiling. The ceiling is this
process's share of the upstream's maximum (workers on every machine split it between them)."""

from __future__ import annotations

import asyncio
from collections import deque


class AdaptiveLimiter:
    def __init__(self, initial: int, minimum: int, maximum: int, decrease_factor: float = 0.5) -> None:
        if not 1 <= minimum <= maximum:
            raise ValueError("need 1 <= minimum <= maximum")
        self.minimum = minimum
        self.maximum = maximum
        self.limit = float(min(max(initial, minimum), maximum))
        self.ceiling = maximum  # this process's share of `maximum`; 0 sends nothing for now
        self.in_flight = 0
        self.peak_in_flight = 0
        self._decrease_factor = decrease_factor
        self._waiters: deque[asyncio.Future[None]] = deque()
        # Bumped at each decrease. A request remembers the epoch it started in, so the burst of
        # failures from one overloaded window causes one decrease, not one per request.
        self.epoch = 0

    async def acquire(self) -> int:
        """Wait for a slot; returns the epoch to pass to `on_overload`."""
        if self.in_flight < self.allowed and not self._waiters:
            self._take()
            return self.epoch
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(future)
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release()  # we were handed a slot but nobody will use it
            elif future in self._waiters:  # (_wake may already have dropped a cancelled waiter)
                self._waiters.remove(future)
            raise
        return self.epoch

    def _take(self) -> None:
        self.in_flight += 1
        if self.in_flight > self.peak_in_flight:
            self.peak_in_flight = self.in_flight

    def release(self) -> None:
        self.in_flight -= 1
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self.in_flight < self.allowed:
            future = self._waiters.popleft()
            if not future.done():
                self._take()
                future.set_result(None)

    @property
    def allowed(self) -> int:
        """Requests that may be in flight now."""
        return min(int(self.limit), self.ceiling)

    def set_ceiling(self, ceiling: int) -> None:
        """Cap concurrency at this process's share. Requests in flight above a lowered ceiling
        finish; no new one starts until the count is below it."""
        self.ceiling = max(0, min(ceiling, self.maximum))
        self._wake()

    def on_success(self) -> None:
        # +1 per `limit` successes: one step per round trip of the whole window.
        if self.limit < self.maximum:
            self.limit = min(self.maximum, self.limit + 1.0 / self.limit)
            self._wake()

    def on_overload(self, started_epoch: int) -> None:
        if started_epoch != self.epoch:
            return  # this window was already answered by a decrease
        self.epoch += 1
        self.limit = max(float(self.minimum), self.limit * self._decrease_factor)
