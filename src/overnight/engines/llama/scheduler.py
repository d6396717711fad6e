"""The continuous-batching scheduler of the embedded llama.cpp engine (its decode thread).

One `llama_context` holds `n_seq_max` sequence slots. A dedicated decode thread (never the event loop)
runs the scheduler: queued requests are admitted into free slots as others finish, and every step
decodes the prompt chunks of newly admitted ones, then one token for every generating sequence
together. Batching is where the throughput comes from on a CPU: 16-32
sequences decoded together give ~3x the tokens/s of one-at-a-time serving.

Every slot owns a KV stream of `n_ctx // n_seq_max` cells, so a sequence attends over its own cells
only (on one unified cache each query also walks every other sequence's cells: generation at 32
sequences ran ~20% slower, llama-batched-bench). A step is two `llama_decode` calls: first the prompt
chunks of newly admitted slots, then one token for every generating sequence, including those whose
prompt the first call just finished. With a stream per slot llama.cpp splits a batch into
micro-batches of *consecutive* sequence ids with equally many tokens each (`split_equal`), one pass
over the weights each: decoded with prompts, generation went one token per pass, and each idle or
prefilling slot between generating ones costs another pass. Hence the separate calls, and
compaction: when the generating sequences do not sit on consecutive ids, the highest is moved into
a free slot that closes a gap (`llama_memory_seq_cp` of its stream; a move happens once per gap,
mostly as a batch's last lines finish), so a generation step is one micro-batch.

Prefill. The prompt chunks of all newly admitted slots go in one call, up to `STEP_TOKENS` tokens
(chunked prefill: a long prompt is spread over several steps, so generation never stalls behind it).

Determinism. By default (the fast mode, flash attention on an f16 KV cache) a greedy answer may vary
with what else is in flight, as on OpenAI and vLLM: ggml's flash attention sums a row in another order
when the call holds many rows of its sequence (a prompt chunk, whose size depends on the step and on
how much of the prompt came from a cache) and when one sequence generates alone over 512+ cells.
Deterministic mode (`deterministic=True`) keeps keys and values in q8_0, where flash attention has
only its row-at-a-time kernel (native.py). Every operation is then computed row by row (on x86 with
AVX2 or AVX-512, in the formats deterministic mode serves: native.py), so a token's numbers do not
depend on the call it is decoded in: prompts of several lines in one call, prefix
reuse, preemption (a generated token recomputed in a prompt chunk gets the numbers it had) and
compaction (a stream copied exactly) all keep the promise, and the scheduler is the same in both
modes. Measured on llama-cpp-python 0.3.36 (tests/test_embedded_engines.py: copies of prompts among
others, shared prefixes, contexts past 512 cells, lines preempted for online requests); it costs the
cache's rounding and about a tenth of the throughput (bench/bench_embedded.py). In both modes `n_ctx` is the total
KV size (as llama.cpp's `-c` with `--parallel`) and each request's prompt + completion must fit in
`n_ctx // n_seq_max` tokens (capped by the model's training context).

Prefix sharing. Lines of a batch commonly share a long prompt prefix (the same system
message). A slot keeps its KV after its request finishes and remembers which tokens it holds (each
slot, busy or idle, holds at most `n_ctx // n_seq_max` tokens, so the cache cannot run out). A new
request goes to the free slot holding the longest common token prefix, and that part is not
recomputed. If another slot (live or idle) holds a longer common prefix, its stream is copied
(`llama_memory_seq_cp`; across streams llama.cpp copies whole buffers, ~47 MB for SmolLM2's 2,048
cells, a few milliseconds) and the copy is truncated to the common prefix (`llama_memory_seq_rm`).
Most lines need no copy: a finished line's slot keeps its KV, and the next line admitted there
reuses the shared prefix in place. A request whose
prefix is still being prefilled by a live slot waits for that prefill (typically one step) instead of
computing the same tokens in parallel. Reused tokens are reported as
`usage.prompt_tokens_details.cached_tokens`.

Priority. A job is online (someone waits for it interactively) or batch. Pending online jobs are
admitted before any pending batch job (two queues). The batch takes every slot, and an online job
that finds none free preempts the batch line that has generated least: the line leaves its slot
with what it generated (tokens, text, its sampler and so its random state) and goes back to the
front of the batch queue; readmitted, it prefills prompt + generated tokens (mostly from a shared
prefix: its system prompt is in other slots) and continues where it stopped (recomputation, as vLLM
preempts). Without preemption a running batch line held its slot for seconds at 64 slots (the first
online request of a bench_online round waited 9-14 s), and a slot kept free for online requests
instead held a line of every 64 back (a 64-line file's last line started when the first finished).
The batch keeps one line running: online traffic slows it, never stops it.

An online request does not wait for the batch step in flight either (at 64 sequences a step takes
~160 ms on 2 cores, more than the request's own prompt): when it arrives during a decode call of
batch lines only and a slot is free for it, the call is aborted (`Native.abort`: llama.cpp stops
after the graph node it is on and drops the call's tokens from the KV cache, so nothing advanced),
the next step decodes the online prompt in a call of its own first, and the batch's call is redone
after it. A redone call is not aborted again, so online traffic cannot starve the batch; what an abort costs the batch is
the part of a step already computed, at most one step per online request.

Streaming. A job may carry `on_text`, called on the decode thread with each piece of generated text
that is final: bytes that could still begin a stop string are held back until they cannot, and so
are the bytes of an incomplete UTF-8 character. The concatenation of the pieces equals the final
text (see `Job.emit`).
"""

from __future__ import annotations

import asyncio
import codecs
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import llama_cpp
import numpy as np

from overnight.engines.handoff import resolve_threadsafe
from overnight.engines.llama.native import N_UBATCH, Native
from overnight.engines.llama.sampling import Sampling, make_sampler
from overnight.engines.port import EngineResponse
from overnight.engines.stats import EmbeddedStats

log = logging.getLogger(__name__)

# Only share a prefix with another slot (or wait for one being computed) when it saves at least this
# many tokens: waiting costs a decode step.
MIN_SHARED_PREFIX = 8
# Tokens per decode step: every generating sequence's next token plus prompt chunks up
# to this many. One micro-batch (native.N_UBATCH): a step then never takes more than one pass over the
# weights for prompts, so generating sequences wait at most that long for their next token.
STEP_TOKENS = 512


@dataclass(frozen=True, slots=True)
class Outcome:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


@dataclass(eq=False)
class Job:
    prompt: list[int]
    max_new: int
    sampling: Sampling
    stops: tuple[bytes, ...]
    deadline: float
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Outcome | EngineResponse]
    online: bool = False  # admitted before batch jobs (see the module doc)
    # Called on the decode thread with each final piece of text (see the module doc); it must not
    # block, so an event-loop consumer wraps it in call_soon_threadsafe.
    on_text: Callable[[str], None] | None = None
    cancelled: bool = False  # set from the event loop, read by the decode thread (a plain bool is atomic)
    # The line's progress is its own, not its slot's: it moves with the job when compaction moves it
    # to another slot, and survives a preemption. Generated tokens and their text (cut at a stop
    # string), the native sampler chain (None for plain greedy; it holds the random state), how
    # much of the text went to on_text and through which decoder, and the prompt tokens its first
    # admission reused from the KV cache (usage's cached_tokens).
    generated: list[int] = field(default_factory=list)
    text: bytearray = field(default_factory=bytearray)
    sampler: Any = None
    streamed: int = 0
    decoder: codecs.IncrementalDecoder | None = None
    cached: int = 0
    preempted: bool = False  # gave its slot to an online job: readmitted, it prefills prompt + generated

    def resolve(self, result: Outcome | EngineResponse) -> None:
        """Thread-safe: the future belongs to the event loop."""
        resolve_threadsafe(self.loop, self.future, result)

    def resume_tokens(self) -> list[int]:
        """What its slot must hold: the prompt, then every generated token (while it runs, the last
        one is decoded in the next step)."""
        return [*self.prompt, *self.generated] if self.preempted else self.prompt

    def close(self) -> None:
        """Free its native sampler: it finished, was cancelled, expired or the engine stopped."""
        if self.sampler is not None:
            llama_cpp.llama_sampler_free(self.sampler)
            self.sampler = None

    def emit(self, final: bool) -> None:
        """Pass the text that no stop string can cut any more to on_text (all of it when `final`).
        The incremental decoder holds back an incomplete UTF-8 character and decodes exactly as one
        `decode(errors="replace")` of the whole text does, so the pieces add up to the final text."""
        if self.on_text is None:
            return
        if self.decoder is None:
            self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        end = len(self.text) if final else len(self.text) - _stop_prefix_len(self.text, self.stops)
        if end <= self.streamed and not final:
            return
        piece = self.decoder.decode(bytes(self.text[self.streamed:end]), final)
        self.streamed = max(end, self.streamed)
        if piece:
            try:
                self.on_text(piece)
            except Exception:  # a consumer's bug must not fail the decode step of every slot
                log.exception("embedded llama engine: on_text failed; streaming stops for this request")
                self.on_text = None


@dataclass(eq=False)
class Slot:
    """One sequence id. `tokens[:n_past]` are in its KV stream, also after its job finished (reusable
    prefix); while a job runs, `tokens[n_past:]` are still to be decoded."""

    seq_id: int
    tokens: list[int] = field(default_factory=list)
    n_past: int = 0
    job: Job | None = None
    wait_for: Slot | None = None  # a live slot whose prompt prefill we want to copy from
    # A cross-stream copy is carried out at the start of the next decode: until then the destination
    # holds no data yet and the source must not be overwritten.
    received_copy: bool = False
    copy_source: bool = False
    logits_index: int = -1


def _stop_prefix_len(text: bytearray, stops: tuple[bytes, ...]) -> int:
    """The longest end of `text` that is the start of a stop string (not a whole one: a whole one has
    already cut the text). A stop string found later starts no earlier than this."""
    best = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:k]):
                best = k
                break
    return best


def _runs(ids: list[int]) -> int:
    """How many runs of consecutive ids a sorted list holds: llama.cpp's micro-batches for one
    token per sequence on per-sequence KV streams."""
    return sum(1 for i, seq in enumerate(ids) if i == 0 or seq != ids[i - 1] + 1)


def _one_micro_batch(entries: list[tuple[Slot, int]]) -> bool:
    """Whether llama.cpp decodes these (slot, tokens) entries in one micro-batch: at most N_UBATCH
    tokens of one sequence, or one token each of sequences on consecutive ids (`split_equal`)."""
    if sum(n for _, n in entries) > N_UBATCH:
        return False
    return len(entries) == 1 or (all(n == 1 for _, n in entries) and _runs([s.seq_id for s, _ in entries]) == 1)


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.flatnonzero(np.asarray(a[:n], dtype=np.int64) != np.asarray(b[:n], dtype=np.int64))
    return int(diff[0]) if diff.size else n


class Scheduler:
    def __init__(self, native: Native, n_seq_max: int, prefix_sharing: bool) -> None:
        self.native = native
        self.prefix_sharing = prefix_sharing
        self.slots = [Slot(seq_id=i) for i in range(n_seq_max)]
        self.stats = EmbeddedStats(total_slots=n_seq_max)
        # Two queues: pending online jobs are admitted before any batch job (module doc).
        self.online: deque[Job] = deque()
        self.queue: deque[Job] = deque()  # batch jobs
        self.cond = threading.Condition()
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="overnight-llama-decode", daemon=True)

    abortable = False  # an online job may abort the decode in flight (guarded by `cond`; module doc)
    retrying = False  # the last batch step was aborted: its redo runs to its end

    # -- called from the event loop -----------------------------------------------------------------

    def submit(self, job: Job) -> None:
        with self.cond:
            (self.online if job.online else self.queue).append(job)
            if job.online and self.abortable:
                self.abortable = False
                self.native.abort()
            self.cond.notify()

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify()

    # -- decode thread ---------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while self._wait_for_work():
                try:
                    self._step()
                except Exception:  # a bug must not kill the thread and leave futures hanging forever
                    log.exception("embedded llama engine: decode step failed")
                    self._fail_active("engine_error", "The embedded engine failed while decoding this request.")
        finally:
            self._shutdown()

    def _wait_for_work(self) -> bool:
        with self.cond:
            while not self.stopping and not self.online and not self.queue and not self._active():
                self.cond.wait()
            return not self.stopping

    def _active(self) -> list[Slot]:
        return [s for s in self.slots if s.job is not None]

    def _step(self) -> None:
        self._drop_cancelled()
        self._admit()
        self._resolve_waits()
        prefilling = [s for s in self._active() if s.wait_for is None and len(s.tokens) - s.n_past > 1]
        if prefilling:
            online_prompts = [s for s in prefilling if s.job is not None and s.job.online]
            # Online prompts go alone: the user's first token then costs a pass over their prompt only,
            # and the batch's prompts wait one step.
            if not self._decode(online_prompts or prefilling, STEP_TOKENS):
                return
        self._compact()
        generating = [s for s in self._active() if s.wait_for is None and len(s.tokens) - s.n_past == 1]
        if generating:
            self._decode(generating, len(generating))
        self.stats.busy_slots = len(self._active())  # batch occupancy, for the metrics

    def _decode(self, group: list[Slot], budget: int) -> bool:
        """One llama_decode of the group's pending tokens (in slot order, that is by sequence id, as
        llama.cpp's micro-batches want them); False when it was aborted for an online job."""
        entries = self._fill_batch(group, budget)
        batch_only = not any(slot.job is not None and slot.job.online for slot, _ in entries)
        with self.cond:
            self.abortable = self._may_abort(batch_only, entries)
        rc = llama_cpp.llama_decode(self.native.ctx, self.native.batch)
        with self.cond:
            self.abortable = False
            self.native.clear_abort()
        for slot in self.slots:  # the cross-stream copies queued before this call are done
            slot.received_copy = slot.copy_source = False
        if rc == 2:  # aborted for an online job: llama.cpp dropped the call's tokens, nothing advanced
            self.retrying = True
            self.stats.aborted_steps += 1
            return False
        if batch_only:
            self.retrying = False
        if rc != 0:
            log.error("embedded llama engine: llama_decode returned %d", rc)
            for slot, _ in entries:
                self._finish_with(slot, EngineResponse.failure(
                    "engine_error", f"The embedded engine could not decode this request (llama_decode={rc})."))
                self._forget_kv(slot)
            return True
        for slot, n in entries:
            slot.n_past += n
            if slot.n_past == len(slot.tokens):
                self._sample(slot)
        return True

    def _may_abort(self, batch_only: bool, entries: list[tuple[Slot, int]]) -> bool:
        """Whether an online job that arrives during this call may abort it (module doc): a call of
        batch lines only, not itself the redo of an aborted call, with a free slot for the online job.
        And one micro-batch: llama.cpp drops the tokens of the micro-batch it aborted, not those of
        the ones before it, which the redo would then add to the cache a second time."""
        if self.retrying or not batch_only or not _one_micro_batch(entries):
            return False
        return any(s.job is None and not s.copy_source for s in self.slots) or bool(self._preemptible())

    # compaction -------------------------------------------------------------------------------------

    def _compact(self) -> None:
        """Move generating sequences into free slots until they sit on consecutive sequence ids, or no
        move closes a gap (module doc): each gap costs every generation step another micro-batch."""
        while True:
            generating = [s for s in self._active() if s.wait_for is None and len(s.tokens) - s.n_past == 1]
            ids = [s.seq_id for s in generating]
            runs = _runs(ids)
            if runs <= 1:
                return
            source = generating[-1]
            if source.received_copy or source.copy_source:
                return
            rest = set(ids[:-1])
            target = next((s for s in self.slots if s.job is None and not s.copy_source and not s.received_copy
                           and s.seq_id < source.seq_id and _runs(sorted(rest | {s.seq_id})) < runs), None)
            if target is None:
                return
            self._move(source, target)

    def _move(self, source: Slot, dest: Slot) -> None:
        """Carry a running job and its KV stream from `source` to the free slot `dest`. The source keeps
        its cells (copied, not moved): it becomes a free slot holding a reusable prefix."""
        mem = self.native.memory
        llama_cpp.llama_memory_seq_rm(mem, dest.seq_id, -1, -1)
        llama_cpp.llama_memory_seq_cp(mem, source.seq_id, dest.seq_id, -1, -1)
        dest.tokens, source.tokens = source.tokens, list(source.tokens)
        dest.n_past, dest.job, dest.wait_for = source.n_past, source.job, None
        source.job = None
        dest.received_copy = source.copy_source = True  # carried out at the start of the next decode
        self.stats.moved_sequences += 1
        for other in self.slots:
            if other.wait_for is source:
                other.wait_for = dest

    # admission --------------------------------------------------------------------------------------

    def _admit(self) -> None:
        while True:
            free = [s for s in self.slots if s.job is None and not s.copy_source]
            if not free:
                if self._preempt_for_online():
                    continue
                return
            with self.cond:
                job = self._next_job()
            if job is None:
                return
            if job.cancelled or time.time() >= job.deadline:
                job.close()
                if not job.cancelled:
                    job.resolve(EngineResponse.failure(
                        "batch_expired", "This request could not be executed before the completion window expired."))
                continue
            self._place(job, free)

    def _preemptible(self) -> list[Slot]:
        """The batch lines an online job may take the slot of (no cross-stream copy of theirs pending:
        that is carried out at the next decode). The batch keeps one line running: online traffic
        slows it, never stops it."""
        batch = [s for s in self.slots if s.job is not None and not s.job.online]
        if len(batch) <= 1:
            return []
        return [s for s in batch if not s.copy_source and not s.received_copy]

    def _preempt_for_online(self) -> bool:
        """When an online job waits and no slot is free, suspend the batch line that has generated
        least (least to recompute) and put it back at the front of the batch queue (module doc)."""
        with self.cond:
            if not self.online:
                return False
        victims = self._preemptible()
        if not victims:
            return False
        slot = min(victims, key=lambda s: (len(s.job.generated) if s.job is not None else 0, s.n_past))
        job = slot.job
        assert job is not None
        job.preempted = True  # it keeps its progress (Job), its slot only the decoded tokens
        # The slot keeps its decoded tokens as a reusable prefix (for this job too, if it comes back here).
        slot.tokens = slot.tokens[: slot.n_past]
        self._release(slot)
        with self.cond:
            self.queue.appendleft(job)
        self.stats.preempted_sequences += 1
        return True

    def _next_job(self) -> Job | None:
        """The next job to admit (caller holds `cond`): online first (batch lines make room for them
        by preemption, see the module doc)."""
        if self.online:
            return self.online.popleft()
        return self.queue.popleft() if self.queue else None

    def _place(self, job: Job, free: list[Slot]) -> None:
        prompt = job.resume_tokens()
        limit = len(prompt) - 1  # at least one prompt token must be decoded to get logits
        own = {id(s): min(common_prefix(s.tokens[: s.n_past], prompt), limit) for s in free}
        slot = max(free, key=lambda s: own[id(s)]) if self.prefix_sharing else free[0]
        keep = own[id(slot)] if self.prefix_sharing else 0
        llama_cpp.llama_memory_seq_rm(self.native.memory, slot.seq_id, keep, -1)
        slot.tokens = list(prompt)
        slot.n_past = keep
        slot.job = job
        slot.wait_for = None
        if not job.preempted:  # first admission (a preempted line continues with its own state)
            job.sampler = make_sampler(job.sampling, job.max_new, self.native.n_vocab)
            job.cached = keep
        if self.prefix_sharing:
            self._share_prefix(slot, keep, limit)

    def _share_prefix(self, slot: Slot, keep: int, limit: int) -> None:
        """Copy a longer prefix from another slot now, or wait for one that is being prefilled."""
        best, best_len, best_ready = None, keep, False
        for other in self.slots:
            if other is slot:
                continue
            planned = other.tokens if other.job is not None else other.tokens[: other.n_past]
            n = min(common_prefix(planned, slot.tokens), limit)
            ready = other.n_past >= n and not other.received_copy
            if n > best_len or (n == best_len and best is not None and ready and not best_ready):
                best, best_len, best_ready = other, n, ready
        if best is None or best_len < keep + MIN_SHARED_PREFIX:
            return
        if best_ready:
            self._copy_prefix(best, slot, best_len)
        else:
            slot.wait_for = best

    def _resolve_waits(self) -> None:
        for slot in self.slots:
            source = slot.wait_for
            if slot.job is None or source is None:
                continue
            limit = len(slot.tokens) - 1
            planned = min(common_prefix(source.tokens, slot.tokens), limit)
            if source.received_copy or (source.job is not None and source.n_past < planned):
                continue  # copy once the source has prefilled the shared part
            slot.wait_for = None
            available = min(common_prefix(source.tokens[: source.n_past], slot.tokens), limit)
            if available >= slot.n_past + MIN_SHARED_PREFIX:
                self._copy_prefix(source, slot, available)

    def _copy_prefix(self, source: Slot, dest: Slot, n: int) -> None:
        # Across KV streams llama.cpp copies whole buffers only (p0/p1 must be -1), then we cut the
        # copy back to the shared prefix. The copy itself happens at the start of the next decode.
        mem = self.native.memory
        llama_cpp.llama_memory_seq_rm(mem, dest.seq_id, -1, -1)
        llama_cpp.llama_memory_seq_cp(mem, source.seq_id, dest.seq_id, -1, -1)
        llama_cpp.llama_memory_seq_rm(mem, dest.seq_id, n, -1)
        dest.n_past = n
        if dest.job is not None and not dest.job.preempted:
            dest.job.cached = n
        dest.received_copy = True
        source.copy_source = True

    def _drop_cancelled(self) -> None:
        for slot in self.slots:
            if slot.job is not None and slot.job.cancelled:
                slot.job.close()
                self._release(slot)

    # batch ------------------------------------------------------------------------------------------

    def _fill_batch(self, group: list[Slot], budget: int) -> list[tuple[Slot, int]]:
        """The pending tokens of the group's slots, up to `budget` tokens (at most n_batch)."""
        batch = self.native.batch
        budget = min(budget, self.native.n_batch)
        entries: list[tuple[Slot, int]] = []
        n = 0
        for slot in group:
            take = min(len(slot.tokens) - slot.n_past, budget - n)
            if take <= 0:
                break
            for i in range(take):
                pos = slot.n_past + i
                batch.token[n] = slot.tokens[pos]
                batch.pos[n] = pos
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = slot.seq_id
                batch.logits[n] = False
                n += 1
            if slot.n_past + take == len(slot.tokens):
                batch.logits[n - 1] = True
                slot.logits_index = n - 1
            entries.append((slot, take))
        batch.n_tokens = n
        return entries

    # sampling ---------------------------------------------------------------------------------------

    def _sample(self, slot: Slot) -> None:
        job = slot.job
        assert job is not None
        if job.sampler is None:
            token = self.native.argmax(slot.logits_index)
        else:
            token = llama_cpp.llama_sampler_sample(job.sampler, self.native.ctx, slot.logits_index)
        job.generated.append(token)
        self.stats.generated_tokens += 1
        if self.native.is_eog(token):
            self._finish(slot, "stop")
            return
        before = len(job.text)
        job.text += self.native.piece(token)
        if job.stops and self._cut_at_stop(job, before):
            self._finish(slot, "stop")
        elif len(job.generated) >= job.max_new:
            self._finish(slot, "length")
        else:
            job.emit(final=False)
            slot.tokens.append(token)  # decoded (into the KV) in the next step

    @staticmethod
    def _cut_at_stop(job: Job, before: int) -> bool:
        """Search only the region the new piece can complete a stop string in; searching UTF-8 bytes
        equals searching text (UTF-8 is self-synchronizing)."""
        longest = max(len(s) for s in job.stops)
        start = max(0, before - longest + 1)
        hits = [i for i in (job.text.find(s, start) for s in job.stops) if i >= 0]
        if not hits:
            return False
        del job.text[min(hits):]
        return True

    # finishing --------------------------------------------------------------------------------------

    def _finish(self, slot: Slot, reason: str) -> None:
        job = slot.job
        assert job is not None
        job.emit(final=True)  # the rest of the text, before the future resolves
        outcome = Outcome(
            text=bytes(job.text).decode("utf-8", errors="replace"),
            finish_reason=reason,
            prompt_tokens=len(job.prompt),
            completion_tokens=len(job.generated),
            cached_tokens=job.cached,
        )
        self.stats.cached_prompt_tokens += job.cached
        self._finish_with(slot, outcome)

    def _finish_with(self, slot: Slot, result: Outcome | EngineResponse) -> None:
        assert slot.job is not None
        slot.job.close()
        slot.job.resolve(result)
        self._release(slot)

    def _release(self, slot: Slot) -> None:
        """Free the slot for the next request (its job, finished or preempted, keeps its own state).
        Its KV stays as a reusable prefix: `tokens[:n_past]` (the stream is private to the slot, so
        keeping it costs nothing; the next request admitted here truncates it to what it shares)."""
        slot.job = None
        slot.wait_for = None
        for other in self.slots:
            if other.wait_for is slot:
                other.wait_for = None  # it prefills on its own instead

    def _forget_kv(self, slot: Slot) -> None:
        llama_cpp.llama_memory_seq_rm(self.native.memory, slot.seq_id, -1, -1)
        slot.tokens, slot.n_past = [], 0

    def _fail_active(self, code: str, message: str) -> None:
        for slot in self._active():
            self._finish_with(slot, EngineResponse.failure(code, message))
        llama_cpp.llama_memory_clear(self.native.memory, True)
        for slot in self.slots:
            slot.tokens, slot.n_past = [], 0
            slot.received_copy = slot.copy_source = False

    def _shutdown(self) -> None:
        closed = EngineResponse.failure("engine_closed", "The embedded engine was shut down before this request ran.")
        for slot in self._active():
            self._finish_with(slot, closed)
        with self.cond:
            pending = [*self.online, *self.queue]
            self.online, self.queue = deque(), deque()
        for job in pending:
            job.close()
            job.resolve(closed)
        self.native.free()

