"""A lane's senders stop on close even when a cancellation is lost, as it is when it arrives
just as pyreqwest hands back a response (the await then returns instead of raising)."""

from __future__ import annotations

import asyncio

from overnight.worker.lanes import EngineLane


class TwoAtATime:
    name = "double"
    max_in_flight = 2


class LineThatSwallowsCancellation:
    def __init__(self) -> None:
        self.started = 0
        self.finished = 0
        self.running = asyncio.Event()

    async def run_line(self, index: int) -> None:
        self.started += 1
        self.running.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            if index >= 2:
                raise  # (only the first two lose it, so a regression fails instead of hanging)
            # the response "arrived" as the cancellation did: the await returned normally
        self.finished += 1


def test_close_stops_senders_whose_cancellation_was_lost() -> None:
    async def scenario() -> LineThatSwallowsCancellation:
        lane = EngineLane(TwoAtATime(), on_low=lambda: None, low_water=0)  # type: ignore[arg-type]
        runner = LineThatSwallowsCancellation()
        lane.submit([(runner, i) for i in range(10)])
        await runner.running.wait()
        await asyncio.sleep(0)  # the second sender picks its line too
        closing = asyncio.create_task(lane.close())
        await asyncio.wait({closing}, timeout=5)
        assert closing.done(), "close() is still waiting for a sender that lost its cancellation"
        return runner

    runner = asyncio.run(scenario())
    assert runner.started == 2 and runner.finished == 2  # the lines in progress; none of the queued 8


def test_queued_lines_run_in_order_across_senders() -> None:
    async def scenario() -> list[int]:
        order: list[int] = []

        class Recorder:
            async def run_line(self, index: int) -> None:
                order.append(index)
                await asyncio.sleep(0)

        lane = EngineLane(TwoAtATime(), on_low=lambda: None, low_water=0)  # type: ignore[arg-type]
        lane.submit([(Recorder(), i) for i in range(6)])
        for _ in range(100):  # bounded
            if len(order) == 6:
                break
            await asyncio.sleep(0.001)
        await lane.close()
        return order

    assert asyncio.run(scenario()) == list(range(6))
