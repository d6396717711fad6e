"""The llama scheduler's pure logic, without a model: streaming hold-back, online admission, what
each decode call holds, and compaction of generating slots."""

from __future__ import annotations

from collections import deque
from types import SimpleNamespace
from typing import Any

import pytest

pytest.importorskip("llama_cpp")

from overnight.engines.llama.sampling import Sampling
from overnight.engines.llama.scheduler import Job, Scheduler, Slot

GREEDY = Sampling(temperature=0, top_p=1, seed=None, presence_penalty=0, frequency_penalty=0)


def job(online: bool = False, stops: tuple[bytes, ...] = (), pieces: list[str] | None = None) -> Job:
    on_text = pieces.append if pieces is not None else None
    # loop and future are untouched by the logic under test
    return Job(prompt=[1, 2], max_new=8, sampling=GREEDY, stops=stops, deadline=0.0, loop=None,  # type: ignore[arg-type]
               future=None, online=online, on_text=on_text)  # type: ignore[arg-type]


def test_streaming_holds_back_stop_prefixes_and_partial_utf8() -> None:
    pieces: list[str] = []
    line = job(stops=(b"END", b"\n\n"), pieces=pieces)
    emitted: list[str] = []

    def add(data: bytes) -> None:
        line.text += data
        line.emit(final=False)
        emitted.append("".join(pieces))

    add(b"caf")
    add("é".encode()[:1])  # half of a two-byte character: held back
    add("é".encode()[1:] + b" E")  # 'E' may start 'END': held back
    add(b"N")
    add(b"X\n")  # 'ENX' is no stop any more; '\n' may start '\n\n'
    assert emitted == ["caf", "caf", "café ", "café ", "café ENX"]
    line.text += b"\n\nrest"  # the stop string arrives: the scheduler cuts the text there
    del line.text[line.text.find(b"\n\n"):]
    line.emit(final=True)
    assert "".join(pieces) == "café ENX" == bytes(line.text).decode()


def test_streaming_matches_a_whole_decode_of_invalid_bytes() -> None:
    pieces: list[str] = []
    line = job(pieces=pieces)
    for byte in b"a\xe2\x82b\xff\xf0\x9f\x98":  # broken sequences, then a truncated emoji
        line.text.append(byte)
        line.emit(final=False)
    line.emit(final=True)
    assert "".join(pieces) == bytes(line.text).decode("utf-8", errors="replace")


def scheduler(n_seq_max: int, online_active: int, batch_active: int) -> Any:
    """A scheduler with slots and queues only (admission logic needs no native handles)."""
    s = Scheduler.__new__(Scheduler)
    s.slots = [Slot(seq_id=i) for i in range(n_seq_max)]
    for i in range(online_active + batch_active):
        s.slots[i].job = job(online=i < online_active)
    s.online, s.queue = deque(), deque()
    return s


def test_online_jobs_go_first_and_the_batch_takes_every_slot() -> None:
    """Pending online jobs are admitted before the batch's; the batch is admitted into the last free
    slot too (online jobs preempt a batch line instead: test_llama_online_priority.py)."""
    import threading

    s = scheduler(8, online_active=1, batch_active=5)
    s.cond = threading.Condition()
    s._place = lambda line, free: setattr(free[0], "job", line)  # admission only: no KV to set up
    for line in (first_batch := job(), last_batch := job(), job()):
        line.deadline = float("inf")
        s.queue.append(line)
    s.online.append(online := job(online=True))
    online.deadline = float("inf")
    s._admit()
    # queued after the batch jobs, admitted before them; then the batch into the 8th slot too
    assert [slot.job for slot in s.slots[6:]] == [online, first_batch]
    s.slots[6].job = None  # the online job finished: its slot goes to the batch
    s._admit()
    assert s.slots[6].job is last_batch and len(s.queue) == 1


class FakeBatch:
    """The fields of a llama_batch the scheduler writes."""

    def __init__(self, size: int) -> None:
        self.token, self.pos, self.n_seq_id, self.logits = [0] * size, [0] * size, [0] * size, [False] * size
        self.seq_id = [[0] for _ in range(size)]
        self.n_tokens = 0


def stepping_scheduler() -> tuple[Any, list[list[tuple[int, int]]]]:
    """3 generating slots and 2 admitted 400-token prompts; `_decode` records what each call holds."""
    import threading

    from overnight.engines.stats import EmbeddedStats

    s = scheduler(5, online_active=0, batch_active=5)
    s.prefix_sharing = False
    s.native = SimpleNamespace(n_batch=2048, batch=FakeBatch(2048))
    s.cond, s.stats = threading.Condition(), EmbeddedStats(total_slots=5)
    for slot in s.slots[:3]:
        slot.tokens, slot.n_past = list(range(31)), 30  # one token to decode: generating
    for slot in s.slots[3:]:
        slot.tokens, slot.n_past = list(range(400)), 0
    calls: list[list[tuple[int, int]]] = []
    logits: list[list[int]] = []

    def decode(group: list[Slot], budget: int) -> bool:
        entries = s._fill_batch(group, budget)
        calls.append([(slot.seq_id, n) for slot, n in entries])
        logits.append([k for k in range(s.native.batch.n_tokens) if s.native.batch.logits[k]])
        return True

    s._decode = decode
    s.logits = logits
    return s, calls


def test_a_step_decodes_prompt_chunks_in_one_call_within_a_token_budget_then_generation() -> None:
    from overnight.engines.llama.scheduler import STEP_TOKENS

    s, calls = stepping_scheduler()
    s._step()
    # Two llama_decode calls: the prompts up to the step budget (the second is cut: chunked prefill,
    # it goes on next step), then one token for each generating slot, which waited for one chunk only.
    # Mixed in one call, llama.cpp's micro-batches for per-slot KV streams would have taken one
    # token of each sequence per pass over the weights.
    assert calls == [[(3, 400), (4, STEP_TOKENS - 400)], [(0, 1), (1, 1), (2, 1)]]
    assert s.logits == [[399], [0, 1, 2]]  # logits for the completed prompt and the generating slots only


def test_an_online_prompt_gets_a_call_of_its_own_before_generation() -> None:
    s, calls = stepping_scheduler()
    s.slots[4].job = job(online=True)
    s._step()
    # the online prompt (slot 4) is decoded alone; slot 3's batch prompt waits a step, generation does not
    assert calls == [[(4, 400)], [(0, 1), (1, 1), (2, 1)]]


def compacting_scheduler(monkeypatch: Any, busy: dict[int, int], n_slots: int = 6) -> tuple[Any, list[Any]]:
    """Slots with jobs: seq id -> tokens still to decode (1: generating, more: prefilling); the
    native calls of a move are recorded."""
    import llama_cpp

    from overnight.engines.stats import EmbeddedStats

    s = scheduler(n_slots, online_active=0, batch_active=0)
    s.native, s.stats = SimpleNamespace(memory=None), EmbeddedStats(total_slots=n_slots)
    for seq, pending in busy.items():
        slot = s.slots[seq]
        slot.job, slot.tokens, slot.n_past = job(), list(range(10 + seq)), 10 + seq - pending
        slot.job.generated, slot.job.text = [seq], bytearray(b"x%d" % seq)
    native_calls: list[Any] = []
    monkeypatch.setattr(llama_cpp, "llama_memory_seq_rm", lambda mem, seq, p0, p1: native_calls.append(("rm", seq)))
    monkeypatch.setattr(llama_cpp, "llama_memory_seq_cp",
                        lambda mem, src, dst, p0, p1: native_calls.append(("cp", src, dst, p0, p1)))
    return s, native_calls


def test_compaction_moves_generating_sequences_onto_consecutive_slots(monkeypatch: Any) -> None:
    s, native_calls = compacting_scheduler(monkeypatch, {0: 1, 2: 1, 4: 1, 5: 1})  # slots 1 and 3 free
    jobs = {seq: s.slots[seq].job for seq in (0, 2, 4, 5)}
    tokens = {seq: list(s.slots[seq].tokens) for seq in (0, 2, 4, 5)}
    s._compact()
    # 3 micro-batches (0 | 2 | 4-5) become 1: 5 moves into 1, then 4 into 3
    assert [slot.seq_id for slot in s.slots if slot.job is not None] == [0, 1, 2, 3]
    assert [s.slots[i].job for i in range(4)] == [jobs[0], jobs[5], jobs[2], jobs[4]]
    assert native_calls == [("rm", 1), ("cp", 5, 1, -1, -1), ("rm", 3), ("cp", 4, 3, -1, -1)]  # whole streams
    moved = s.slots[1]
    assert moved.tokens == tokens[5] and moved.n_past == len(tokens[5]) - 1 and moved.job.text == b"x5"
    assert moved.job.generated == [5] and moved.received_copy and s.slots[5].copy_source
    # the source keeps its cells as a reusable prefix, as any finished slot does
    assert s.slots[5].job is None and s.slots[5].tokens == tokens[5] and s.slots[5].tokens is not moved.tokens
    assert s.stats.moved_sequences == 2


def test_compaction_moves_nothing_that_would_not_close_a_gap(monkeypatch: Any) -> None:
    # slot 1 is prefilling (busy, not generating): moving 2 into a free slot above 1 joins nothing
    s, native_calls = compacting_scheduler(monkeypatch, {0: 1, 1: 40, 2: 1})
    s._compact()
    assert native_calls == [] and s.stats.moved_sequences == 0
    # already consecutive: nothing to do
    s, native_calls = compacting_scheduler(monkeypatch, {2: 1, 3: 1, 4: 1})
    s._compact()
    assert native_calls == []
    # a slot whose stream is still to be copied (the copy runs at the next decode) is not moved
    s, native_calls = compacting_scheduler(monkeypatch, {0: 1, 3: 1})
    s.slots[3].received_copy = True
    s._compact()
    assert native_calls == []


def test_what_llama_cpp_decodes_in_one_micro_batch() -> None:
    from overnight.engines.llama.scheduler import _one_micro_batch

    slots = [Slot(seq_id=i) for i in range(4)]
    assert _one_micro_batch([(slots[2], 300)])  # one sequence's tokens
    assert not _one_micro_batch([(slots[2], 513)])  # more than a micro-batch holds
    assert _one_micro_batch([(slots[0], 1), (slots[1], 1), (slots[2], 1)])  # generation on consecutive ids
    assert not _one_micro_batch([(slots[0], 1), (slots[2], 1)])  # a gap: two passes
    assert not _one_micro_batch([(slots[0], 1), (slots[1], 5)])  # unequal counts: split


class AbortRecorder:
    """The part of Native that aborting touches, recording what the scheduler asks."""

    def __init__(self) -> None:
        self.ctx, self.batch, self.n_batch = None, FakeBatch(1024), 1024
        self.aborts = 0
        self.flag = False

    def abort(self) -> None:
        self.aborts += 1
        self.flag = True

    def clear_abort(self) -> None:
        self.flag = False


def test_an_online_request_aborts_a_batch_step_once_and_the_redo_runs_to_its_end(monkeypatch: Any) -> None:
    import threading

    import llama_cpp

    from overnight.engines.stats import EmbeddedStats

    s = scheduler(4, online_active=0, batch_active=2)  # two slots free
    s.cond, s.stats = threading.Condition(), EmbeddedStats(total_slots=4)
    s.native = native = AbortRecorder()
    for slot in s.slots[:2]:
        slot.tokens, slot.n_past = [1, 2, 3], 2  # generating
    group = s.slots[:2]
    results: list[int] = []

    def llama_decode(ctx: Any, batch: Any) -> int:
        assert s.abortable  # a step of batch lines, a slot free: an online request may abort it
        s.submit(job())  # a batch line arriving aborts nothing
        assert native.aborts == 0
        s.submit(job(online=True))
        assert native.aborts == 1 and not s.abortable  # one abort per step
        results.append(2)
        return 2  # what llama_decode returns for an aborted step

    monkeypatch.setattr(llama_cpp, "llama_decode", llama_decode)
    s._decode(group, 64)
    assert [slot.n_past for slot in group] == [2, 2]  # nothing advanced: the step is redone
    assert s.retrying and s.stats.aborted_steps == 1 and not native.flag  # cleared for the next step

    def redo(ctx: Any, batch: Any) -> int:
        assert not s.abortable  # the redo of an aborted step runs to its end
        s.submit(job(online=True))
        assert native.aborts == 1
        return 0

    monkeypatch.setattr(llama_cpp, "llama_decode", redo)
    monkeypatch.setattr(s, "_sample", lambda slot: None)
    s._decode(group, 64)
    assert [slot.n_past for slot in group] == [3, 3] and not s.retrying
    generation = [(slot, 1) for slot in group]
    assert s._may_abort(True, generation)
    # two micro-batches: an abort in the second would leave the first's tokens in the cache
    assert not s._may_abort(True, [(s.slots[0], 1), (s.slots[2], 1)])
    assert not s._may_abort(True, [(s.slots[0], 513)])
    for slot in s.slots:  # every slot busy: the online request will preempt a batch line, so abort
        slot.job = slot.job or job()
    assert s._may_abort(True, generation)
    for slot in s.slots:  # every batch line has a cross-stream copy pending: none can give its slot
        slot.copy_source = True
    assert not s._may_abort(True, generation)
    assert not s._may_abort(False, generation) and results == [2]
