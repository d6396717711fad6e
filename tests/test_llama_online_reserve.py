"""The llama scheduler keeps a slot free for online requests, without a model."""

from __future__ import annotations

import threading
from collections import deque
from typing import Any

import pytest

pytest.importorskip("llama_cpp")

from overnight.engines.llama.sampling import Sampling
from overnight.engines.llama.scheduler import Job, Scheduler, Slot

GREEDY = Sampling(temperature=0, top_p=1, seed=None, presence_penalty=0, frequency_penalty=0)


def job(online: bool = False) -> Job:
    # loop and future are untouched by the admission logic
    return Job(prompt=[1, 2], max_new=8, sampling=GREEDY, stops=(), deadline=0.0, loop=None,  # type: ignore[arg-type]
               future=None, online=online)  # type: ignore[arg-type]


def scheduler(n_seq_max: int, batch_active: int, online_slot: bool = True) -> Any:
    """Slots, queues and the lock only: admission needs no native handles."""
    s = Scheduler.__new__(Scheduler)
    s.n_seq_max = n_seq_max
    s.online_slot = online_slot
    s.slots = [Slot(seq_id=i) for i in range(n_seq_max)]
    for i in range(batch_active):
        s.slots[i].job = job()
    s.online, s.queue, s.cond = deque(), deque(), threading.Condition()
    return s


def test_a_slot_stays_free_for_the_first_online_request_after_a_quiet_spell() -> None:
    """Running batch lines are never evicted: had the batch taken every slot, the first online
    request after a quiet spell waited for a batch line to finish (9-14 s at 64 slots in
    bench_online). The batch leaves one slot free, and one more per online job running."""
    s = scheduler(8, batch_active=6)
    s.queue.extend([first := job(), job()])
    assert s._next_job() is first
    s.slots[6].job = first
    assert s._next_job() is None  # 7 of 8: the last slot is the online requests'
    s.submit(online := job(online=True))
    assert s._next_job() is online
    s.slots[7].job = online
    s.slots[5].job = None  # a line finished: with an online job running, the batch keeps to 6
    assert s._next_job() is None
    s.slots[7].job = None  # the online job finished: 6 batch lines < 8 - 1
    assert s._next_job() is not None


def test_a_run_nobody_can_send_online_requests_to_takes_every_slot() -> None:
    """`overnight run` (online_slot off): no slot idles waiting for an online request."""
    s = scheduler(8, batch_active=7, online_slot=False)
    s.queue.append(batch := job())
    assert s._next_job() is batch


@pytest.mark.parametrize("n_seq_max", [1, 2])
def test_online_traffic_slows_the_batch_but_never_stops_it(n_seq_max: int) -> None:
    """The batch keeps one slot whatever the reserve. Before, one slot and an online reserve
    held every batch line back for 30 s while the engine idled (the decode thread
    spinning: work queued, none admitted), and on two slots an active online job stopped the batch."""
    s = scheduler(n_seq_max, batch_active=0)
    s.queue.append(batch := job())
    assert s._next_job() is batch
    s = scheduler(n_seq_max, batch_active=0)
    s.slots[0].job = job(online=True)
    s.queue.append(batch := job())
    assert s._next_job() is batch
    s.slots[-1].job = batch
    s.queue.append(job())
    assert s._next_job() is None  # it keeps one slot, not more
