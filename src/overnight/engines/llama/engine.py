"""The embedded llama.cpp chat engine: the `Engine` port over the scheduler.

`execute` answers a request as a whole (what batch lines need); `stream` also yields the text as it is
generated, for an interactive caller. Both parse the body on the event loop (openai_params) and leave
decoding to the scheduler's thread (scheduler.py explains batching, prefix sharing and priority).
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import llama_cpp
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from overnight.engines import responses_api
from overnight.engines.errors import BadRequest
from overnight.engines.handoff import call_in_loop
from overnight.engines.llama.native import Native
from overnight.engines.llama.openai_params import CHAT, ENDPOINTS, RESPONSES, parse_request
from overnight.engines.llama.scheduler import Job, Outcome, Scheduler
from overnight.engines.port import EngineRequest, EngineResponse
from overnight.engines.stats import EmbeddedStats


class LlamaChatEngine:
    """/v1/chat/completions, /v1/completions and /v1/responses on a GGUF model, continuously batched.

    `n_ctx` is the total KV cache in tokens, split evenly between `n_seq_max` slots: one request's
    prompt + completion must fit in `n_ctx // n_seq_max` tokens (and the model's training context).
    KV memory is n_ctx x (bytes per token), e.g. ~23 KB/token for SmolLM2-135M.
    """

    def __init__(self, model_path: str, model_name: str, n_ctx: int = 8192, n_seq_max: int = 16,
                 threads: int | None = None, *, prefix_sharing: bool = True, deterministic: bool = False,
                 chat_template: str | None = None, owned_by: str = "overnight") -> None:
        """`chat_template` (Jinja, as in a GGUF's tokenizer.chat_template) replaces the model's own;
        `owned_by` is what GET /v1/models says of the model (a licence notice, where one is owed).
        `deterministic`: a temperature-0 answer depends only on its request (the KV cache in q8_0:
        native.py, scheduler.py)."""
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
        self.deterministic = deterministic
        self._native: Native | None = None
        self._scheduler: Scheduler | None = None
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
            native = await asyncio.to_thread(Native, self.model_path, self.n_ctx, self.n_seq_max, self.threads,
                                             deterministic=self.deterministic)
            template = self.chat_template or native.chat_template()
            try:
                if template:
                    self._formatter = Jinja2ChatFormatter(
                        template=template,
                        eos_token=native.special_text(llama_cpp.llama_vocab_eos(native.vocab)),
                        bos_token=native.special_text(llama_cpp.llama_vocab_bos(native.vocab)),
                        add_generation_prompt=True,
                    )
            except Exception:
                native.free()  # its KV cache is gigabytes: a template that does not compile must not keep it
                raise
            self._native = native
            self.n_seq_max = native.n_seq_max  # fewer where memory is short (kv_budget.py)
            self._scheduler = Scheduler(native, self.n_seq_max, self.prefix_sharing)
            self._scheduler.thread.start()

    async def close(self) -> None:
        async with self._start_lock:
            self._closed = True
            scheduler, self._scheduler, self._native = self._scheduler, None, None
        if scheduler is not None:
            scheduler.stop()
            await asyncio.to_thread(scheduler.thread.join)

    async def execute(self, request: EngineRequest) -> EngineResponse:
        """The whole answer: the response body OpenAI would send, or a per-request error."""
        received = int(time.time())
        job = await self._submit(request, None)
        if isinstance(job, EngineResponse):
            return job
        try:
            result = await job.future
        except asyncio.CancelledError:
            job.cancelled = True  # the decode thread frees its slot at the next step
            raise
        return self._respond(request, result, received)

    async def stream(self, request: EngineRequest) -> AsyncIterator[str | EngineResponse]:
        """Yield the generated text in pieces as it becomes final, then the same EngineResponse that
        `execute` returns (its body has the whole text, usage and finish_reason). The pieces join to
        the response's text: text a stop string could still cut is held back until it cannot. A
        request that fails yields no text, only its error response. Closing the iterator early
        cancels the request. Mark the request `online` to have it run before queued batch work."""
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue[str | None] = asyncio.Queue()  # None: the job's future is done

        def on_text(piece: str) -> None:  # decode thread
            call_in_loop(loop, pieces.put_nowait, piece)

        job = await self._submit(request, on_text)
        if isinstance(job, EngineResponse):
            yield job
            return
        # Resolution is scheduled after every piece (call_soon_threadsafe keeps order), and a done
        # callback runs after the resolution: so the None comes after the last piece.
        job.future.add_done_callback(lambda _: pieces.put_nowait(None))
        try:
            while (piece := await pieces.get()) is not None:
                yield piece
            yield self._respond(request, job.future.result())
        finally:
            if not job.future.done():
                job.cancelled = True  # the consumer left or was cancelled: free the slot

    # -- helpers ---------------------------------------------------------------------------------------

    async def _submit(self, request: EngineRequest,
                      on_text: Callable[[str], None] | None) -> Job | EngineResponse:
        """Queue the request's job, or answer at once (engine closed, unknown endpoint, bad body)."""
        if self._scheduler is None and not self._closed:
            await self.start()
        scheduler, native = self._scheduler, self._native
        if scheduler is None or native is None:
            return EngineResponse.failure("engine_closed", "The embedded engine is shut down.")
        if request.endpoint not in ENDPOINTS:
            return EngineResponse.http_error(404, f"The embedded chat engine does not serve {request.endpoint}.",
                                             code="unknown_url")
        try:
            parsed = parse_request(native, self._formatter, request)
        except BadRequest as exc:
            return exc.response()
        loop = asyncio.get_running_loop()
        job = Job(prompt=parsed.prompt, max_new=parsed.max_new, sampling=parsed.sampling, stops=parsed.stops,
                  deadline=request.deadline, loop=loop, future=loop.create_future(),
                  online=request.online, on_text=on_text)
        scheduler.submit(job)
        return job

    def _respond(self, request: EngineRequest, result: Outcome | EngineResponse, received: int | None = None
                 ) -> EngineResponse:
        if isinstance(result, EngineResponse):
            return result
        if request.endpoint == RESPONSES:
            answer = responses_api.ChatAnswer(result.text, result.finish_reason, result.prompt_tokens,
                                              result.completion_tokens, result.cached_tokens)
            return EngineResponse(200, responses_api.response_object(answer, request.body, self.model_name, received))
        return EngineResponse(200, self._body(result, request.endpoint == CHAT))

    def _body(self, outcome: Outcome, chat: bool) -> dict[str, Any]:
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
