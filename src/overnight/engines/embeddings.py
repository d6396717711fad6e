"""Embedded /v1/embeddings: all-MiniLM-L6-v2 as a numpy BERT forward pass (no torch).

tokenizers + safetensors + numpy, as sentence-transformers computes it: BERT encoder, mean pooling
over the attention mask, L2 normalization. An input longer than the model's `max_seq_length` (256
word pieces, sentence_bert_config.json) is refused with OpenAI's context-length error, as OpenAI
refuses one over its models' limit: sentence-transformers truncates silently, and two long texts
that differ only after their first 256 pieces got the same vector.

Concurrent `execute` calls are gathered by a worker thread into batches of up to `max_batch` texts,
sorted by length to keep padding small; the forward pass never runs on the event loop.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import threading
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np
from safetensors.numpy import load_file
from tokenizers import Tokenizer

from overnight.engines.errors import BadRequest
from overnight.engines.handoff import resolve_threadsafe
from overnight.engines.port import EngineRequest, EngineResponse

log = logging.getLogger(__name__)

EMBEDDINGS = "/v1/embeddings"
MAX_INPUTS = 2048  # OpenAI's limit on inputs per request
_COUNTED_TOKENS = 8192  # an input is tokenized this far at most: its length is reported up to here


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

    ids: list[int]
    vector: np.ndarray | None = None


@dataclass(eq=False)
class _Job:
    items: list[_Item]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[str | None]  # None when done, else an error message

    def resolve(self, error: str | None) -> None:
        """Thread-safe: the future belongs to the event loop."""
        resolve_threadsafe(self.loop, self.future, error)


class MiniLMEmbeddingEngine:
    """/v1/embeddings with all-MiniLM-L6-v2 (384 dimensions), batched across concurrent requests."""

    def __init__(self, model_dir: str, model_name: str = "all-MiniLM-L6-v2", threads: int | None = None,
                 *, max_batch: int = 64, max_seq_length: int = 256) -> None:
        self.name = f"embedded:{model_name}"
        self.max_in_flight = 2 * max_batch  # one batch computing, the next one gathering
        self.shard_lines = 256
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
        self._queue: deque[_Job] = deque()
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
        assert self._tokenizer is not None
        encodings = self._tokenizer.encode_batch(texts)
        for i, encoding in enumerate(encodings):
            if len(encoding.ids) > self.max_seq_length:
                return self._too_long(i if len(texts) > 1 else None, len(encoding.ids)).response()
        loop = asyncio.get_running_loop()
        job = _Job(items=[_Item(ids=e.ids) for e in encodings], loop=loop, future=loop.create_future())
        with self._cond:
            self._queue.append(job)
            self._cond.notify()
        error = await job.future
        if error is not None:
            return EngineResponse.failure("engine_error", error)
        return EngineResponse(200, self._body(job, base64_out))

    def _too_long(self, index: int | None, tokens: int) -> BadRequest:
        requested = f"{tokens}" if tokens < _COUNTED_TOKENS else f"more than {_COUNTED_TOKENS - 1}"
        where = f" (input[{index}])" if index is not None else ""
        return BadRequest(
            f"This model's maximum context length is {self.max_seq_length} tokens, however you requested "
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
            raise BadRequest("The embedded embedding engine accepts text inputs only, not token ids.", "input")
        if any(not t for t in texts):
            raise BadRequest("'input' must not contain empty strings.", "input")
        if len(texts) > MAX_INPUTS:
            raise BadRequest(f"'input' may hold at most {MAX_INPUTS} items.", "input")
        fmt = body.get("encoding_format") or "float"
        if fmt not in ("float", "base64"):
            raise BadRequest("'encoding_format' must be 'float' or 'base64'.", "encoding_format")
        dims = body.get("dimensions")
        if dims is not None and dims != self.dimensions:
            raise BadRequest(f"{self.model_name} produces {self.dimensions} dimensions only.", "dimensions")
        return texts, fmt == "base64"

    def _body(self, job: _Job, base64_out: bool) -> dict[str, Any]:
        data = []
        for i, item in enumerate(job.items):
            assert item.vector is not None
            vec = item.vector.astype("<f4")
            embedding: Any = base64.b64encode(vec.tobytes()).decode("ascii") if base64_out else vec.tolist()
            data.append({"object": "embedding", "index": i, "embedding": embedding})
        tokens = sum(len(item.ids) for item in job.items)
        return {"object": "list", "data": data, "model": self.model_name,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    # -- worker thread ------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            jobs = self._take()
            if jobs is None:
                break
            try:
                self._embed([item for job in jobs for item in job.items])
                error = None
            except Exception:  # resolve the waiters whatever happened
                log.exception("embedding batch failed")
                error = "The embedded embedding engine failed on this request."
            for job in jobs:
                job.resolve(error)
        with self._cond:
            leftover, self._queue = list(self._queue), deque()
        for job in leftover:
            job.resolve("The embedded embedding engine was shut down before this request ran.")

    def _take(self) -> list[_Job] | None:
        """Whole jobs up to max_batch texts (at least one job), or None when stopping."""
        with self._cond:
            while not self._queue and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return None
            jobs: list[_Job] = []
            n = 0
            while self._queue and (not jobs or n + len(self._queue[0].items) <= self.max_batch):
                job = self._queue.popleft()
                jobs.append(job)
                n += len(job.items)
            return jobs

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
