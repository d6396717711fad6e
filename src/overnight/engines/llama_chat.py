"""Embedded chat / text completions on llama.cpp, with our own continuous batching.

One `llama_context` holds `n_seq_max` sequence slots. A dedicated decode thread (never the event loop)
runs the scheduler: queued requests are admitted into free slots as others finish, and every step
decodes one token for every generating sequence in one `llama_decode`, plus the prompt chunks (up to
`n_batch` tokens) of newly admitted ones. Batching is where the throughput comes from on a CPU: 16-32
sequences decoded together give ~3x the tokens/s of one-at-a-time serving.

Determinism. Measured on llama-cpp-python 0.3.36 with SmolLM2: a sequence's greedy output in a batch
equals its single-sequence output only if its numerics do not depend on what else is in flight. So
(1) the KV cache is *not* unified: every slot owns a stream of `n_ctx // n_seq_max` cells (with a
unified cache a sequence attends over cells interleaved with other sequences' and float summation
order changes); (2) flash attention is off (its CPU kernel picks an algorithm by the number of query
rows); (3) the generating sequences (one token each) are decoded together, but each prompt chunk in a
`llama_decode` of its own (prompt chunks mixed into one call changed some outputs). Prefill is
compute-bound anyway; the batching gain is in the generation steps. So `n_ctx` is the total KV size (as llama.cpp's `-c` with `--parallel`) and each request's
prompt + completion must fit in `n_ctx // n_seq_max` tokens (capped by the model's training context).

Prefix sharing. Lines of a batch commonly share a long prompt prefix (the same system message). A
slot keeps its KV after its request finishes (its stream is private, so this costs no memory) and
remembers which tokens it holds. A new request goes to the free slot holding the longest common
token prefix, and that part is not recomputed. If another slot (live or idle) holds a longer common
prefix, its whole stream is copied (`llama_memory_seq_cp`; across streams llama.cpp copies full
buffers only) and the copy is truncated to the common prefix (`llama_memory_seq_rm`). A request whose
prefix is still being prefilled by a live slot waits for that prefill (typically one step) instead of
computing the same tokens in parallel. Reused tokens are reported as
`usage.prompt_tokens_details.cached_tokens`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import llama_cpp
import numpy as np
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from overnight.engines import responses_api
from overnight.engines.port import EngineRequest, EngineResponse
from overnight.engines.stats import EmbeddedStats

log = logging.getLogger(__name__)

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
RESPONSES = "/v1/responses"  # answered as a chat request (see responses_api)

# Only share a prefix with another slot (or wait for one being computed) when it saves at least this
# many tokens: a cross-stream copy moves a whole KV stream, and waiting costs a decode step.
MIN_SHARED_PREFIX = 8
# OpenAI's default for the legacy completions endpoint; chat defaults to the rest of the context.
COMPLETIONS_DEFAULT_MAX_TOKENS = 16
N_UBATCH = 512

_LLAMA_LOG_LEVELS = {3: logging.WARNING, 4: logging.ERROR}  # ggml_log_level: 3 WARN, 4 ERROR


@llama_cpp.llama_log_callback  # type: ignore[untyped-decorator]  # a ctypes CFUNCTYPE
def _llama_log(level: int, text: bytes, _user_data: ctypes.c_void_p) -> None:
    """Route llama.cpp's own messages to Python logging: warnings and errors only, the load chatter
    (hundreds of INFO lines per model) would drown the server log."""
    py_level = _LLAMA_LOG_LEVELS.get(level)
    if py_level is not None:
        log.log(py_level, "llama.cpp: %s", text.decode("utf-8", errors="replace").rstrip())


class _BadRequest(Exception):
    """A per-request problem, answered as an HTTP 400."""

    def __init__(self, message: str, param: str | None, code: str = "invalid_value") -> None:
        super().__init__(message)
        self.param = param
        self.code = code

    def response(self) -> EngineResponse:
        return EngineResponse.http_error(400, str(self), code=self.code, param=self.param)


# --------------------------------------------------------------------------------------------------
# Native handles


class _Native:
    """The model, its vocabulary, the one context and the reusable batch. Tokenizing touches only the
    (read-only) vocabulary and is safe from any thread; everything else belongs to the decode thread."""

    def __init__(self, model_path: str, n_ctx: int, n_seq_max: int, threads: int) -> None:
        llama_cpp.llama_log_set(_llama_log, ctypes.c_void_p(0))
        llama_cpp.llama_backend_init()
        model = llama_cpp.llama_model_load_from_file(model_path.encode(), llama_cpp.llama_model_default_params())
        if not model:
            raise RuntimeError(f"llama.cpp could not load the model {model_path!r}")
        self.model = model
        self.vocab = llama_cpp.llama_model_get_vocab(model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = max(N_UBATCH, 2048)
        params.n_ubatch = N_UBATCH
        params.n_seq_max = n_seq_max
        params.kv_unified = False  # one stream per slot: batched output == single output (module doc)
        params.n_threads = threads
        params.n_threads_batch = threads
        params.no_perf = True
        # Flash attention's CPU kernel picks its algorithm by the number of query rows, so a prompt
        # decoded in one call or in two (after a shared prefix) would round differently.
        params.flash_attn_type = 0
        ctx = llama_cpp.llama_init_from_model(model, params)
        if not ctx:
            llama_cpp.llama_model_free(model)
            raise RuntimeError("llama.cpp could not create a context (not enough memory for the KV cache?)")
        self.ctx = ctx
        self.memory = llama_cpp.llama_get_memory(ctx)
        self.n_batch = llama_cpp.llama_n_batch(ctx)
        train = llama_cpp.llama_model_n_ctx_train(model)
        per_seq = llama_cpp.llama_n_ctx_seq(ctx)
        self.window = min(per_seq, train) if train > 0 else per_seq
        self.batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        self._piece_buf = ctypes.create_string_buffer(256)

    def tokenize(self, text: str, add_special: bool, parse_special: bool) -> list[int]:
        data = text.encode("utf-8")
        capacity = len(data) + 8
        buf = (llama_cpp.llama_token * capacity)()
        n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, capacity, add_special, parse_special)
        if n < 0:  # cannot happen with one token per byte + specials, but follow the API
            buf = (llama_cpp.llama_token * -n)()
            n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, -n, add_special, parse_special)
        return list(buf[:n])

    def piece(self, token: int, special: bool = False) -> bytes:
        """Decode-thread only (shared buffer)."""
        n = llama_cpp.llama_token_to_piece(self.vocab, token, self._piece_buf, len(self._piece_buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, -n, 0, special)
            return buf.raw[:n]
        return self._piece_buf.raw[:n]

    def special_text(self, token: int) -> str:
        if token < 0:
            return ""
        buf = ctypes.create_string_buffer(256)
        n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, True)
        return buf.raw[: max(n, 0)].decode("utf-8", errors="replace")

    def chat_template(self) -> str | None:
        raw = llama_cpp.llama_model_chat_template(self.model, None)
        return raw.decode("utf-8", errors="replace") if raw else None

    def is_eog(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self.vocab, token))

    def argmax(self, batch_index: int) -> int:
        # numpy argmax over the logits row: much cheaper than a native sampler chain for greedy.
        row = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.ctx, batch_index), shape=(self.n_vocab,))
        return int(row.argmax())

    def free(self) -> None:
        llama_cpp.llama_batch_free(self.batch)
        llama_cpp.llama_free(self.ctx)
        llama_cpp.llama_model_free(self.model)


# --------------------------------------------------------------------------------------------------
# Requests


@dataclass(frozen=True, slots=True)
class _Sampling:
    temperature: float
    top_p: float
    seed: int | None
    presence_penalty: float
    frequency_penalty: float

    @property
    def greedy_argmax(self) -> bool:
        """Plain greedy: numpy argmax, no native sampler chain."""
        return self.temperature == 0 and self.presence_penalty == 0 and self.frequency_penalty == 0


@dataclass(frozen=True, slots=True)
class _Outcome:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


@dataclass(eq=False)
class _Job:
    prompt: list[int]
    max_new: int
    sampling: _Sampling
    stops: tuple[bytes, ...]
    deadline: float
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[_Outcome | EngineResponse]
    cancelled: bool = False  # set from the event loop, read by the decode thread (a plain bool is atomic)

    def resolve(self, result: _Outcome | EngineResponse) -> None:
        """Thread-safe: the future belongs to the event loop."""
        with contextlib.suppress(RuntimeError):  # the loop is already closed: nobody is waiting
            self.loop.call_soon_threadsafe(_set_result, self.future, result)


def _set_result(future: asyncio.Future[Any], result: Any) -> None:
    if not future.done():
        future.set_result(result)


@dataclass(eq=False)
class _Slot:
    """One sequence id. `tokens[:n_past]` are in its KV stream, also after its job finished (reusable
    prefix); while a job runs, `tokens[n_past:]` are still to be decoded."""

    seq_id: int
    tokens: list[int] = field(default_factory=list)
    n_past: int = 0
    job: _Job | None = None
    generated: list[int] = field(default_factory=list)
    text: bytearray = field(default_factory=bytearray)
    sampler: Any = None  # native sampler chain, None for plain greedy
    cached: int = 0
    wait_for: _Slot | None = None  # a live slot whose prompt prefill we want to copy from
    # A cross-stream copy is carried out at the start of the next decode: until then the destination
    # holds no data yet and the source must not be overwritten.
    received_copy: bool = False
    copy_source: bool = False
    logits_index: int = -1


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.flatnonzero(np.asarray(a[:n], dtype=np.int64) != np.asarray(b[:n], dtype=np.int64))
    return int(diff[0]) if diff.size else n


# --------------------------------------------------------------------------------------------------
# The scheduler (decode thread)


class _Scheduler:
    def __init__(self, native: _Native, n_seq_max: int, prefix_sharing: bool) -> None:
        self.native = native
        self.prefix_sharing = prefix_sharing
        self.slots = [_Slot(seq_id=i) for i in range(n_seq_max)]
        self.stats = EmbeddedStats(total_slots=n_seq_max)
        self.queue: deque[_Job] = deque()
        self.cond = threading.Condition()
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="overnight-llama-decode", daemon=True)

    # -- called from the event loop -----------------------------------------------------------------

    def submit(self, job: _Job) -> None:
        with self.cond:
            self.queue.append(job)
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
            while not self.stopping and not self.queue and not self._active():
                self.cond.wait()
            return not self.stopping

    def _active(self) -> list[_Slot]:
        return [s for s in self.slots if s.job is not None]

    def _step(self) -> None:
        self._drop_cancelled()
        self._admit()
        self._resolve_waits()
        ready = [s for s in self._active() if s.wait_for is None]
        generating = [s for s in ready if len(s.tokens) - s.n_past == 1]
        prefilling = [s for s in ready if len(s.tokens) - s.n_past > 1]
        # Generating slots go together (one token each); each prompt chunk gets a decode call of its
        # own: a sequence's numerics then do not depend on what else is in flight (see module doc).
        groups = ([generating] if generating else []) + [[s] for s in prefilling]
        for group in groups:
            self._decode(group)
            for slot in self.slots:
                slot.received_copy = slot.copy_source = False
        self.stats.busy_slots = len(self._active())  # batch occupancy, for the metrics

    def _decode(self, group: list[_Slot]) -> None:
        entries = self._fill_batch(group)
        rc = llama_cpp.llama_decode(self.native.ctx, self.native.batch)
        if rc != 0:
            log.error("embedded llama engine: llama_decode returned %d", rc)
            for slot, _ in entries:
                self._finish_with(slot, EngineResponse.failure(
                    "engine_error", f"The embedded engine could not decode this request (llama_decode={rc})."))
                self._forget_kv(slot)
            return
        for slot, n in entries:
            slot.n_past += n
            if slot.n_past == len(slot.tokens):
                self._sample(slot)

    # admission --------------------------------------------------------------------------------------

    def _admit(self) -> None:
        while True:
            free = [s for s in self.slots if s.job is None and not s.copy_source]
            if not free:
                return
            with self.cond:
                if not self.queue:
                    return
                job = self.queue.popleft()
            if job.cancelled:
                continue
            if time.time() >= job.deadline:
                job.resolve(EngineResponse.failure(
                    "batch_expired", "This request could not be executed before the completion window expired."))
                continue
            self._place(job, free)

    def _place(self, job: _Job, free: list[_Slot]) -> None:
        prompt = job.prompt
        limit = len(prompt) - 1  # at least one prompt token must be decoded to get logits
        own = {id(s): min(_common_prefix(s.tokens[: s.n_past], prompt), limit) for s in free}
        slot = max(free, key=lambda s: own[id(s)]) if self.prefix_sharing else free[0]
        keep = own[id(slot)] if self.prefix_sharing else 0
        llama_cpp.llama_memory_seq_rm(self.native.memory, slot.seq_id, keep, -1)
        slot.tokens = list(prompt)
        slot.n_past = keep
        slot.job = job
        slot.generated = []
        slot.text = bytearray()
        slot.sampler = _make_sampler(job.sampling, job.max_new)
        slot.cached = keep
        slot.wait_for = None
        if self.prefix_sharing:
            self._share_prefix(slot, keep, limit)

    def _share_prefix(self, slot: _Slot, keep: int, limit: int) -> None:
        """Copy a longer prefix from another slot now, or wait for one that is being prefilled."""
        best, best_len, best_ready = None, keep, False
        for other in self.slots:
            if other is slot:
                continue
            planned = other.tokens if other.job is not None else other.tokens[: other.n_past]
            n = min(_common_prefix(planned, slot.tokens), limit)
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
            planned = min(_common_prefix(source.tokens, slot.tokens), limit)
            if source.received_copy or (source.job is not None and source.n_past < planned):
                continue  # copy once the source has prefilled the shared part
            slot.wait_for = None
            available = min(_common_prefix(source.tokens[: source.n_past], slot.tokens), limit)
            if available >= slot.n_past + MIN_SHARED_PREFIX:
                self._copy_prefix(source, slot, available)

    def _copy_prefix(self, source: _Slot, dest: _Slot, n: int) -> None:
        # Across KV streams llama.cpp copies whole buffers only (p0/p1 must be -1), then we cut the
        # copy back to the shared prefix. The copy itself happens at the start of the next decode.
        mem = self.native.memory
        llama_cpp.llama_memory_seq_rm(mem, dest.seq_id, -1, -1)
        llama_cpp.llama_memory_seq_cp(mem, source.seq_id, dest.seq_id, -1, -1)
        llama_cpp.llama_memory_seq_rm(mem, dest.seq_id, n, -1)
        dest.n_past = n
        dest.cached = n
        dest.received_copy = True
        source.copy_source = True

    def _drop_cancelled(self) -> None:
        for slot in self.slots:
            if slot.job is not None and slot.job.cancelled:
                self._release(slot)

    # batch ------------------------------------------------------------------------------------------

    def _fill_batch(self, group: list[_Slot]) -> list[tuple[_Slot, int]]:
        """The pending tokens of the group's slots, up to n_batch tokens."""
        batch = self.native.batch
        budget = self.native.n_batch
        entries: list[tuple[_Slot, int]] = []
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

    def _sample(self, slot: _Slot) -> None:
        job = slot.job
        assert job is not None
        if slot.sampler is None:
            token = self.native.argmax(slot.logits_index)
        else:
            token = llama_cpp.llama_sampler_sample(slot.sampler, self.native.ctx, slot.logits_index)
        slot.generated.append(token)
        self.stats.generated_tokens += 1
        if self.native.is_eog(token):
            self._finish(slot, "stop")
            return
        before = len(slot.text)
        slot.text += self.native.piece(token)
        if job.stops and self._cut_at_stop(slot, before):
            self._finish(slot, "stop")
        elif len(slot.generated) >= job.max_new:
            self._finish(slot, "length")
        else:
            slot.tokens.append(token)  # decoded (into the KV) in the next step

    @staticmethod
    def _cut_at_stop(slot: _Slot, before: int) -> bool:
        """Search only the region the new piece can complete a stop string in; searching UTF-8 bytes
        equals searching text (UTF-8 is self-synchronizing)."""
        assert slot.job is not None
        longest = max(len(s) for s in slot.job.stops)
        start = max(0, before - longest + 1)
        hits = [i for i in (slot.text.find(s, start) for s in slot.job.stops) if i >= 0]
        if not hits:
            return False
        del slot.text[min(hits):]
        return True

    # finishing --------------------------------------------------------------------------------------

    def _finish(self, slot: _Slot, reason: str) -> None:
        assert slot.job is not None
        outcome = _Outcome(
            text=bytes(slot.text).decode("utf-8", errors="replace"),
            finish_reason=reason,
            prompt_tokens=len(slot.job.prompt),
            completion_tokens=len(slot.generated),
            cached_tokens=slot.cached,
        )
        self.stats.cached_prompt_tokens += slot.cached
        self._finish_with(slot, outcome)

    def _finish_with(self, slot: _Slot, result: _Outcome | EngineResponse) -> None:
        assert slot.job is not None
        slot.job.resolve(result)
        self._release(slot)

    def _release(self, slot: _Slot) -> None:
        """Free the slot for the next request. Its KV stays as a reusable prefix: `tokens[:n_past]`
        (the stream is private to the slot, so keeping it costs nothing; the next request admitted
        here truncates it to what it shares)."""
        if slot.sampler is not None:
            llama_cpp.llama_sampler_free(slot.sampler)
            slot.sampler = None
        slot.job = None
        slot.wait_for = None
        for other in self.slots:
            if other.wait_for is slot:
                other.wait_for = None  # it prefills on its own instead

    def _forget_kv(self, slot: _Slot) -> None:
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
            pending, self.queue = list(self.queue), deque()
        for job in pending:
            job.resolve(closed)
        self.native.free()


def _make_sampler(sampling: _Sampling, max_new: int) -> Any:
    """A native sampler chain, or None for plain greedy (numpy argmax). OpenAI order: penalties,
    temperature, then nucleus (top_p) over the tempered distribution, then the seeded draw."""
    if sampling.greedy_argmax:
        return None
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    if sampling.presence_penalty or sampling.frequency_penalty:
        penalties = llama_cpp.llama_sampler_init_penalties(
            max_new, 1.0, sampling.frequency_penalty, sampling.presence_penalty)
        llama_cpp.llama_sampler_chain_add(chain, penalties)
    if sampling.temperature == 0:
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_greedy())
        return chain
    llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_temp(sampling.temperature))
    if sampling.top_p < 1.0:
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_top_p(sampling.top_p, 1))
    seed = llama_cpp.LLAMA_DEFAULT_SEED if sampling.seed is None else sampling.seed & 0xFFFFFFFF
    llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_dist(seed))
    return chain


# --------------------------------------------------------------------------------------------------
# Request parsing (event loop side: cheap, and it answers bad lines without waiting for a slot)

_UNSUPPORTED_TRUTHY = {
    "logprobs": "logprobs are not supported by the embedded engine.",
    "top_logprobs": "top_logprobs are not supported by the embedded engine.",
    "echo": "echo is not supported by the embedded engine.",
    "suffix": "suffix is not supported by the embedded engine.",
    "tools": "tools are not supported by the embedded engine.",
    "functions": "functions are not supported by the embedded engine.",
    "logit_bias": "logit_bias is not supported by the embedded engine.",
    "stream": "streaming is not supported in a batch.",
}


def _number(body: dict[str, Any], name: str, default: float, lo: float, hi: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value <= hi:
        raise _BadRequest(f"'{name}' must be a number between {lo} and {hi}.", name)
    return float(value)


def _parse_sampling(body: dict[str, Any]) -> _Sampling:
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise _BadRequest("'seed' must be an integer.", "seed")
    return _Sampling(
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0),
        seed=seed,
        presence_penalty=_number(body, "presence_penalty", 0.0, -2.0, 2.0),
        frequency_penalty=_number(body, "frequency_penalty", 0.0, -2.0, 2.0),
    )


def _check_unsupported(body: dict[str, Any]) -> None:
    if body.get("n") not in (None, 1):
        raise _BadRequest("The embedded engine supports only n=1; send one line per completion.", "n")
    best_of = body.get("best_of", 1)
    if best_of not in (None, 1):
        raise _BadRequest("The embedded engine supports only best_of=1.", "best_of")
    for name, message in _UNSUPPORTED_TRUTHY.items():
        if body.get(name):
            raise _BadRequest(message, name)
    response_format = body.get("response_format")
    if response_format and not (isinstance(response_format, dict) and response_format.get("type") == "text"):
        raise _BadRequest("Only response_format {'type': 'text'} is supported by the embedded engine.",
                          "response_format")


def _parse_stops(body: dict[str, Any]) -> tuple[bytes, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    items = [stop] if isinstance(stop, str) else stop
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise _BadRequest("'stop' must be a string or a list of strings.", "stop")
    return tuple(s.encode("utf-8") for s in items if s)


def _requested_max_tokens(body: dict[str, Any], chat: bool) -> int | None:
    name = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    value = body.get(name)
    if value is None:
        return None if chat else COMPLETIONS_DEFAULT_MAX_TOKENS
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _BadRequest(f"'{name}' must be a positive integer.", name)
    return value


def _message_text(message: dict[str, Any], index: int) -> str:
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise _BadRequest("The embedded engine accepts only text content parts.",
                                  f"messages.[{index}].content")
            parts.append(part["text"])
        return "".join(parts)
    raise _BadRequest("Message content must be a string or a list of text parts.", f"messages.[{index}].content")


def _normalize_messages(body: dict[str, Any]) -> list[dict[str, str]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _BadRequest("'messages' must be a non-empty list.", "messages")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise _BadRequest("Each message must be an object with a 'role'.", f"messages.[{i}]")
        role = "system" if message["role"] == "developer" else message["role"]
        out.append({"role": role, "content": _message_text(message, i)})
    return out


def _fallback_chat_prompt(messages: list[dict[str, str]]) -> str:
    """For a GGUF without a chat template: 'Role: content' turns, one per line, ending with
    'Assistant:'. Generation also stops at a new 'User:' turn (see _FALLBACK_STOPS)."""
    lines = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
    return "\n".join([*lines, "Assistant:"])


_FALLBACK_STOPS = (b"\nUser:", b"\nSystem:")


# --------------------------------------------------------------------------------------------------
# The engine


class LlamaChatEngine:
    """/v1/chat/completions, /v1/completions and /v1/responses on a GGUF model, continuously batched.

    `n_ctx` is the total KV cache in tokens, split evenly between `n_seq_max` slots: one request's
    prompt + completion must fit in `n_ctx // n_seq_max` tokens (and the model's training context).
    KV memory is n_ctx x (bytes per token), e.g. ~23 KB/token for SmolLM2-135M.
    """

    def __init__(self, model_path: str, model_name: str, n_ctx: int = 8192, n_seq_max: int = 16,
                 threads: int | None = None, *, prefix_sharing: bool = True,
                 chat_template: str | None = None, owned_by: str = "overnight") -> None:
        """`chat_template` (Jinja, as in a GGUF's tokenizer.chat_template) replaces the model's own;
        `owned_by` is what GET /v1/models says of the model (a licence notice, where one is owed)."""
        self.name = f"embedded:{model_name}"
        self.owned_by = owned_by
        self.chat_template = chat_template
        # Keep a queue beyond the slots, so admission can pick requests that share a cached prefix.
        self.max_in_flight = 4 * n_seq_max
        self.shard_lines = 4 * n_seq_max  # a few seconds to minutes of decoding per shard
        self.model_path = model_path
        self.model_name = model_name
        self.n_ctx = n_ctx
        self.n_seq_max = n_seq_max
        self.threads = threads or os.cpu_count() or 1
        self.prefix_sharing = prefix_sharing
        self._native: _Native | None = None
        self._scheduler: _Scheduler | None = None
        self._formatter: Jinja2ChatFormatter | None = None
        self._start_lock = asyncio.Lock()
        self._closed = False

    def served_models(self) -> list[str]:
        return [self.model_name]

    @property
    def stats(self) -> EmbeddedStats | None:
        """Tokens generated, prompt tokens reused and slots busy (None before start)."""
        return self._scheduler.stats if self._scheduler is not None else None

    @property
    def context_window(self) -> int:
        """Max prompt + completion tokens of one request (after start)."""
        if self._native is None:
            raise RuntimeError("the engine is not started")
        return int(self._native.window)

    async def start(self) -> None:
        async with self._start_lock:
            if self._scheduler is not None:
                return
            if self._closed:
                raise RuntimeError("the engine is closed")
            native = await asyncio.to_thread(_Native, self.model_path, self.n_ctx, self.n_seq_max, self.threads)
            template = self.chat_template or native.chat_template()
            if template:
                self._formatter = Jinja2ChatFormatter(
                    template=template,
                    eos_token=native.special_text(llama_cpp.llama_vocab_eos(native.vocab)),
                    bos_token=native.special_text(llama_cpp.llama_vocab_bos(native.vocab)),
                    add_generation_prompt=True,
                )
            self._native = native
            self._scheduler = _Scheduler(native, self.n_seq_max, self.prefix_sharing)
            self._scheduler.thread.start()

    async def close(self) -> None:
        async with self._start_lock:
            self._closed = True
            scheduler, self._scheduler, self._native = self._scheduler, None, None
        if scheduler is not None:
            scheduler.stop()
            await asyncio.to_thread(scheduler.thread.join)

    async def execute(self, request: EngineRequest) -> EngineResponse:
        if self._scheduler is None and not self._closed:
            await self.start()
        scheduler, native = self._scheduler, self._native
        if scheduler is None or native is None:
            return EngineResponse.failure("engine_closed", "The embedded engine is shut down.")
        endpoint = request.endpoint
        if endpoint not in (CHAT, COMPLETIONS, RESPONSES):
            return EngineResponse.http_error(404, f"The embedded chat engine does not serve {endpoint}.",
                                             code="unknown_url")
        try:
            job = self._job_for(native, request)
        except _BadRequest as exc:
            return exc.response()
        scheduler.submit(job)
        try:
            result = await job.future
        except asyncio.CancelledError:
            job.cancelled = True  # the decode thread frees its slot at the next step
            raise
        if isinstance(result, EngineResponse):
            return result
        if endpoint == RESPONSES:
            answer = responses_api.ChatAnswer(result.text, result.finish_reason, result.prompt_tokens,
                                              result.completion_tokens, result.cached_tokens)
            return EngineResponse(200, responses_api.response_object(answer, request.body, self.model_name))
        return EngineResponse(200, self._body(result, endpoint == CHAT))

    # -- helpers ---------------------------------------------------------------------------------------

    def _job_for(self, native: _Native, request: EngineRequest) -> _Job:
        body = request.body
        if not isinstance(body, dict):
            raise _BadRequest("The request body must be a JSON object.", None)
        if request.endpoint != RESPONSES:
            return self._make_job(native, body, request.deadline, request.endpoint == CHAT)
        # A Responses request runs as the chat request it maps onto; the chat side's complaints
        # then name the Responses parameter (`input`, not `messages`).
        try:
            chat_body = responses_api.to_chat_body(body)
            return self._make_job(native, chat_body, request.deadline, True, noun="input")
        except responses_api.UnsupportedRequest as exc:
            raise _BadRequest(str(exc), exc.param, exc.code) from None
        except _BadRequest as exc:
            param = responses_api.RESPONSES_PARAMS.get(exc.param or "", exc.param)
            raise _BadRequest(str(exc), param, exc.code) from None

    def _make_job(self, native: _Native, body: dict[str, Any], deadline: float, chat: bool,
                  noun: str | None = None) -> _Job:
        """`noun`: what the prompt is called in messages (default: messages or prompt)."""
        _check_unsupported(body)
        sampling = _parse_sampling(body)
        stops = _parse_stops(body)
        if chat:
            prompt, extra_stops = self._chat_prompt(native, body)
            stops += extra_stops
        else:
            prompt = self._completion_prompt(native, body)
        max_new = self._max_new(native, body, chat, len(prompt), noun or ("messages" if chat else "prompt"))
        loop = asyncio.get_running_loop()
        return _Job(prompt=prompt, max_new=max_new, sampling=sampling, stops=stops,
                    deadline=deadline, loop=loop, future=loop.create_future())

    def _chat_prompt(self, native: _Native, body: dict[str, Any]) -> tuple[list[int], tuple[bytes, ...]]:
        messages = _normalize_messages(body)
        if self._formatter is None:
            return native.tokenize(_fallback_chat_prompt(messages), True, False), _FALLBACK_STOPS
        try:
            text = self._formatter(messages=messages).prompt  # type: ignore[arg-type]
        except Exception as exc:  # the template's raise_exception(), or a template/message mismatch
            raise _BadRequest(f"The chat template rejected these messages: {exc}", "messages") from exc
        # The template writes any BOS itself (llama-cpp-python: added_special=True).
        return native.tokenize(text, False, True), ()

    @staticmethod
    def _completion_prompt(native: _Native, body: dict[str, Any]) -> list[int]:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
            prompt = prompt[0]  # a batch of one prompt
        if isinstance(prompt, str):
            tokens = native.tokenize(prompt, True, True)
        elif isinstance(prompt, list) and prompt and all(
                isinstance(t, int) and not isinstance(t, bool) and 0 <= t < native.n_vocab for t in prompt):
            tokens = list(prompt)
        elif isinstance(prompt, list) and len(prompt) > 1:
            raise _BadRequest("The embedded engine takes one prompt per line; send one line per prompt.", "prompt")
        else:
            raise _BadRequest("'prompt' must be a string or a list of token ids.", "prompt")
        if not tokens:
            bos = llama_cpp.llama_vocab_bos(native.vocab)
            if bos < 0:
                raise _BadRequest("The prompt is empty.", "prompt")
            tokens = [bos]
        return tokens

    @staticmethod
    def _max_new(native: _Native, body: dict[str, Any], chat: bool, n_prompt: int, noun: str) -> int:
        requested = _requested_max_tokens(body, chat)
        window = native.window
        if requested is None:  # OpenAI chat default: up to the context length
            requested = int(window - n_prompt)
            if requested >= 1:
                return requested
        if requested < 1 or n_prompt + requested > window:
            raise _BadRequest(
                f"This model's maximum context length is {window} tokens. However, you requested "
                f"{n_prompt + max(requested, 1)} tokens ({n_prompt} in the {noun}, "
                f"{max(requested, 1)} in the completion). Please reduce the length of the "
                f"{noun} or completion.",
                noun, code="context_length_exceeded")
        return requested

    def _body(self, outcome: _Outcome, chat: bool) -> dict[str, Any]:
        usage = {
            "prompt_tokens": outcome.prompt_tokens,
            "completion_tokens": outcome.completion_tokens,
            "total_tokens": outcome.prompt_tokens + outcome.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": outcome.cached_tokens},
        }
        created = int(time.time())
        if chat:
            message = {"role": "assistant", "content": outcome.text, "refusal": None}
            return {
                "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": created,
                "model": self.model_name,
                "choices": [{"index": 0, "message": message, "finish_reason": outcome.finish_reason,
                             "logprobs": None}],
                "usage": usage,
            }
        return {
            "id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": created,
            "model": self.model_name,
            "choices": [{"text": outcome.text, "index": 0, "finish_reason": outcome.finish_reason,
                         "logprobs": None}],
            "usage": usage,
        }
