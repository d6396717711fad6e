"""A fast OpenAI-compatible server for tests and benchmarks, with fault injection.

    python -m overnight.testing.upstream_server --port 8001 [--chaos 0.2] [--max-concurrency 32]

Answers /v1/chat/completions, /v1/completions, /v1/embeddings and /v1/responses deterministically
(an echo of the prompt), and /v1/moderations (an input is flagged for violence when it contains
"flag-me"). Faults are asked for per request by a field in the body, which overnight passes
through unchanged:

    "x_fault": "429:2"   fail the first 2 attempts with 429 (Retry-After 50 ms), then answer
    "x_fault": "500:1" / "503:3" / "502:1"   the same with that status
    "x_fault": "timeout:1"   hang past the client's timeout once
    "x_fault": "reset:2"     drop the connection without answering, twice
    "x_fault": "400" / "404" / "422"   a permanent error, every time
    "x_fault": "400:1"       a permanent error the first time per key (across batches), then answer
    "x_fault": "slow:200"    answer after 200 ms
    "x_fault": "truncated:1" answer 200 with a body cut off mid-JSON, once
    "x_retry_after": "120"   with a 429 fault: this Retry-After (seconds or an HTTP-date) instead of 50 ms

Two more fields check that bodies pass through exactly: `"x_echo_raw": true` puts the request body,
byte for byte as received, in the answer as `x_request`; `"x_extras": true` adds values that a
re-serialization would change (`12345678901234567890123`, `1.10`, raw U+2028/U+2029 in a string)
and answers indented JSON over several lines, as some servers do.

`"stream": true` on chat, completions and responses answers with server-sent events in OpenAI's
formats (the echo one word per event; `stream_options.include_usage` honoured for chat and
completions), `"x_chunk_delay_ms": N` waiting N ms between events, `"x_cut_after": N` breaking the
connection after N events. `"x_tag": "name"` counts the
request in and out of that tag's in-flight count and peak (GET /stats `tags`), so a test can see
how many of one kind of request ran at once.

Attempts are counted per `x_fault_key` (default: the whole body). `--chaos P` injects a random
transient fault (429/500/503/reset) into a fraction P of first attempts. `--api-key K` answers 401
unless `Authorization: Bearer K` is sent. `--tls-cert C --tls-key K` serves HTTPS. `--max-concurrency N`
answers 429 while more than N requests are in flight (an overloaded server). GET /stats reports
requests seen, peak concurrency and faults served; POST /stats/reset clears them.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import ssl
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from overnight.runtime import run_on_fastest_loop

TIMEOUT_HANG_SECONDS = 30.0
_EXTRAS = b'{"big": 12345678901234567890123, "dec": 1.10, "sep": "a\xe2\x80\xa8b\xe2\x80\xa9c"}'


@dataclass
class UpstreamState:
    chaos: float = 0.0
    max_concurrency: int = 0
    delay: float = 0.0
    rng: random.Random = field(default_factory=lambda: random.Random(1234))
    attempts: Counter[str] = field(default_factory=Counter)
    served: Counter[str] = field(default_factory=Counter)
    in_flight: int = 0
    peak_in_flight: int = 0
    requests: int = 0
    chaos_seen: set[str] = field(default_factory=set)
    api_key: str = ""
    tag_in_flight: Counter[str] = field(default_factory=Counter)
    tag_peak: Counter[str] = field(default_factory=Counter)

    def enter(self, tag: str | None) -> None:
        if tag is not None:
            self.tag_in_flight[tag] += 1
            self.tag_peak[tag] = max(self.tag_peak[tag], self.tag_in_flight[tag])

    def leave(self, tag: str | None) -> None:
        if tag is not None:
            self.tag_in_flight[tag] -= 1


def _json(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(obj), status=status, content_type="application/json", headers=headers)


def _error(status: int, message: str, code: str | None = None) -> web.Response:
    headers = {"retry-after-ms": "50"} if status == 429 else None
    kind = "rate_limit_error" if status == 429 else "server_error" if status >= 500 else "invalid_request_error"
    return _json({"error": {"message": message, "type": kind, "param": None, "code": code}}, status, headers)


# OpenAI's moderation categories, as they are spelled on the wire.
_MODERATION_CATEGORIES = (
    "harassment", "harassment/threatening", "hate", "hate/threatening", "illicit", "illicit/violent",
    "self-harm", "self-harm/instructions", "self-harm/intent", "sexual", "sexual/minors", "violence",
    "violence/graphic",
)


def _words(value: Any) -> int:
    return len(str(value).split())


def _item_texts(item: Any) -> list[str]:
    """The texts of one Responses input item: a string content, or its parts' `text`."""
    content = item.get("content", "") if isinstance(item, dict) else ""
    if isinstance(content, str):
        return [content]
    return [str(p.get("text", "")) for p in content if isinstance(p, dict)] if isinstance(content, list) else []


def _response_answer(body: dict[str, Any], created: int) -> dict[str, Any]:
    """A Responses API `response` object: the last input text echoed, with usage in its shape
    (cached and reasoning tokens too, so a client can check that every counter adds up)."""
    items = body.get("input", "")
    if isinstance(items, str):
        items = [{"role": "user", "content": items}]
    texts = [text for item in (items if isinstance(items, list) else []) for text in _item_texts(item)]
    text = f"echo: {(texts[-1] if texts else '')[:64]}"
    input_tokens = sum(_words(t) for t in texts) + _words(body.get("instructions") or "")
    output_tokens = _words(text)
    message = {"type": "message", "id": f"msg_{created}", "status": "completed", "role": "assistant",
               "content": [{"type": "output_text", "text": text, "annotations": []}]}
    usage = {
        "input_tokens": input_tokens,
        "input_tokens_details": {"cached_tokens": input_tokens // 2, "cache_write_tokens": 0},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": 1},
        "total_tokens": input_tokens + output_tokens,
    }
    return {
        "id": f"resp_{created}", "object": "response", "created_at": created, "status": "completed",
        "error": None, "incomplete_details": None, "instructions": body.get("instructions"),
        "model": body.get("model", "unknown"), "output": [message], "parallel_tool_calls": True,
        "tool_choice": "auto", "tools": [], "temperature": body.get("temperature", 1.0),
        "top_p": body.get("top_p", 1.0), "max_output_tokens": body.get("max_output_tokens"),
        "usage": usage,
    }


def _moderation_answer(body: dict[str, Any], created: int) -> dict[str, Any]:
    inputs = body.get("input", "")
    items = inputs if isinstance(inputs, list) else [inputs]
    results = []
    for item in items:
        text = item.get("text", "") if isinstance(item, dict) else str(item)
        flagged = "flag-me" in text
        results.append({
            "flagged": flagged,
            "categories": {c: flagged and c == "violence" for c in _MODERATION_CATEGORIES},
            "category_scores": {c: 0.9 if flagged and c == "violence" else 0.001 for c in _MODERATION_CATEGORIES},
            "category_applied_input_types": {c: ["text"] for c in _MODERATION_CATEGORIES},
        })
    # OpenAI's default model when the request names none.
    return {"id": f"modr-{created}", "model": body.get("model", "omni-moderation-latest"), "results": results}


def _answer(endpoint: str, body: dict[str, Any]) -> dict[str, Any]:
    model = body.get("model", "unknown")
    created = int(time.time())
    if endpoint == "responses":
        return _response_answer(body, created)
    if endpoint == "moderations":
        return _moderation_answer(body, created)
    if endpoint == "embeddings":
        inputs = body.get("input", "")
        items = inputs if isinstance(inputs, list) else [inputs]
        data = [
            {"object": "embedding", "index": i, "embedding": [float(len(str(x)) % 7), 0.5, -0.25]}
            for i, x in enumerate(items)
        ]
        tokens = sum(len(str(x).split()) for x in items)
        return {"object": "list", "data": data, "model": model,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
    if endpoint == "chat":
        messages = body.get("messages") or [{}]
        last = messages[-1].get("content", "") if isinstance(messages[-1], dict) else ""
        prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in messages if isinstance(m, dict))
        text = f"echo: {str(last)[:64]}"
        choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text},
                                  "finish_reason": "stop", "logprobs": None}
        kind = "chat.completion"
    else:
        prompt = str(body.get("prompt", ""))
        prompt_tokens = len(prompt.split())
        text = f"echo: {prompt[:64]}"
        choice = {"index": 0, "text": text, "finish_reason": "stop", "logprobs": None}
        kind = "text_completion"
    completion_tokens = len(text.split())
    return {
        "id": f"cmpl-{created}",
        "object": kind,
        "created": created,
        "model": model,
        "choices": [choice],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    }


def _sse(obj: dict[str, Any], event: str | None = None) -> bytes:
    head = f"event: {event}\n".encode() if event else b""
    return head + b"data: " + orjson.dumps(obj) + b"\n\n"


def _stream_events(endpoint: str, body: dict[str, Any]) -> list[bytes]:
    """The events of the echo answer, one word per delta, in OpenAI's streaming formats."""
    answer = _answer(endpoint, body)
    options = body.get("stream_options")
    include_usage = isinstance(options, dict) and options.get("include_usage") is True
    if endpoint == "responses":
        text = answer["output"][0]["content"][0]["text"]
        words = text.split(" ")
        pieces = [w if i == 0 else " " + w for i, w in enumerate(words)]
        item = answer["output"][0]
        pending = {**answer, "status": "in_progress", "output": [], "usage": None}
        where = {"item_id": item["id"], "output_index": 0, "content_index": 0}
        kinds: list[tuple[str, dict[str, Any]]] = [
            ("response.created", {"response": pending}), ("response.in_progress", {"response": pending}),
            ("response.output_item.added", {"output_index": 0, "item": {**item, "status": "in_progress", "content": []}}),
            ("response.content_part.added", {**where, "part": {"type": "output_text", "text": "", "annotations": []}}),
            *[("response.output_text.delta", {**where, "delta": p, "logprobs": []}) for p in pieces],
            ("response.output_text.done", {**where, "text": text, "logprobs": []}),
            ("response.content_part.done", {**where, "part": item["content"][0]}),
            ("response.output_item.done", {"output_index": 0, "item": item}),
            ("response.completed", {"response": answer}),
        ]
        return [_sse({"type": kind, "sequence_number": n, **fields}, kind) for n, (kind, fields) in enumerate(kinds)]
    chat = endpoint == "chat"
    choice = answer["choices"][0]
    text = choice["message"]["content"] if chat else choice["text"]
    base = {"id": answer["id"], "object": "chat.completion.chunk" if chat else "text_completion",
            "created": answer["created"], "model": answer["model"]}
    if include_usage:
        base["usage"] = None

    def chunk(piece: str | None, finish: str | None) -> bytes:
        if chat:
            delta: dict[str, Any] = {} if piece is None else {"content": piece}
            item: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            item = {"index": 0, "text": piece or "", "logprobs": None, "finish_reason": finish}
        return _sse({**base, "choices": [item]})

    words = text.split(" ")
    events = [_sse({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                         "logprobs": None, "finish_reason": None}]})] if chat else []
    events += [chunk(w if i == 0 else " " + w, None) for i, w in enumerate(words)]
    events.append(chunk(None, "stop"))
    if include_usage:
        events.append(_sse({**base, "choices": [], "usage": answer["usage"]}))
    return [*events, b"data: [DONE]\n\n"]


async def _stream(request: web.Request, endpoint: str, body: dict[str, Any]) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    delay = float(body.get("x_chunk_delay_ms") or 0) / 1000
    cut = body.get("x_cut_after")
    try:
        for n, event in enumerate(_stream_events(endpoint, body)):
            if n and delay:
                await asyncio.sleep(delay)
            if n == cut:
                await asyncio.sleep(0.05)  # the events so far are on their way
                assert request.transport is not None
                request.transport.abort()  # the connection breaks mid-answer
                return response
            await response.write(event)
        await response.write_eof()
    except ConnectionResetError:
        pass  # the client stopped reading (a test of what a client that goes away frees)
    return response


async def _fault(state: UpstreamState, request: web.Request, body: dict[str, Any], raw: bytes) -> web.Response | None:
    spec = body.get("x_fault")
    key = str(body.get("x_fault_key") or raw)
    if spec is None and state.chaos and key not in state.chaos_seen:
        state.chaos_seen.add(key)
        if state.rng.random() < state.chaos:
            spec = state.rng.choice(["429:1", "500:1", "503:1", "reset:1"])
    if not isinstance(spec, str):
        return None
    kind, _, arg = spec.partition(":")
    if kind == "slow":
        await asyncio.sleep(float(arg or 100) / 1000)
        return None
    if kind in ("400", "404", "422") and not arg:
        state.served[kind] += 1
        code = "model_not_found" if kind == "404" else "invalid_value"
        return _error(int(kind), f"injected permanent error {kind}", code)
    state.attempts[key] += 1
    if state.attempts[key] > int(arg or 1):
        return None
    state.served[kind] += 1
    if kind in ("400", "404", "422"):  # `400:N`: a permanent error the first N times per key only
        return _error(int(kind), f"injected permanent error {kind}", "invalid_value")
    if kind == "timeout":
        # A hung request is not counted as in flight: the client gave up on it long ago.
        state.in_flight -= 1
        try:
            await asyncio.sleep(TIMEOUT_HANG_SECONDS)
        finally:
            state.in_flight += 1
        return _error(504, "injected hang ended")
    if kind == "reset":
        if request.transport is not None:
            request.transport.abort()
        raise asyncio.CancelledError
    if kind == "truncated":
        return web.Response(body=b'{"id": "chatcmpl-cut", "object": "chat.comp', content_type="application/json")
    response = _error(int(kind), f"injected transient error {kind}")
    if kind == "429" and isinstance(body.get("x_retry_after"), str):
        del response.headers["retry-after-ms"]
        response.headers["retry-after"] = body["x_retry_after"]
    return response


def make_app(state: UpstreamState) -> web.Application:
    async def handle(request: web.Request) -> web.StreamResponse:
        endpoint = request.match_info["endpoint"]
        if state.api_key and request.headers.get("Authorization") != f"Bearer {state.api_key}":
            return _error(401, "wrong or missing upstream API key", "invalid_api_key")
        state.requests += 1
        state.in_flight += 1
        state.peak_in_flight = max(state.peak_in_flight, state.in_flight)
        tag = None
        try:
            raw = await request.read()
            try:
                body = orjson.loads(raw)
            except orjson.JSONDecodeError:
                return _error(400, "body is not JSON")
            if not isinstance(body, dict):
                return _error(400, "body is not a JSON object")
            tag = body.get("x_tag") if isinstance(body.get("x_tag"), str) else None
            state.enter(tag)
            if state.max_concurrency and state.in_flight > state.max_concurrency:
                state.served["overload"] += 1
                return _error(429, "too many concurrent requests")
            fault = await _fault(state, request, body, raw)
            if fault is not None:
                return fault
            if state.delay:
                await asyncio.sleep(state.delay)
            state.served["ok"] += 1
            if body.get("stream") is True and endpoint in ("chat", "completions", "responses"):
                return await _stream(request, endpoint, body)
            answer = _answer(endpoint, body)
            if body.get("x_echo_raw") is True:
                answer["x_request"] = orjson.Fragment(raw)
            if body.get("x_extras") is True:
                answer["x_extras"] = orjson.Fragment(_EXTRAS)
                return web.Response(body=orjson.dumps(answer, option=orjson.OPT_INDENT_2) + b"\n",
                                    content_type="application/json")
            return _json(answer)
        finally:
            state.in_flight -= 1
            state.leave(tag)

    async def stats(_request: web.Request) -> web.Response:
        return _json({"requests": state.requests, "peak_in_flight": state.peak_in_flight,
                      "in_flight": state.in_flight, "served": dict(state.served),
                      "tags": {tag: {"in_flight": state.tag_in_flight[tag], "peak": state.tag_peak[tag]}
                               for tag in state.tag_peak}})

    async def reset(_request: web.Request) -> web.Response:
        state.requests = state.peak_in_flight = 0
        state.served.clear()
        state.attempts.clear()
        state.chaos_seen.clear()
        # A tag's peak starts again from what is in flight now: the peak of the next interval.
        state.tag_peak = Counter({tag: n for tag, n in state.tag_in_flight.items()})
        return _json({"ok": True})

    app = web.Application(client_max_size=1024**3)
    app.router.add_post("/v1/{endpoint:chat}/completions", handle)
    app.router.add_post("/v1/{endpoint:completions|embeddings|responses|moderations}", handle)
    app.router.add_get("/stats", stats)
    app.router.add_post("/stats/reset", reset)
    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: pick a free port (see --port-file)")
    parser.add_argument("--port-file", type=Path, default=None, help="write the bound port here")
    parser.add_argument("--chaos", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--max-concurrency", type=int, default=0)
    parser.add_argument("--delay-ms", type=float, default=0.0)
    parser.add_argument("--api-key", default="", help="answer 401 unless this bearer key is sent")
    parser.add_argument("--tls-cert", type=Path, default=None, help="serve HTTPS with this certificate (PEM)")
    parser.add_argument("--tls-key", type=Path, default=None, help="the certificate's private key (PEM)")
    args = parser.parse_args(argv)
    state = UpstreamState(chaos=args.chaos, max_concurrency=args.max_concurrency, delay=args.delay_ms / 1000,
                          rng=random.Random(args.seed), api_key=args.api_key)
    tls = None
    if args.tls_cert is not None:
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(args.tls_cert, args.tls_key)
    run_on_fastest_loop(_serve(make_app(state), args.host, args.port, args.port_file, tls))  # as real servers run


async def _serve(
    app: web.Application, host: str, port: int, port_file: Path | None, tls: ssl.SSLContext | None
) -> None:
    runner = web.AppRunner(app, access_log=None, handle_signals=True)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=1024, ssl_context=tls)
    await site.start()
    bound = runner.addresses[0][1]
    if port_file is not None:
        port_file.write_text(str(bound))
    scheme = "https" if tls is not None else "http"
    print(f"upstream listening on {scheme}://{host}:{bound}/v1", file=sys.stderr, flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


if __name__ == "__main__":
    main()
