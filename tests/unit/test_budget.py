"""Splitting an upstream's max_concurrency between workers: shares add up to the maximum, a
joining worker waits for the others to shrink, and membership runs on the database's clock."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from overnight.engines.limiter import AdaptiveLimiter
from overnight.store.sql import SqlStore
from overnight.worker.budget import Standing, apply_shares, share_of


@pytest.mark.parametrize("maximum", [1, 6, 7, 64])
@pytest.mark.parametrize("count", [1, 2, 3, 5])
def test_shares_add_up_to_the_maximum(maximum: int, count: int) -> None:
    shares = [share_of(maximum, rank, count) for rank in range(count)]
    assert sum(shares) == max(maximum, count)  # one each at least, when workers outnumber the maximum
    assert max(shares) - min(shares) <= 1


class Budgeted:
    def __init__(self, maximum: int) -> None:
        self.max_in_flight = maximum
        self.share: int | None = None

    def set_share(self, share: int) -> None:
        self.share = share


def test_a_joining_worker_sends_nothing_until_the_others_have_shrunk() -> None:
    engine, local = Budgeted(8), object()  # an engine without a shared budget is left alone
    apply_shares([engine, local], rank=2, count=3, joined_seconds_ago=0.5, settle_seconds=2.5)
    assert engine.share == 0
    apply_shares([engine, local], rank=2, count=3, joined_seconds_ago=3.0, settle_seconds=2.5)
    assert engine.share == 2
    apply_shares([engine], rank=0, count=1, joined_seconds_ago=0.0, settle_seconds=2.5)
    assert engine.share == 8  # alone: the whole budget at once
    apply_shares([engine], rank=0, count=2, joined_seconds_ago=0.0, settle_seconds=2.5)
    assert engine.share == 4  # the oldest of workers that start together does not wait


def test_a_worker_that_cannot_learn_its_standing_stops_sending_before_the_others_take_its_share() -> None:
    """Its membership heartbeat failing, a worker kept its share (or at start the whole maximum)
    while the others, no longer seeing it, took its share too: the upstream got more than its
    max_concurrency in total."""
    now = [100.0]
    standing, engine = Standing(stale_after=7.5, clock=lambda: now[0]), Budgeted(8)
    engine.share = 8  # as an engine starts: its whole maximum
    standing.unknown([engine])
    assert engine.share == 0  # never learned: nothing
    standing.learned([engine], rank=0, count=2, joined_seconds_ago=60, settle_seconds=2.5)
    assert engine.share == 4
    now[0] += 5
    standing.unknown([engine])
    assert engine.share == 4  # a failed heartbeat or two: the others still count it
    now[0] += 3
    standing.unknown([engine])
    assert engine.share == 0  # they may have taken its share by now


def test_a_lowered_ceiling_holds_new_requests_until_in_flight_drops_below_it() -> None:
    async def scenario() -> list[int]:
        limiter = AdaptiveLimiter(initial=4, minimum=1, maximum=4)
        for _ in range(4):
            await limiter.acquire()
        limiter.set_ceiling(2)
        waiting = asyncio.ensure_future(limiter.acquire())
        seen = []
        for _ in range(3):
            await asyncio.sleep(0)
            limiter.release()
            await asyncio.sleep(0)
            seen.append(limiter.in_flight)
        await waiting
        return seen

    # 4 in flight, ceiling 2: releases go 3, 2, then the waiter is admitted only below 2 (1 -> 2)
    assert asyncio.run(scenario()) == [3, 2, 2]


def test_membership_ranks_live_workers_by_start_and_drops_stale_ones(tmp_path: Path) -> None:
    store = SqlStore(f"sqlite:///{tmp_path / 'db.sqlite'}")
    store.migrate()
    members = store.membership
    for worker in ("first", "second", "third"):
        members.join(worker)
        time.sleep(0.01)
    assert [members.standing(w, 15)[:2] for w in ("first", "second", "third")] == [(0, 3), (1, 3), (2, 3)]
    members.leave("second")
    assert members.standing("third", 15)[:2] == (1, 2)
    # a worker not seen for longer than alive_seconds no longer counts (it died)
    assert members.standing("first", 15, now=time.time() + 60)[:2] == (0, 1)
    store.close()
