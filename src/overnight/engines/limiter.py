"""Adaptive concurrency: additive increase while the upstream is healthy, multiplicative decrease
when it signals overload (429/503/timeouts), between a floor and a ceiling."""

from __future__ import annotations

import asyncio
import time
from collections import deque


class AdaptiveLimiter:
    def __init__(self, initial: int, minimum: int, maximum: int, decrease_factor: float = 0.5) -> None:
        if not 1 <= minimum <= maximum:
            raise ValueError("need 1 <= minimum <= maximum")
        self.minimum = minimum
        self.maximum = maximum
        self.limit = float(min(max(initial, minimum), maximum))
        self.in_flight = 0
        self.peak_in_flight = 0
        self._decrease_factor = decrease_factor
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._last_decrease = 0.0

    async def acquire(self) -> None:
        if self.in_flight < int(self.limit) and not self._waiters:
            self._take()
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(future)
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release()  # we were handed a slot but nobody will use it
            else:
                self._waiters.remove(future)
            raise

    def _take(self) -> None:
        self.in_flight += 1
        if self.in_flight > self.peak_in_flight:
            self.peak_in_flight = self.in_flight

    def release(self) -> None:
        self.in_flight -= 1
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self.in_flight < int(self.limit):
            future = self._waiters.popleft()
            if not future.done():
                self._take()
                future.set_result(None)

    def on_success(self) -> None:
        # +1 per `limit` successes: one step per round trip of the whole window.
        if self.limit < self.maximum:
            self.limit = min(self.maximum, self.limit + 1.0 / self.limit)
            self._wake()

    def on_overload(self) -> None:
        # One decrease per burst: the requests already in flight when overload began report it too.
        now = time.monotonic()
        if now - self._last_decrease < 0.2:
            return
        self._last_decrease = now
        self.limit = max(float(self.minimum), self.limit * self._decrease_factor)
