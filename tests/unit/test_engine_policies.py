"""The retry policy's decisions and the adaptive limiter's arithmetic."""

from __future__ import annotations

import asyncio
import random

import pytest

from overnight.engines.limiter import AdaptiveLimiter
from overnight.engines.retry import RetryPolicy, parse_retry_after
from overnight.engines.upstream import UpstreamEngine
from overnight.settings import UpstreamSettings


def test_permanent_statuses_are_not_retried() -> None:
    policy = RetryPolicy()
    for status in (400, 401, 403, 404, 422):
        assert not policy.decide(1, status, None, 0, 100).retry
    for status in (None, 408, 409, 429, 500, 502, 503, 504, 520, 524, 529):  # every 5xx, as the SDK
        assert policy.decide(1, status, None, 0, 100).retry


def test_retry_after_is_honoured_and_deadline_is_a_hard_stop() -> None:
    policy = RetryPolicy()
    assert policy.decide(1, 429, 2.5, 0, 100).delay == 2.5
    assert not policy.decide(1, 429, 2.5, 99, 100).retry  # the wait would cross the deadline
    assert not RetryPolicy(max_attempts=3).decide(3, 503, None, 0, 100).retry


def test_backoff_is_jittered_and_bounded() -> None:
    policy = RetryPolicy(max_attempts=20, base_delay=0.5, max_delay=4, rng=random.Random(7))
    delays = [policy.decide(attempt, 500, None, 0, 1e9).delay for attempt in range(1, 12)]
    assert all(0 <= d <= 4 for d in delays)
    assert len(set(delays)) == len(delays)


def test_parse_retry_after() -> None:
    assert parse_retry_after({"retry-after-ms": "250"}) == 0.25
    assert parse_retry_after({"retry-after": "3"}) == 3.0
    # an HTTP-date (RFC 9110): the time until then (it was ignored, and the retry came at once)
    assert parse_retry_after({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}, now=1445412475.0) == 5.0
    assert parse_retry_after({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}, now=1445412490.0) == 0.0
    assert parse_retry_after({"retry-after": "soon"}) is None
    assert parse_retry_after({}) is None


def test_slow_start_then_additive_increase_multiplicative_decrease() -> None:
    limiter = AdaptiveLimiter(initial=16, minimum=2, maximum=64)
    for _ in range(16):
        limiter.on_success()
    assert limiter.limit == 32  # no overload yet: +1 per success, the window doubles per round trip
    for _ in range(40):
        limiter.on_success()
    assert limiter.limit == 64  # capped at the maximum
    limiter.on_overload(limiter.epoch)
    assert limiter.limit == 32
    for _ in range(32):
        limiter.on_success()
    assert 32.9 < limiter.limit < 33.1  # after an overload: +1 per window of `limit` successes
    limiter = AdaptiveLimiter(initial=10, minimum=2, maximum=12)
    limiter.on_overload(limiter.epoch)
    for _ in range(5):
        limiter.on_success()
    assert 5.9 < limiter.limit < 6.1
    limiter.limit = 11.0
    epoch = limiter.epoch
    limiter.on_overload(epoch)
    limiter.on_overload(epoch)  # the same window: one decrease only
    assert 5.4 < limiter.limit < 5.6
    for _ in range(10):
        limiter.on_overload(limiter.epoch)
    assert limiter.limit == 2
    for _ in range(1000):
        limiter.on_success()
    assert limiter.limit == 12


def test_the_limit_grows_to_this_processs_share_not_past_it() -> None:
    """Grown to the maximum while `allowed` stays at the share, an overload halved a limit nobody
    used: with a share of 8 of 64, three overloads in a row left `allowed` at 8."""
    limiter = AdaptiveLimiter(initial=16, minimum=1, maximum=64)
    limiter.set_ceiling(8)
    assert limiter.limit == 8  # lowered with the share
    for _ in range(100):
        limiter.on_success()
    assert limiter.limit == 8 and limiter.allowed == 8
    limiter.on_overload(limiter.epoch)
    assert limiter.allowed == 4  # the first overload is felt
    limiter.set_ceiling(64)  # a larger share: the limit grows again from where it is
    for _ in range(200):
        limiter.on_success()
    assert 4 < limiter.limit <= 64


def test_limiter_never_admits_more_than_the_limit() -> None:
    async def scenario() -> int:
        limiter = AdaptiveLimiter(initial=3, minimum=1, maximum=3)

        async def job() -> None:
            await limiter.acquire()
            await asyncio.sleep(0.001)
            limiter.release()

        await asyncio.gather(*(job() for _ in range(50)))
        assert limiter.in_flight == 0
        return limiter.peak_in_flight

    assert asyncio.run(scenario()) == 3


def test_cancelled_waiters_leave_the_limiter_consistent() -> None:
    async def scenario() -> None:
        limiter = AdaptiveLimiter(initial=1, minimum=1, maximum=1)
        await limiter.acquire()
        waiters = [asyncio.create_task(limiter.acquire()) for _ in range(3)]
        await asyncio.sleep(0)
        waiters[0].cancel()
        limiter.release()  # hands the slot to the next live waiter, dropping the cancelled one
        await asyncio.sleep(0)
        for task in waiters[1:]:
            task.cancel()
        results = await asyncio.gather(*waiters, return_exceptions=True)
        # every cancelled acquire raises CancelledError (not ValueError: a swallowed cancellation
        # once kept a worker from stopping), and the slot handed to a cancelled waiter comes back
        assert isinstance(results[0], asyncio.CancelledError) and isinstance(results[2], asyncio.CancelledError)
        assert results[1] == 0  # the live waiter got the slot
        assert limiter.in_flight == 1 and not limiter._waiters

    asyncio.run(scenario())


def test_a_connect_timeout_with_the_window_open_is_the_upstreams_not_the_batchs() -> None:
    """Within `timeout_seconds` of the deadline a request's timeout is cut to the deadline, and its
    timeout meant the window had closed; but a connect timeout (10 s) fires first, with the window
    still open: that line was reported batch_expired minutes early, not retried. (A client double:
    a connect that hangs cannot be made on loopback in test time.)"""
    import time

    from pyreqwest.exceptions import ConnectTimeoutError

    from overnight import constants as C
    from overnight.engines.port import EngineRequest
    from overnight.engines.upstream import UpstreamEngine
    from overnight.settings import UpstreamSettings

    class ConnectHangs:
        def post(self, url: str) -> ConnectHangs:
            return self

        def body_bytes(self, body: bytes) -> ConnectHangs:
            return self

        def timeout(self, value: object) -> ConnectHangs:
            return self

        def build(self) -> ConnectHangs:
            return self

        async def send(self) -> None:
            raise ConnectTimeoutError("connect timed out", {"causes": None})

    engine = UpstreamEngine(UpstreamSettings("http://127.0.0.1:9/v1"), RetryPolicy(max_attempts=1))
    engine._client = ConnectHangs()  # type: ignore[assignment]
    deadline = time.time() + 60  # well inside the 600 s request timeout: the request's timeout is capped
    response = asyncio.run(engine.execute(EngineRequest(C.CHAT_COMPLETIONS, {}, deadline, b"{}")))
    assert response.error_code == "upstream_timeout"


@pytest.mark.parametrize(("base", "url"), [
    ("http://h:8001/v1", "http://h:8001/v1/chat/completions"),
    ("http://h:8001/v1/", "http://h:8001/v1/chat/completions"),
    ("http://h:8001", "http://h:8001/v1/chat/completions"),  # a server's root: /v1 is added
    ("http://h:8001/", "http://h:8001/v1/chat/completions"),
    # roots that are not /v1, as the OpenAI SDK takes them (these got /v1/chat/completions appended)
    ("https://generativelanguage.googleapis.com/v1beta/openai/",
     "https://generativelanguage.googleapis.com/v1beta/openai/chat/completions"),
    ("https://api.deepinfra.com/v1/openai", "https://api.deepinfra.com/v1/openai/chat/completions"),
    ("https://models.github.ai/inference", "https://models.github.ai/inference/chat/completions"),
])
def test_an_upstreams_url_follows_the_sdks_rule(base: str, url: str) -> None:
    assert UpstreamEngine(UpstreamSettings(base), RetryPolicy(max_attempts=1)).url_for("/v1/chat/completions") == url
