"""Adaptive concurrency: additive increase while the upstream is healthy (doubling per round trip
until its first overload signal), multiplicative decrease when it signals overload (429/503/timeouts),
between a floor and a ceiling. The ceiling is this
process's share of the upstream's maximum (workers on every machine split it between them).

Two lanes share the limit. Online requests (someone is waiting for the answer) take a slot ahead
of waiting batch requests, and each online request in flight shrinks the batch lane's allowance
by one, down to one: a running batch then gives way to interactive users within one batch
request's time instead of keeping every slot, and still makes progress while they are there.
That one slot is within the limit: while batch requests run or wait, online requests take at most
all slots but one (with a limit of 1 the lanes take turns).
"""

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
        self.ceiling = maximum  # this process's share of `maximum`; 0 sends no batch request for now
        self.in_flight = 0  # both lanes
        self.online_in_flight = 0
        self.peak_in_flight = 0
        self._decrease_factor = decrease_factor
        self._waiters: deque[asyncio.Future[None]] = deque()  # batch requests
        self._online_waiters: deque[asyncio.Future[None]] = deque()
        # Bumped at each decrease. A request remembers the epoch it started in, so the burst of
        # failures from one overloaded window causes one decrease, not one per request.
        self.epoch = 0

    async def acquire(self, online: bool = False) -> int:
        """Wait for a slot in the lane; returns the epoch to pass to `on_overload`."""
        if online:
            if self._online_may_start() and not self._online_waiters:
                self._take(True)
                return self.epoch
            return await self._wait(self._online_waiters, True)
        if self._batch_may_start() and not self._waiters:
            self._take(False)
            return self.epoch
        return await self._wait(self._waiters, False)

    def try_take_batch(self) -> bool:
        """Take a batch slot if one is free now, without a coroutine or a future: the common case
        on the hot path (one call per line), where `acquire` would cost a coroutine frame."""
        if self._batch_may_start() and not self._waiters:
            self._take(False)
            return True
        return False

    async def _wait(self, waiters: deque[asyncio.Future[None]], online: bool) -> int:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiters.append(future)
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release(online)  # we were handed a slot but nobody will use it
            elif future in waiters:  # (_wake may already have dropped a cancelled waiter)
                waiters.remove(future)
            raise
        return self.epoch

    def _take(self, online: bool) -> None:
        self.in_flight += 1
        if online:
            self.online_in_flight += 1
        if self.in_flight > self.peak_in_flight:
            self.peak_in_flight = self.in_flight

    def release(self, online: bool = False) -> None:
        self.in_flight -= 1
        if online:
            self.online_in_flight -= 1
        self._wake()

    def _wake(self) -> None:
        # Online first: a batch request never takes a slot an online request is waiting for.
        while self._online_waiters and self._online_may_start():
            self._hand_slot(self._online_waiters.popleft(), True)
        # Online waiters left now cannot take a slot (the batch's last one is not theirs).
        while self._waiters and self._batch_may_start():
            self._hand_slot(self._waiters.popleft(), False)

    def _hand_slot(self, future: asyncio.Future[None], online: bool) -> None:
        if not future.done():
            self._take(online)
            future.set_result(None)

    @property
    def allowed(self) -> int:
        """Requests that may be in flight now (both lanes)."""
        return min(int(self.limit), self.ceiling)

    @property
    def batch_allowed(self) -> int:
        """Batch requests that may be in flight now: the limit less the online requests in flight,
        never below one (a batch keeps moving) unless the limit itself is 0."""
        allowed = self.allowed
        return max(min(allowed, 1), allowed - self.online_in_flight)

    def _online_may_start(self) -> bool:
        allowed = self.allowed
        if allowed == 0:  # this process's share is 0 (other workers hold the whole budget for
            return self.in_flight == 0  # batches): an online request still goes, someone waits for it
        if self.in_flight >= allowed:
            return False
        # While batch requests run or wait, online ones leave them one slot (module doc).
        batch_waits = bool(self._waiters) or self.in_flight > self.online_in_flight
        return allowed < 2 or not batch_waits or self.online_in_flight < allowed - 1

    def _batch_may_start(self) -> bool:
        return self.in_flight < self.allowed and self.in_flight - self.online_in_flight < self.batch_allowed

    def set_ceiling(self, ceiling: int) -> None:
        """Cap concurrency at this process's share. Requests in flight above a lowered ceiling
        finish; no new one starts until the count is below it. The limit does not stay above the
        share: an overload would otherwise halve a limit that `allowed` does not use."""
        self.ceiling = max(0, min(ceiling, self.maximum))
        self.limit = min(self.limit, float(self._cap))
        self._wake()

    @property
    def _cap(self) -> int:
        """How high the limit may grow: the maximum, or this process's share of it."""
        return max(self.minimum, min(self.ceiling, self.maximum))

    def on_success(self) -> None:
        # Until the upstream first signals overload, +1 per success: the limit doubles every round
        # trip of the whole window (TCP's slow start). Additive from 16 to 64 took ~1,900 requests,
        # so a fresh server's first batches ran at a quarter of the concurrency it was allowed (a
        # 1,000-line batch in ~150 ms instead of ~90; on a provider 200 ms away, ~10 s of ramp).
        # After an overload, +1 per `limit` successes: one step per round trip of the window.
        if self.limit < self._cap:
            step = 1.0 if self.epoch == 0 else 1.0 / self.limit
            self.limit = min(self._cap, self.limit + step)
            self._wake()

    def on_overload(self, started_epoch: int) -> None:
        if started_epoch != self.epoch:
            return  # this window was already answered by a decrease
        self.epoch += 1
        self.limit = max(float(self.minimum), self.limit * self._decrease_factor)
