"""The llama scheduler makes room for online requests, without a model: in the fast mode an online
job preempts the batch line that generated least, which resumes where it stopped; in deterministic
mode the batch keeps a slot free instead."""

from __future__ import annotations

import threading
from collections import deque
from types import SimpleNamespace
from typing import Any

import pytest

pytest.importorskip("llama_cpp")

from overnight.engines.llama.sampling import Sampling
from overnight.engines.llama.scheduler import Job, Scheduler, Slot
from overnight.engines.stats import EmbeddedStats

GREEDY = Sampling(temperature=0, top_p=1, seed=None, presence_penalty=0, frequency_penalty=0)


def job(online: bool = False, prompt: list[int] | None = None) -> Job:
    # loop and future are untouched by the admission logic
    return Job(prompt=prompt or [1, 2], max_new=8, sampling=GREEDY, stops=(), deadline=float("inf"),
               loop=None, future=None, online=online)  # type: ignore[arg-type]


def scheduler(n_seq_max: int, batch_active: int, online_slot: bool = True, deterministic: bool = True) -> Any:
    """Slots, queues and the lock only: admission needs no native handles."""
    s = Scheduler.__new__(Scheduler)
    s.n_seq_max = n_seq_max
    s.online_slot = online_slot
    s.deterministic = deterministic
    s.prefix_sharing = not deterministic
    s.slots = [Slot(seq_id=i) for i in range(n_seq_max)]
    for i in range(batch_active):
        s.slots[i].job = job()
    s.online, s.queue, s.cond = deque(), deque(), threading.Condition()
    s.stats = EmbeddedStats(total_slots=n_seq_max)
    return s


# -- fast mode: preemption -------------------------------------------------------------------------


def test_the_fast_mode_batch_takes_every_slot() -> None:
    """A slot kept free for online requests cost a 64-line file a tail: its 64th line started only
    when the first one finished. The fast mode preempts instead, so the batch takes every slot."""
    s = scheduler(8, batch_active=7, deterministic=False)
    s.queue.append(last := job())
    assert s._next_job() is last


def running(s: Any, seq: int, prompt: list[int], generated: list[int], text: bytes) -> Job:
    """A batch line generating in slot `seq`: prompt + generated tokens, the last one not decoded yet."""
    slot = s.slots[seq]
    slot.job = line = job(prompt=prompt)
    slot.tokens, line.generated, line.text = [*prompt, *generated], list(generated), bytearray(text)
    slot.n_past = len(slot.tokens) - 1
    line.cached = 3
    return line


def test_an_online_job_preempts_the_batch_line_that_generated_least_and_it_resumes_where_it_stopped(
        monkeypatch: Any) -> None:
    import llama_cpp

    removed: list[tuple[int, int]] = []
    copied: list[tuple[int, int]] = []
    monkeypatch.setattr(llama_cpp, "llama_memory_seq_rm", lambda mem, seq, p0, p1: removed.append((seq, p0)))
    monkeypatch.setattr(llama_cpp, "llama_memory_seq_cp", lambda mem, src, dst, p0, p1: copied.append((src, dst)))
    s = scheduler(3, batch_active=0, deterministic=False)
    s.native = SimpleNamespace(memory=None, n_vocab=100)
    system = [7, 7, 7, 7, 7, 7, 7, 7, 7, 7]
    running(s, 0, [*system, 1], [50, 51, 52, 53], b"abcd")
    youngest = running(s, 1, [*system, 2], [60, 61], b"xy")
    running(s, 2, [*system, 3], [70, 71, 72], b"pqr")
    s.queue.append(waiting := job())
    s.submit(online := job(online=True, prompt=[9, 9, 9]))

    s._admit()

    # The online job took the slot of the line with the fewest generated tokens...
    assert s.slots[1].job is online and s.stats.preempted_sequences == 1
    # ...which waits at the front of the batch queue with what it had generated.
    assert list(s.queue) == [youngest, waiting]
    assert youngest.preempted and youngest.resume_tokens() == [*system, 2, 60, 61]
    assert youngest.generated == [60, 61] and bytes(youngest.text) == b"xy" and youngest.cached == 3
    # The others run on untouched.
    assert [s.slots[0].job.generated, s.slots[2].job.generated] == [[50, 51, 52, 53], [70, 71, 72]]

    # The online job finishes; the preempted line is readmitted first, reusing the longest prefix of a
    # free slot (the system prompt the online job's slot no longer holds is copied from another).
    s.slots[1].tokens, s.slots[1].n_past = [9, 9, 9, 80], 4
    s._release(s.slots[1])
    s._admit()
    slot = s.slots[1]
    assert slot.job is youngest and list(s.queue) == [waiting]
    assert slot.tokens == [*system, 2, 60, 61] and youngest.generated == [60, 61] and bytes(youngest.text) == b"xy"
    # Everything but the last generated token is prefilled again (or copied); that token is decoded
    # next and the line samples its third token from there.
    assert copied == [(0, 1)] and slot.n_past == len(system) and slot.received_copy
    assert youngest.cached == 3  # usage counts what its first admission reused


def test_a_line_with_a_copy_pending_is_not_preempted_and_no_online_job_no_preemption() -> None:
    s = scheduler(2, batch_active=2, deterministic=False)
    assert not s._preempt_for_online()  # nothing online waits
    s.submit(job(online=True))
    for slot in s.slots:
        slot.copy_source = True  # a cross-stream copy is carried out at the next decode
    assert not s._preempt_for_online()
    s.slots[1].copy_source = False
    assert s._preempt_for_online() and s.slots[1].job is None and s.slots[0].job is not None


@pytest.mark.parametrize("online_running", [0, 1])
def test_the_batch_keeps_one_line_running_whatever_the_online_traffic(online_running: int) -> None:
    """Online traffic slows the batch, never stops it: its last running line is not preempted."""
    s = scheduler(3, batch_active=0, deterministic=False)
    s.slots[0].job = job()
    for slot in s.slots[1:1 + online_running]:
        slot.job = job(online=True)
    s.submit(job(online=True))
    assert not s._preempt_for_online() and s.slots[0].job is not None


def test_deterministic_mode_never_preempts() -> None:
    """Recomputing a line's generated tokens in a prompt chunk would change its numerics."""
    s = scheduler(2, batch_active=2, deterministic=True)
    s.submit(job(online=True))
    assert not s._preempt_for_online()
    assert all(slot.job is not None for slot in s.slots)


# -- deterministic mode: a reserved slot ------------------------------------------------------------


def test_a_slot_stays_free_for_the_first_online_request_after_a_quiet_spell() -> None:
    """Deterministic mode cannot preempt: had the batch taken every slot, the first online request
    after a quiet spell waited for a batch line to finish (9-14 s at 64 slots in bench_online). The
    batch leaves one slot free, and one more per online job running."""
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
