"""Any OpenAI-compatible server (vLLM, SGLang, llama.cpp, Ollama, a hosted provider) over HTTP.

The client is the hot path of a batch, so it is pyreqwest: Rust's reqwest/hyper, with the
connection pool, HTTP parsing and socket I/O on its own thread, off the GIL. Against one loopback
upstream at concurrency 64 on the 2-core dev machine it sustained ~18,000 requests/s at ~50 us of
CPU per request, where aiohttp sustained ~11,500 at ~80 us and httpx ~400.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson
from pyreqwest.client import Client, ClientBuilder
from pyreqwest.exceptions import RequestError, RequestTimeoutError

from overnight import constants as C
from overnight.engines.limiter import AdaptiveLimiter
from overnight.engines.online import EVENT_STREAM, JSON, OnlineReply, relayed_headers
from overnight.engines.port import EngineRequest, EngineResponse
from overnight.engines.retry import OVERLOAD_STATUS, RetryPolicy, parse_retry_after
from overnight.engines.stats import UpstreamStats
from overnight.json_text import loads_standard
from overnight.settings import UpstreamSettings

# An online answer's whole time (a stream lasts as long as the answer is long); what bounds it is
# the read timeout between the upstream's bytes.
ONLINE_TOTAL_TIMEOUT = timedelta(hours=24)
_EXPIRED_MESSAGE = "This request could not be executed before the completion window expired."
_CANCELLED_MESSAGE = "This request was not executed because the batch was cancelled."


class UpstreamEngine:
    sends_raw_body = True  # a RawBodyEngine: `body` is not read when `raw_body` is given

    def __init__(self, settings: UpstreamSettings, policy: RetryPolicy | None = None) -> None:
        self.settings = settings
        self.name = settings.label
        self.max_in_flight = settings.max_concurrency
        self.shard_lines = 1000
        self.owned_by = "overnight"
        self.policy = policy or RetryPolicy(
            max_attempts=settings.retry.max_attempts,
            base_delay=settings.retry.base_delay,
            max_delay=settings.retry.max_delay,
        )
        self.limiter = AdaptiveLimiter(
            settings.initial_concurrency, settings.min_concurrency, settings.max_concurrency
        )
        self._base = settings.base_url.rstrip("/")
        self._headers = {"Content-Type": "application/json"}
        if settings.api_key:
            self._headers["Authorization"] = f"Bearer {settings.api_key}"
        self.stats = UpstreamStats()  # published as Prometheus metrics by the worker's heartbeat
        self._client: Client | None = None
        self._urls: dict[str, str] = {}

    async def start(self) -> None:
        if self._client is None:
            builder = (
                ClientBuilder()
                .max_connections(self.settings.max_concurrency)
                .default_headers(self._headers)
                .connect_timeout(timedelta(seconds=10))
                .timeout(timedelta(seconds=self.settings.timeout_seconds))
                # Bounds each wait for bytes, the headers included: what bounds an online stream,
                # whose total time is the answer's length (see send_online).
                .read_timeout(timedelta(seconds=self.settings.timeout_seconds))
                .pool_idle_timeout(timedelta(seconds=60))
                .no_proxy()  # proxy variables are not read: upstreams are named explicitly
            )
            if self.settings.ca_file is not None:
                builder = builder.add_root_certificate_pem(Path(self.settings.ca_file).read_bytes())
            self._client = builder.build()

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    def served_models(self) -> list[str]:
        return []

    def set_share(self, share: int) -> None:
        """This process's part of `max_concurrency`, which is a total across all workers."""
        self.limiter.set_ceiling(share)

    def url_for(self, endpoint: str) -> str:
        """The OpenAI SDK's rule: the base URL is the API root, the endpoint goes after it without
        its `/v1` (`http://host:8001/v1` -> `.../v1/chat/completions`, Gemini's `.../v1beta/openai`
        -> `.../v1beta/openai/chat/completions`). A base with no path at all is a server's root:
        `/v1` is added (`http://host:8001` -> `http://host:8001/v1/chat/completions`)."""
        url = self._urls.get(endpoint)
        if url is None:
            root_only = urlsplit(self._base).path == ""
            url = self._urls[endpoint] = self._base + (endpoint if root_only else endpoint.removeprefix("/v1"))
        return url

    async def execute(self, request: EngineRequest) -> EngineResponse:
        if self._client is None:
            await self.start()
        url = self.url_for(request.endpoint)
        payload = request.raw_body if request.raw_body is not None else orjson.dumps(request.body)
        attempt = 0
        while True:
            attempt += 1
            now = time.time()
            if now >= request.deadline:
                return EngineResponse.failure(C.BATCH_EXPIRED, _EXPIRED_MESSAGE)
            response, retry_after = await self._attempt(url, payload, request.deadline, request.online,
                                                        request.stopped)
            if response.ok:
                return response
            decision = self.policy.decide(attempt, response.status_code, retry_after, time.time(), request.deadline)
            if not decision.retry:
                return response
            self.stats.retries += 1
            if await _wait_unless_stopped(decision.delay, request.stopped):
                return EngineResponse.failure(C.BATCH_CANCELLED, _CANCELLED_MESSAGE)

    async def send_online(self, request: EngineRequest) -> OnlineReply:
        """One attempt, in the online lane (ahead of batch requests, which give way while it runs),
        answered with the upstream's status and bytes as they arrive: a streamed answer's events
        reach the client as the upstream sends them. No retry here: the client (the OpenAI SDK
        retries 429s and 5xx itself) decides, and an answer already relayed cannot be taken back."""
        if self._client is None:
            await self.start()
        assert self._client is not None
        payload = request.raw_body if request.raw_body is not None else orjson.dumps(request.body)
        epoch = await self.limiter.acquire(online=True)
        started = time.perf_counter()
        # No read-ahead buffer: with one, pyreqwest holds the answer back until the buffer (64 KiB by
        # default) is full or the body ends, and a stream's events would arrive all at once.
        builder = self._client.post(self.url_for(request.endpoint)).body_bytes(payload)
        # A long answer streamed as it is generated may take longer than `timeout_seconds` in all,
        # and is cut off only if the upstream goes silent that long (the client's read timeout).
        builder = builder.timeout(ONLINE_TOTAL_TIMEOUT)
        stream = builder.streamed_read_buffer_limit(0).build_streamed()
        try:
            resp = await stream.__aenter__()
        except RequestTimeoutError:
            self.limiter.on_overload(epoch)
            self._end_online(started, "timeout")
            return OnlineReply.error(504, f"The upstream {self.name} did not answer within the timeout.",
                                     "server_error", code="upstream_timeout")
        except RequestError as exc:
            self._end_online(started, "unreachable")
            return OnlineReply.error(502, f"Could not reach the upstream {self.name}: {_describe(exc)}.",
                                     "server_error", code="upstream_unreachable")
        except BaseException:
            self._end_online(started, None)
            raise
        status = resp.status
        if status >= 400:
            self.stats.error(f"http_{status}")
        if status in OVERLOAD_STATUS:
            self.limiter.on_overload(epoch)  # online traffic's overloads shrink the batch lane too
        media_type = resp.get_header("content-type") or (EVENT_STREAM if status < 300 else JSON)

        async def chunks() -> AsyncIterator[bytes]:
            reader = resp.body_reader
            while (chunk := await reader.read_chunk()) is not None:
                yield bytes(chunk)

        async def close() -> None:
            try:
                await stream.__aexit__(None, None, None)
            finally:
                self._end_online(started, None)

        return OnlineReply(status, media_type, chunks=chunks(), on_close=close, headers=relayed_headers(resp.headers))

    def _end_online(self, started: float, error: str | None) -> None:
        self.limiter.release(online=True)
        self.stats.latency.observe(time.perf_counter() - started)
        if error is not None:
            self.stats.error(error)

    async def _attempt(self, url: str, payload: bytes, deadline: float, online: bool = False,
                       stopped: Callable[[], bool] | None = None) -> tuple[EngineResponse, float | None]:
        assert self._client is not None
        limiter = self.limiter
        if not online and limiter.try_take_batch():
            epoch = limiter.epoch
        else:
            epoch = await limiter.acquire(online)
            # The wait can be long (this worker's share of the upstream is small, a retry's back-off):
            # a line whose batch was cancelled meanwhile is not sent.
            if stopped is not None and stopped():
                limiter.release(online)
                return EngineResponse.failure(C.BATCH_CANCELLED, _CANCELLED_MESSAGE), None
        # The deadline is checked after the wait for a concurrency slot, which can be long: no
        # request starts after the completion window closed.
        time_left = deadline - time.time()
        capped_by_deadline = time_left < self.settings.timeout_seconds
        builder = self._client.post(url).body_bytes(payload)
        if capped_by_deadline:
            builder = builder.timeout(timedelta(seconds=max(time_left, 0.001)))
        stats = self.stats
        started = time.perf_counter()
        try:
            if time_left <= 0:
                return EngineResponse.failure(C.BATCH_EXPIRED, _EXPIRED_MESSAGE), None
            resp = await builder.build().send()
            raw = bytes(await resp.bytes())
            status = resp.status
            request_id = resp.get_header("x-request-id")
            retry_after = parse_retry_after(resp.headers) if status >= 400 else None
        except RequestTimeoutError:
            # The completion window closed while the request was in flight; not a connect (or pool)
            # timeout with the window still open: that one is the upstream's, retried.
            if capped_by_deadline and time.time() >= deadline - 1.0:
                return EngineResponse.failure(C.BATCH_EXPIRED, _EXPIRED_MESSAGE), None
            self.limiter.on_overload(epoch)
            stats.error("timeout")
            return EngineResponse.failure(
                "upstream_timeout", f"The upstream {self.name} did not answer within the timeout."
            ), None
        except RequestError as exc:  # connection refused, reset, closed mid-answer, TLS
            self.limiter.on_overload(epoch)
            stats.error("unreachable")
            return EngineResponse.failure(
                "upstream_unreachable", f"Could not reach the upstream {self.name}: {_describe(exc)}."
            ), None
        finally:
            self.limiter.release(online)
            stats.latency.observe(time.perf_counter() - started)
        if status >= 400:
            stats.error(f"http_{status}")
        if status in OVERLOAD_STATUS:
            self.limiter.on_overload(epoch)
        elif status < 500:
            self.limiter.on_success()
        return _response(status, raw, request_id), retry_after


async def _wait_unless_stopped(delay: float, stopped: Callable[[], bool] | None) -> bool:
    """Wait out a retry's back-off, looking every second whether the line's batch stopped (cancelled,
    its lease lost): a cancel does not wait for a long Retry-After to pass. True if it stopped."""
    end = time.monotonic() + delay
    while (left := end - time.monotonic()) > 0:
        await asyncio.sleep(min(left, 1.0))
        if stopped is not None and stopped():
            return True
    return stopped is not None and stopped()


def _response(status: int, raw: bytes, request_id: str | None) -> EngineResponse:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        body = _stdlib_json(raw)
    if isinstance(body, dict):
        # An output line must be one line. In JSON that parsed, CR and LF can only be white space
        # between tokens (inside strings they are escaped), so dropping them keeps every value.
        raw = raw.strip()
        if b"\n" in raw or b"\r" in raw:
            raw = raw.replace(b"\r", b"").replace(b"\n", b"")
        return EngineResponse(status, body, request_id, raw=raw)
    text = raw[:2000].decode("utf-8", "replace")
    if status < 300:  # no answer to pass on (cut off, a proxy's page): transient, retried
        return EngineResponse.failure(
            "upstream_invalid_response", f"The upstream answered {status} with a body that is not a JSON object: {text}")
    error = {"error": {"message": f"Upstream answered {status} with a non-JSON body: {text}",
                       "type": "upstream_error", "param": None, "code": None}}
    return EngineResponse(status, error, request_id)


def _stdlib_json(raw: bytes) -> Any:
    """JSON that orjson refuses but is valid (a lone surrogate escape, a number beyond a double):
    the body is passed through as sent, only its usage is read from this parse."""
    try:
        return loads_standard(raw)
    except ValueError:
        return None


def _describe(exc: RequestError) -> str:
    """The error's kind and its innermost cause, e.g. `ConnectError (Connection refused (os error
    111))` or the certificate problem of a TLS failure: what the operator needs to fix it."""
    causes = (getattr(exc, "details", None) or {}).get("causes") or []
    cause = causes[-1].get("message") if causes and isinstance(causes[-1], dict) else None
    return f"{type(exc).__name__} ({cause})" if cause else type(exc).__name__
