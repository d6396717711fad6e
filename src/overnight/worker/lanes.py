"""One lane per engine: a fixed pool of sender tasks that drains a queue of lines from every running
shard. The pool is as large as the engine can usefully take at once (`Engine.max_in_flight`), so
senders never queue behind the engine's own limiter, and no task is created per line."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

from overnight.engines.port import Engine


class LineRunner(Protocol):
    async def run_line(self, index: int) -> None:
        """Run line `index`; must not raise."""
        ...


Job = tuple[LineRunner, int]  # a tuple, not a closure per line: cheaper on the hot path


class EngineLane:
    def __init__(self, engine: Engine, on_low: Callable[[], None], low_water: int) -> None:
        self.engine = engine
        self.size = max(1, engine.max_in_flight)
        self.low_water = low_water  # queued lines at which to ask for the next shard
        self._on_low = on_low
        self._pending: deque[Job] = deque()
        self._work = asyncio.Event()
        self._closed = False
        self._senders = [asyncio.create_task(self._sender()) for _ in range(self.size)]

    @property
    def backlog(self) -> int:
        return len(self._pending)

    def submit(self, jobs: list[Any]) -> None:
        self._pending.extend(jobs)
        self._work.set()

    async def _sender(self) -> None:
        while not self._closed:
            while self._pending and not self._closed:
                runner, index = self._pending.popleft()
                if len(self._pending) == self.low_water:  # running low: time to claim the next shard
                    self._on_low()
                await runner.run_line(index)
            self._work.clear()
            if not self._closed:
                await self._work.wait()

    async def close(self) -> None:
        """Stop the senders. Cancelling alone is not enough: a cancellation that arrives just as
        pyreqwest delivers a response is lost (the await returns the response; ~1% of cancels in
        a test of 12,800), and a sender that lost it would wait for work forever. So the lane is
        also marked closed, and such a sender stops after the line it is on."""
        self._closed = True
        self._work.set()
        for task in self._senders:
            task.cancel()
        for task in self._senders:
            with contextlib.suppress(asyncio.CancelledError):
                await task


class Lanes:
    """Lanes created on first use, inside the running event loop. `on_low` is called when a lane's
    queue runs low, so the worker claims the next shard before the senders run dry."""

    def __init__(self, on_low: Callable[[], None] = lambda: None) -> None:
        self._lanes: dict[int, EngineLane] = {}
        self.on_low = on_low
        self.ahead = 128  # lines to keep queued (see note_shard)

    def for_engine(self, engine: Engine) -> EngineLane:
        lane = self._lanes.get(id(engine))
        if lane is None:
            lane = self._lanes[id(engine)] = EngineLane(engine, self.on_low, self.ahead)
        return lane

    def note_shard(self, lines: int) -> None:
        """Keep a whole shard queued ahead (at least two rounds of every lane's senders): reading
        and parsing the next shard takes several milliseconds, in which two rounds of a fast
        upstream's senders ran dry (~14 times in a 50-shard batch). A crash still redoes at most
        the shards held, about two."""
        capacity = sum(lane.size for lane in self._lanes.values()) or 64
        self.ahead = max(2 * capacity, lines)
        for lane in self._lanes.values():
            lane.low_water = self.ahead

    def wants_more(self, unsubmitted: int) -> bool:
        """Whether queued lines (plus claimed ones not yet queued) are at most `ahead`."""
        return sum(lane.backlog for lane in self._lanes.values()) + unsubmitted <= self.ahead

    async def close(self) -> None:
        for lane in self._lanes.values():
            await lane.close()
        self._lanes.clear()
