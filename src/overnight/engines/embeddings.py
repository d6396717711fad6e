"""Embedded /v1/embeddings: all-MiniLM-L6-v2 as a numpy BERT forward pass (no torch).

tokenizers + safetensors + numpy, as sentence-transformers computes it: BERT encoder, mean pooling
over the attention mask, L2 normalization. An input longer than the model's `max_seq_length` (256
word pieces with the [CLS] and [SEP] every input gets, sentence_bert_config.json) is refused with
OpenAI's context-length error, as OpenAI refuses one over its models' limit: sentence-transformers
truncates silently, and two long texts that differ only after their first 256 pieces got the same
vector. Tokens are counted as OpenAI counts them, the text's own (in `usage` and in that error):
254 of them fit.

Concurrent `execute` calls are gathered by a worker thread into batches of up to `max_batch` texts,
sorted by length to keep padding small; neither tokenizing nor the forward pass runs on the event
loop (128 lines of 2048 texts tokenized there stalled a worker's heartbeats for a minute). The
thread takes texts, not whole requests: online requests' texts go first, so one waits at most one
forward pass behind a batch line of 2048 texts (minutes of work on 2 cores) instead of all of it;
a batch line whose batch stopped, or whose deadline passed, is not computed any further.

Vectors are written as float32 values in their shortest form (orjson's numpy serialization), as
OpenAI writes them: as Python doubles they took 17 digits, 1.7x the bytes for the same values.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson
from safetensors.numpy import load_file
from tokenizers import Tokenizer

from overnight import constants as C
from overnight.engines.errors import BadRequest
from overnight.engines.handoff import resolve_threadsafe
from overnight.engines.port import EngineRequest, EngineResponse

log = logging.getLogger(__name__)

EMBEDDINGS = "/v1/embeddings"
MAX_INPUTS = 2048  # OpenAI's limit on inputs per request
_COUNTED_TOKENS = 8192  # an input is tokenized this far at most: its length is reported up to here
_SPECIALS = 2  # [CLS] and [SEP], added to every input: in the model's context, not in the user's count


def _layer_norm(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, eps: float) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * gamma + beta


def _erf(x: np.ndarray) -> np.ndarray:
    """Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7): numpy has no erf and scipy is not a dependency."""
    sign = np.sign(x)
    a = np.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * a)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    return sign * (1.0 - poly * np.exp(-a * a))


def _gelu(x: np.ndarray) -> np.ndarray:
    # BERT's exact (erf) GELU, not the tanh approximation.
    return (0.5 * x * (1.0 + _erf(x * np.float32(0.7071067811865476)))).astype(np.float32)


class _Bert:
    """The BERT encoder weights and forward pass (float32)."""

    def __init__(self, model_dir: str) -> None:
        with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
            config = json.load(f)
        self.layers = int(config["num_hidden_layers"])
        self.heads = int(config["num_attention_heads"])
        self.hidden = int(config["hidden_size"])
        self.eps = float(config.get("layer_norm_eps", 1e-12))
        raw = load_file(os.path.join(model_dir, "model.safetensors"))
        # Checkpoints are saved with or without the "bert." prefix.
        self.w = {k.removeprefix("bert."): v.astype(np.float32) for k, v in raw.items()}

    def _p(self, name: str) -> np.ndarray:
        return self.w[name]

    def forward(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """ids, mask: (batch, seq) -> mean-pooled, L2-normalized (batch, hidden)."""
        _, seq = ids.shape
        x = (self._p("embeddings.word_embeddings.weight")[ids]
             + self._p("embeddings.position_embeddings.weight")[:seq][None]
             + self._p("embeddings.token_type_embeddings.weight")[0][None, None])
        x = _layer_norm(x, self._p("embeddings.LayerNorm.weight"), self._p("embeddings.LayerNorm.bias"), self.eps)
        bias = np.where(mask[:, None, None, :] > 0, 0.0, -1e9).astype(np.float32)  # pad keys get no attention
        for i in range(self.layers):
            x = self._layer(x, bias, f"encoder.layer.{i}.")
        m = mask[:, :, None].astype(np.float32)
        pooled = (x * m).sum(1) / np.clip(m.sum(1), 1e-9, None)
        return pooled / np.clip(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12, None)

    def _linear(self, x: np.ndarray, name: str) -> np.ndarray:
        return x @ self._p(name + ".weight").T + self._p(name + ".bias")

    def _layer(self, x: np.ndarray, bias: np.ndarray, pre: str) -> np.ndarray:
        b, s, h = x.shape
        d = h // self.heads

        def split(t: np.ndarray) -> np.ndarray:
            return t.reshape(b, s, self.heads, d).transpose(0, 2, 1, 3)

        q = split(self._linear(x, pre + "attention.self.query"))
        k = split(self._linear(x, pre + "attention.self.key"))
        v = split(self._linear(x, pre + "attention.self.value"))
        scores = q @ k.transpose(0, 1, 3, 2) / np.float32(np.sqrt(d)) + bias
        scores -= scores.max(-1, keepdims=True)
        probs = np.exp(scores)
        probs /= probs.sum(-1, keepdims=True)
        ctx = (probs @ v).transpose(0, 2, 1, 3).reshape(b, s, h)
        x = _layer_norm(x + self._linear(ctx, pre + "attention.output.dense"),
                        self._p(pre + "attention.output.LayerNorm.weight"),
                        self._p(pre + "attention.output.LayerNorm.bias"), self.eps)
        inter = _gelu(self._linear(x, pre + "intermediate.dense"))
        return _layer_norm(x + self._linear(inter, pre + "output.dense"),
                           self._p(pre + "output.LayerNorm.weight"), self._p(pre + "output.LayerNorm.bias"), self.eps)


@dataclass(eq=False)
class _Item:
    """One input text of one request; `vector` is filled by the worker."""

    ids: np.ndarray  # int32 word-piece ids, [CLS] and [SEP] included
    vector: np.ndarray | None = None


@dataclass(eq=False)
class _Job:
    """One request's texts, handed to the model a batch at a time (`taken` so far)."""

    items: list[_Item]  # in input order
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[EngineResponse | None]  # None when every vector is in
    deadline: float
    stopped: Callable[[], bool] | None = None
    order: list[int] = field(default_factory=list)  # indexes into items, shortest first: little padding
    taken: int = 0
    left: int = 0  # items not computed yet
    resolved: bool = False

    def __post_init__(self) -> None:
        self.order = sorted(range(len(self.items)), key=lambda i: len(self.items[i].ids))
        self.left = len(self.items)

    def unwanted(self) -> EngineResponse | None:
        """Why this job's remaining texts should not be computed, if they should not."""
        if self.future.done():  # the waiter gave up (an online client went away)
            return EngineResponse.failure(C.ENGINE_ERROR, "The request was abandoned.")
        if self.stopped is not None and self.stopped():
            return EngineResponse.failure(C.BATCH_CANCELLED, "The batch stopped before this request ran.")
        if time.time() >= self.deadline:
            return EngineResponse.failure(
                C.BATCH_EXPIRED, "This request could not be executed before the completion window expired.")
        return None

    def resolve(self, outcome: EngineResponse | None) -> None:
        """Thread-safe: the future belongs to the event loop. Once only."""
        if not self.resolved:
            self.resolved = True
            resolve_threadsafe(self.loop, self.future, outcome)


class MiniLMEmbeddingEngine:
    """/v1/embeddings with all-MiniLM-L6-v2 (384 dimensions), batched across concurrent requests."""

    def __init__(self, model_dir: str, model_name: str = "all-MiniLM-L6-v2", threads: int | None = None,
                 *, max_batch: int = 64, max_seq_length: int = 256) -> None:
        self.name = f"embedded:{model_name}"
        self.max_in_flight = 2 * max_batch  # one batch computing, the next one gathering
        # A shard's output lines wait in memory for its commit, and a line of 2048 short texts
        # answers ~10 MB of vectors: 32 lines keep a shard's worst case near 300 MB (256 was 2.4 GB).
        self.shard_lines = 32
        self.owned_by = "overnight"
        self.model_dir = model_dir
        self.model_name = model_name
        # Recorded only: numpy's BLAS thread pool is sized by the environment (OMP_NUM_THREADS etc.).
        self.threads = threads or os.cpu_count() or 1
        self.max_batch = max_batch
        self.max_seq_length = max_seq_length
        self.dimensions = 384
        self._bert: _Bert | None = None
        self._tokenizer: Tokenizer | None = None
        self._queue: deque[_Job] = deque()  # batch lines
        self._online: deque[_Job] = deque()  # served first
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._start_lock = asyncio.Lock()

    def served_models(self) -> list[str]:
        return [self.model_name]

    async def start(self) -> None:
        async with self._start_lock:
            if self._thread is not None:
                return
            self._tokenizer, bert = await asyncio.to_thread(self._load)
            self._bert = bert
            self.dimensions = bert.hidden
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="overnight-embeddings", daemon=True)
            self._thread.start()

    def _load(self) -> tuple[Tokenizer, _Bert]:
        tokenizer = Tokenizer.from_file(os.path.join(self.model_dir, "tokenizer.json"))
        tokenizer.no_padding()
        # Cut far past the limit: enough to say how long an input is, without holding the word
        # pieces of a 100 MB string.
        tokenizer.enable_truncation(max_length=_COUNTED_TOKENS)
        return tokenizer, _Bert(self.model_dir)

    async def close(self) -> None:
        thread, self._thread = self._thread, None
        if thread is None:
            return
        with self._cond:
            self._stopping = True
            self._cond.notify()
        await asyncio.to_thread(thread.join)

    async def execute(self, request: EngineRequest) -> EngineResponse:
        if self._thread is None:
            await self.start()
        if request.endpoint != EMBEDDINGS:
            return EngineResponse.http_error(404, f"The embedding engine does not serve {request.endpoint}.",
                                             code="unknown_url")
        try:
            texts, base64_out = self._parse(request.body)
        except BadRequest as exc:
            return exc.response()
        try:
            token_ids = await asyncio.to_thread(self._token_ids, texts)  # the tokenizer releases the GIL
        except BadRequest as exc:
            return exc.response()
        loop = asyncio.get_running_loop()
        job = _Job([_Item(ids) for ids in token_ids], loop, loop.create_future(), request.deadline, request.stopped)
        with self._cond:
            (self._online if request.online else self._queue).append(job)
            self._cond.notify()
        failure = await job.future
        if failure is not None:
            return failure
        body, raw = self._body(job, base64_out)
        return EngineResponse(200, body, raw=raw)

    def _token_ids(self, texts: list[str]) -> list[np.ndarray]:
        """Each text's word-piece ids (only the ids are kept: a tokenizer Encoding of 200 pieces
        holds ~30 kB), or the context-length error of the first that is too long."""
        assert self._tokenizer is not None
        ids = [np.asarray(e.ids, dtype=np.int32) for e in self._tokenizer.encode_batch(texts)]
        for i, one in enumerate(ids):
            if len(one) > self.max_seq_length:
                raise self._too_long(i if len(texts) > 1 else None, len(one) - _SPECIALS)
        return ids

    def _too_long(self, index: int | None, tokens: int) -> BadRequest:
        counted = _COUNTED_TOKENS - _SPECIALS
        requested = f"{tokens}" if tokens < counted else f"more than {counted - 1}"
        where = f" (input[{index}])" if index is not None else ""
        return BadRequest(
            f"This model's maximum context length is {self.max_seq_length - _SPECIALS} tokens, however you requested "
            f"{requested} tokens{where} ({requested} in your prompt; 0 for the completion). Please reduce your "
            "prompt; or completion length.", "input", code="context_length_exceeded")

    def _parse(self, body: dict[str, Any]) -> tuple[list[str], bool]:
        if not isinstance(body, dict):
            raise BadRequest("The request body must be a JSON object.", None)
        raw = body.get("input")
        texts = [raw] if isinstance(raw, str) else raw
        if not isinstance(texts, list) or not texts:
            raise BadRequest("'input' must be a string or a non-empty list of strings.", "input")
        if not all(isinstance(t, str) for t in texts):
            # Token ids are another tokenizer's (tiktoken's, from a client written for OpenAI):
            # embedded as this model's ids they would be a wrong vector, not an error.
            raise BadRequest(
                "The embedded embedding engine accepts text inputs only, not token ids: send the text. (LangChain's "
                "OpenAIEmbeddings sends token ids unless check_embedding_ctx_length=False.)", "input")
        if any(not t for t in texts):
            raise BadRequest("'input' must not contain empty strings.", "input")
        if len(texts) > MAX_INPUTS:
            raise BadRequest(f"'input' may hold at most {MAX_INPUTS} items.", "input")
        fmt = body.get("encoding_format")
        fmt = "float" if fmt is None else fmt  # "" or false is refused, as OpenAI does
        if fmt not in ("float", "base64"):
            raise BadRequest("'encoding_format' must be 'float' or 'base64'.", "encoding_format")
        dims = body.get("dimensions")
        if dims is not None and dims != self.dimensions:
            raise BadRequest(f"{self.model_name} produces {self.dimensions} dimensions only.", "dimensions")
        return texts, fmt == "base64"

    def _body(self, job: _Job, base64_out: bool) -> tuple[dict[str, Any], bytes]:
        """The answer as a dict without the vectors (what the worker reads: usage, model) and as
        the JSON text with them (what the user gets)."""
        data = []
        for i, item in enumerate(job.items):
            assert item.vector is not None
            vec = item.vector.astype("<f4")
            embedding: Any = base64.b64encode(vec.tobytes()).decode("ascii") if base64_out else vec
            data.append({"object": "embedding", "index": i, "embedding": embedding})
        tokens = sum(len(item.ids) - _SPECIALS for item in job.items)  # the text's, as OpenAI counts
        head = {"object": "list", "model": self.model_name, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
        raw = orjson.dumps({"object": "list", "data": data, "model": self.model_name, "usage": head["usage"]},
                           option=orjson.OPT_SERIALIZE_NUMPY)
        return head, raw

    # -- worker thread ------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            taken = self._take()
            if taken is None:
                break
            try:
                self._embed([item for _, items in taken for item in items])
                failure = None
            except Exception:  # resolve the waiters whatever happened
                log.exception("embedding batch failed")
                failure = EngineResponse.failure(C.ENGINE_ERROR, "The embedded embedding engine failed on this request.")
            for job, items in taken:
                if failure is not None:
                    self._withdraw(job)
                    job.resolve(failure)
                    continue
                job.left -= len(items)
                if job.left == 0:
                    job.resolve(None)
        with self._cond:
            leftover = list(self._online) + list(self._queue)
            self._online.clear()
            self._queue.clear()
        for job in leftover:
            job.resolve(EngineResponse.failure(
                C.ENGINE_ERROR, "The embedded embedding engine was shut down before this request ran."))

    def _take(self) -> list[tuple[_Job, list[_Item]]] | None:
        """Up to max_batch texts, online requests' first, a job's texts in its length order; jobs
        no longer wanted are resolved and dropped. None when stopping."""
        with self._cond:
            while not self._online and not self._queue and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return None
            taken: list[tuple[_Job, list[_Item]]] = []
            room = self.max_batch
            for queue in (self._online, self._queue):
                while queue and room:
                    job = queue[0]
                    if (why := job.unwanted()) is not None:
                        queue.popleft()
                        job.resolve(why)
                        continue
                    end = min(job.taken + room, len(job.order))
                    taken.append((job, [job.items[i] for i in job.order[job.taken:end]]))
                    room -= end - job.taken
                    job.taken = end
                    if job.taken == len(job.order):
                        queue.popleft()
            return taken

    def _withdraw(self, job: _Job) -> None:
        with self._cond:
            for queue in (self._online, self._queue):
                if job in queue:
                    queue.remove(job)

    def _embed(self, items: list[_Item]) -> None:
        assert self._bert is not None
        ordered = sorted(items, key=lambda it: len(it.ids))  # similar lengths together: less padding
        for start in range(0, len(ordered), self.max_batch):
            chunk = ordered[start:start + self.max_batch]
            width = max(len(it.ids) for it in chunk)
            ids = np.zeros((len(chunk), width), dtype=np.int64)
            mask = np.zeros((len(chunk), width), dtype=np.int64)
            for row, it in enumerate(chunk):
                ids[row, :len(it.ids)] = it.ids
                mask[row, :len(it.ids)] = 1
            for it, vec in zip(chunk, self._bert.forward(ids, mask), strict=True):
                it.vector = vec
