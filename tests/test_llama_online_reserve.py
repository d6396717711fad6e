"""The llama scheduler keeps a slot for online requests a while after one arrived, without a model."""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any

import pytest

pytest.importorskip("llama_cpp")

from overnight.engines.llama.sampling import Sampling
from overnight.engines.llama.scheduler import ONLINE_RESERVE_SECONDS, Job, Scheduler, Slot

GREEDY = Sampling(temperature=0, top_p=1, seed=None, presence_penalty=0, frequency_penalty=0)


def job(online: bool = False) -> Job:
    # loop and future are untouched by the admission logic
    return Job(prompt=[1, 2], max_new=8, sampling=GREEDY, stops=(), deadline=0.0, loop=None,  # type: ignore[arg-type]
               future=None, online=online)  # type: ignore[arg-type]


def scheduler(n_seq_max: int, batch_active: int) -> Any:
    """Slots, queues and the lock only: admission needs no native handles."""
    s = Scheduler.__new__(Scheduler)
    s.n_seq_max = n_seq_max
    s.slots = [Slot(seq_id=i) for i in range(n_seq_max)]
    for i in range(batch_active):
        s.slots[i].job = job()
    s.online, s.queue, s.cond = deque(), deque(), threading.Condition()
    return s


def test_the_reserve_outlasts_online_requests_for_a_while() -> None:
    """Interactive users pause between requests: for ONLINE_RESERVE_SECONDS after an online request
    arrived, the batch still leaves one slot free, so the user's next request finds it."""
    s = scheduler(8, batch_active=7)
    s.queue.append(batch := job())
    assert s._next_job() is batch  # no online traffic yet: the batch takes every slot
    s = scheduler(8, batch_active=7)
    s.submit(online := job(online=True))
    assert s._next_job() is online
    s.queue.append(batch := job())
    assert s._next_job() is None  # no online job active, but one arrived a moment ago
    s.slots[6].job = None  # a line finished: 6 batch lines < 8 - 1, the batch takes the slot
    assert s._next_job() is batch
    s = scheduler(8, batch_active=7)
    s.last_online = time.monotonic() - ONLINE_RESERVE_SECONDS - 1
    s.queue.append(batch := job())
    assert s._next_job() is batch  # after a quiet spell the batch takes every slot again


@pytest.mark.parametrize("n_seq_max", [1, 2])
def test_online_traffic_slows_the_batch_but_never_stops_it(n_seq_max: int) -> None:
    """The batch keeps one slot whatever the reserve. Before, one slot and a recent online request
    held every batch line back for ONLINE_RESERVE_SECONDS while the engine idled (the decode thread
    spinning: work queued, none admitted), and on two slots an active online job stopped the batch."""
    s = scheduler(n_seq_max, batch_active=0)
    s.last_online = time.monotonic()
    s.queue.append(batch := job())
    assert s._next_job() is batch
    s = scheduler(n_seq_max, batch_active=0)
    s.slots[0].job = job(online=True)
    s.last_online = time.monotonic()
    s.queue.append(batch := job())
    assert s._next_job() is batch
    s.slots[-1].job = batch
    s.queue.append(job())
    assert s._next_job() is None  # it keeps one slot, not more
