"""The llama scheduler makes room for online requests, without a model: an online job preempts the
batch line that generated least, which resumes where it stopped (in both modes: a deterministic line
is recomputed to the same numbers, tests/test_embedded_engines.py)."""

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


def scheduler(n_seq_max: int, batch_active: int) -> Any:
    """Slots, queues and the lock only: admission needs no native handles."""
    s = Scheduler.__new__(Scheduler)
    s.prefix_sharing = True
    s.slots = [Slot(seq_id=i) for i in range(n_seq_max)]
    for i in range(batch_active):
        s.slots[i].job = job()
    s.online, s.queue, s.cond = deque(), deque(), threading.Condition()
    s.stats = EmbeddedStats(total_slots=n_seq_max)
    return s


def test_the_batch_takes_every_slot() -> None:
    """A slot kept free for online requests cost a 64-line file a tail: its 64th line started only
    when the first one finished. Online jobs preempt instead, so the batch takes every slot."""
    s = scheduler(8, batch_active=7)
    s._place = lambda line, free: setattr(free[0], "job", line)  # admission only: no KV to set up
    s.queue.extend([last := job(), job()])
    s._admit()
    assert s.slots[7].job is last and len(s.queue) == 1  # the 8th slot taken, no more


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
    s = scheduler(3, batch_active=0)
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
    s = scheduler(2, batch_active=2)
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
    s = scheduler(3, batch_active=0)
    s.slots[0].job = job()
    for slot in s.slots[1:1 + online_running]:
        slot.job = job(online=True)
    s.submit(job(online=True))
    assert not s._preempt_for_online() and s.slots[0].job is not None
