"""A batch line that waited inside the upstream engine (for a concurrency slot, or a retry's back-off)
is not sent once its batch was cancelled meanwhile: with several workers each holds only its share
of the upstream's slots, so lines wait there, and without this check they went out seconds after a
cancel. Against the fake upstream, a real process on loopback. And an online request's overload
shrinks the limit the batch lane shares."""

from __future__ import annotations

import asyncio
import time
import uuid

import orjson

from conftest import Upstream
from overnight import constants as C
from overnight.engines.port import EngineRequest, EngineResponse
from overnight.engines.upstream import UpstreamEngine
from overnight.settings import RetrySettings, UpstreamSettings


def _request(stopped: list[bool], fault: str) -> EngineRequest:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "x_fault": fault,
            "x_fault_key": uuid.uuid4().hex}
    return EngineRequest(C.CHAT_COMPLETIONS, body, time.time() + 60, orjson.dumps(body),
                         stopped=lambda: stopped[0])


def test_a_line_waiting_for_a_slot_is_not_sent_after_its_batch_stopped(upstream: Upstream) -> None:
    engine = UpstreamEngine(UpstreamSettings(upstream.base_url, max_concurrency=1, initial_concurrency=1))
    stopped = [False]

    async def scenario() -> tuple[EngineResponse, EngineResponse]:
        try:
            first = asyncio.create_task(engine.execute(_request([False], "slow:400")))  # holds the one slot
            await asyncio.sleep(0.1)
            waiting = asyncio.create_task(engine.execute(_request(stopped, "slow:1")))
            await asyncio.sleep(0.1)
            stopped[0] = True  # the heartbeat learned the batch was cancelled
            return await first, await waiting
        finally:
            await engine.close()

    before = upstream.stats()["requests"]
    first, waiting = asyncio.run(scenario())
    assert first.status_code == 200
    assert waiting.status_code is None and waiting.error_code == C.BATCH_CANCELLED
    assert upstream.stats()["requests"] == before + 1, "the stopped line was sent"


def test_a_line_is_not_retried_after_its_batch_stopped(upstream: Upstream) -> None:
    engine = UpstreamEngine(UpstreamSettings(upstream.base_url, retry=RetrySettings(base_delay=0.05)))
    # The shard runner asks before it calls the engine, which asks again only after a wait: this
    # line's first attempt goes out (a slot is free), and its batch is stopped by the time of the retry.
    stopped = [True]

    async def scenario() -> EngineResponse:
        try:
            return await engine.execute(_request(stopped, "500:3"))
        finally:
            await engine.close()

    before = upstream.stats()["requests"]
    response = asyncio.run(scenario())
    assert response.status_code is None and response.error_code == C.BATCH_CANCELLED
    assert upstream.stats()["requests"] == before + 1, "the stopped line was retried"


def test_without_a_stop_the_same_line_is_retried_until_it_succeeds(upstream: Upstream) -> None:
    """The control: the fault above does fail three attempts, and a wanted line rides them out."""
    engine = UpstreamEngine(UpstreamSettings(upstream.base_url, retry=RetrySettings(base_delay=0.05)))

    async def scenario() -> EngineResponse:
        try:
            return await engine.execute(_request([False], "500:3"))
        finally:
            await engine.close()

    before = upstream.stats()["requests"]
    assert asyncio.run(scenario()).status_code == 200
    assert upstream.stats()["requests"] == before + 4


def test_an_online_requests_overload_shrinks_the_upstreams_concurrency(upstream: Upstream) -> None:
    """A 429 (or a timeout) answered to an online request is the upstream saying it is overloaded,
    as for a batch line: the adaptive limit that both lanes share is halved (it was left as it was,
    and the batch lane went on at full width)."""
    engine = UpstreamEngine(UpstreamSettings(upstream.base_url, max_concurrency=64, initial_concurrency=32))

    async def scenario() -> int:
        try:
            reply = await engine.send_online(_request([False], "429:1"))
            await reply.aclose()
            return reply.status
        finally:
            await engine.close()

    assert asyncio.run(scenario()) == 429
    assert engine.limiter.limit == 16
