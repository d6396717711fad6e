"""The limiter's two lanes: online requests go ahead of queued batch requests, and each online
request in flight takes one slot from the batch lane, never its last."""

from __future__ import annotations

import asyncio

from overnight.engines.limiter import AdaptiveLimiter


async def _started(limiter: AdaptiveLimiter, online: bool, log: list[str], name: str) -> None:
    await limiter.acquire(online=online)
    log.append(name)


def test_online_requests_go_ahead_of_queued_batch_requests() -> None:
    async def scenario() -> list[str]:
        limiter = AdaptiveLimiter(initial=2, minimum=1, maximum=2)
        for _ in range(2):
            await limiter.acquire()  # the batch holds both slots
        log: list[str] = []
        tasks = [asyncio.create_task(_started(limiter, False, log, f"batch{i}")) for i in range(3)]
        await asyncio.sleep(0)
        tasks.append(asyncio.create_task(_started(limiter, True, log, "online")))
        await asyncio.sleep(0)
        assert log == []
        limiter.release()  # a batch request ends: its slot goes to the online request, queued last
        await asyncio.sleep(0)
        assert limiter.online_in_flight == 1 and limiter.in_flight == 2
        limiter.release()  # the batch lane's allowance is now 2 - 1 = 1, and it has none in flight
        await asyncio.sleep(0)
        for task in tasks:
            task.cancel()
        return log

    assert asyncio.run(scenario()) == ["online", "batch0"]


def test_batch_allowance_shrinks_per_online_request_but_never_below_one_and_within_the_limit() -> None:
    """The batch's last slot is within the limit: online requests that find no batch work take
    every slot, a batch request then waits for the first to end, and while it runs the online lane
    leaves it that one. (It used to take a slot above the limit: an upstream admitting exactly
    `max_concurrency` answered 429.)"""
    async def scenario() -> None:
        limiter = AdaptiveLimiter(initial=4, minimum=1, maximum=4)
        assert limiter.batch_allowed == 4
        for expected in (3, 2, 1, 1):
            await limiter.acquire(online=True)
            assert limiter.batch_allowed == expected
        assert limiter.online_in_flight == 4
        batch = asyncio.create_task(limiter.acquire())
        online = asyncio.create_task(limiter.acquire(online=True))
        await asyncio.sleep(0)
        assert not batch.done() and not online.done() and limiter.in_flight == 4
        limiter.release(online=True)  # the freed slot is the batch's one, not the waiting user's
        await asyncio.sleep(0)
        assert batch.done() and not online.done() and limiter.in_flight == 4 and limiter.peak_in_flight == 4
        limiter.release(online=True)
        await asyncio.sleep(0)
        assert online.done() and limiter.online_in_flight == 3 and limiter.in_flight == 4
        for _ in range(3):
            limiter.release(online=True)
        limiter.release()
        assert limiter.batch_allowed == 4 and limiter.in_flight == 0

    asyncio.run(scenario())


def test_an_online_request_goes_where_the_batch_share_is_zero() -> None:
    async def scenario() -> None:
        limiter = AdaptiveLimiter(initial=4, minimum=1, maximum=4)
        limiter.set_ceiling(0)  # other workers hold the whole budget for batches
        assert limiter.batch_allowed == 0
        await asyncio.wait_for(limiter.acquire(online=True), 1)
        batch = asyncio.create_task(limiter.acquire())
        await asyncio.sleep(0.01)
        assert not batch.done()
        batch.cancel()

    asyncio.run(scenario())


def test_a_free_batch_slot_is_taken_at_once_and_a_full_lane_is_refused() -> None:
    limiter = AdaptiveLimiter(2, 1, 2)
    assert limiter.try_take_batch() and limiter.try_take_batch()
    assert not limiter.try_take_batch()  # full: the caller waits in `acquire` instead
    assert limiter.in_flight == 2
    limiter.release()
    assert limiter.try_take_batch() and limiter.in_flight == 2
