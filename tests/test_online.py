"""Online requests at the batch API's base URL: `client.chat.completions.create(...)`,
`completions`, `embeddings` and `responses`, streamed and not, against the fake upstream; bodies
and answers pass through as bytes; errors in OpenAI's envelope; and the batch lane of an upstream
gives way while online requests to it are in flight."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest

from conftest import API_KEY, Server, Upstream, chat_line, raw_request, until, upload, wait_terminal


@pytest.fixture(scope="module")
def online(tmp_path_factory: pytest.TempPathFactory, upstream: Upstream) -> Any:
    """A server whose `gpt-*` and `text-*` models go to the fake upstream, `fast` is an alias and
    `dead-*` goes to a port nobody listens on."""
    root = tmp_path_factory.mktemp("online")
    config = root / "overnight.toml"
    config.write_text(f'[aliases]\nfast = "gpt-4o-mini"\n\n[[upstreams]]\nbase_url = "{upstream.base_url}"\n'
                      'models = ["gpt-*", "text-*"]\n\n'
                      '[[upstreams]]\nbase_url = "http://127.0.0.1:9/v1"\nmodels = ["dead-*"]\n')
    srv = Server(root / "data", ["--config", str(config), "--api-key", API_KEY, "--no-embedded"]).start()
    yield srv
    srv.stop()


def test_chat_completion(online: Server) -> None:
    answer = online.client().chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hello there"}])
    assert answer.choices[0].message.content == "echo: hello there"
    assert answer.model == "gpt-4o-mini" and answer.usage is not None and answer.usage.prompt_tokens == 2


def test_alias_resolved_as_for_batch_lines(online: Server) -> None:
    answer = online.client().chat.completions.create(model="fast", messages=[{"role": "user", "content": "hi"}])
    assert answer.model == "gpt-4o-mini"  # the upstream was asked for the alias's model


def test_bodies_and_answers_pass_through_as_bytes(online: Server) -> None:
    body = (b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "a\\u2028b"}], '
            b'"x_big": 12345678901234567890123, "x_dec": 1.10, "x_echo_raw": true, "x_extras": true}')
    status, headers, raw = raw_request("POST", f"{online.base_url}/chat/completions",
                                       {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}, body)
    assert status == 200 and headers["content-type"].startswith("application/json")
    assert body in raw  # the upstream received the client's bytes (x_echo_raw)
    assert b'"dec": 1.10' in raw and b"12345678901234567890123" in raw  # and we got the upstream's bytes
    assert raw.count(b"\n") > 3  # its indented layout too


def test_chat_stream_with_usage(online: Server) -> None:
    stream = online.client().chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "one two three"}], stream=True,
        stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "echo: one two three"
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) == 4  # one event per word
    assert chunks[-1].choices == [] and chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens == 3
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


def test_a_stream_broken_mid_answer_is_an_error_not_an_end(online: Server) -> None:
    """The upstream's connection breaks after 2 events: the client must not take the events so far
    for the whole answer (relayed from the worker process, it ended like a finished stream)."""
    stream = online.client(max_retries=0).chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "one two three four"}], stream=True,
        extra_body={"x_cut_after": 2})
    got = []
    with pytest.raises(Exception) as broken:  # the SDK's HTTP library's own error
        got.extend(stream)
    assert type(broken.value).__name__ in ("RemoteProtocolError", "APIConnectionError"), broken.value
    assert 0 < len(got) <= 2
    # the same request unbroken ends normally (the cut is the test's, not the relay's)
    assert len(list(online.client().chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "one two three four"}], stream=True))) == 7


def test_stream_is_relayed_as_it_arrives(online: Server) -> None:
    """The first event reaches the client while the upstream is still writing the rest."""
    started = time.monotonic()
    stream = online.client().chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "a b c d"}], stream=True,
        extra_body={"x_chunk_delay_ms": 400})
    arrivals = [time.monotonic() - started for _ in stream]
    assert len(arrivals) == 7  # role, 5 words, finish
    assert arrivals[-1] > 2.2  # six gaps of 400 ms
    assert arrivals[0] < arrivals[-1] - 1.6


def test_completions_streamed_and_not(online: Server) -> None:
    client = online.client()
    answer = client.completions.create(model="text-davinci", prompt="say this")
    assert answer.choices[0].text == "echo: say this"
    pieces = [c.choices[0].text for c in client.completions.create(model="text-davinci", prompt="x y", stream=True)]
    assert "".join(pieces) == "echo: x y" and len(pieces) == 4  # 3 words and the finish


def test_embeddings(online: Server) -> None:
    answer = online.client().embeddings.create(model="text-embedding-3-small", input=["ab", "abcdefghi"])
    assert [d.embedding for d in answer.data] == [[2.0, 0.5, -0.25], [2.0, 0.5, -0.25]]
    assert answer.usage.prompt_tokens == 2


def test_responses_streamed_and_not(online: Server) -> None:
    client = online.client()
    answer = client.responses.create(model="gpt-4o-mini", input="tell me")
    assert answer.output_text == "echo: tell me"
    events = list(client.responses.create(model="gpt-4o-mini", input="tell me", stream=True))
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == "echo: tell me"
    assert events[-1].response.output_text == "echo: tell me"  # type: ignore[union-attr]


def _post(server: Server, path: str, body: bytes, key: str | None = API_KEY) -> tuple[int, dict[str, Any]]:
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    status, _, raw = raw_request("POST", f"{server.base_url}{path}", headers, body)
    return status, orjson.loads(raw)


def test_bad_requests_are_answered_in_the_envelope(online: Server) -> None:
    status, body = _post(online, "/chat/completions", b'{"model": "gpt-4o-mini", "messages": [')
    assert status == 400 and body["error"]["code"] == "invalid_json"
    assert set(body["error"]) == {"message", "type", "param", "code"}
    status, body = _post(online, "/chat/completions", b'["not", "an", "object"]')
    assert status == 400 and body["error"]["type"] == "invalid_request_error"
    status, body = _post(online, "/chat/completions", b'{"messages": []}')
    assert status == 400 and body["error"]["message"] == "you must provide a model parameter"
    status, body = _post(online, "/responses", b'{"model": "gpt-4o-mini"}')
    assert status == 400 and body["error"]["param"] == "input"
    assert body["error"]["code"] == "missing_required_parameter"
    status, body = _post(online, "/embeddings", b'{"model": "x", "input": "a"}', key=None)
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        online.client(key="sk-wrong").chat.completions.create(model="gpt-4o-mini", messages=[])


def test_unknown_model_is_not_found(online: Server) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        online.client().chat.completions.create(model="claude-9", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.code == "model_not_found"
    assert "claude-9" in caught.value.message


def test_unreachable_upstream_is_a_502(online: Server) -> None:
    with pytest.raises(openai.APIStatusError) as caught:
        online.client(max_retries=0).chat.completions.create(
            model="dead-1", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.status_code == 502
    assert caught.value.code == "upstream_unreachable"


def test_upstream_errors_pass_through(online: Server) -> None:
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        online.client().chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}],
                                                extra_body={"x_fault": "422"})
    assert caught.value.body == {"message": "injected permanent error 422", "type": "invalid_request_error",
                                 "param": None, "code": "invalid_value"}


def test_an_upstreams_retry_headers_reach_the_client(online: Server) -> None:
    """The SDK times its retries by retry-after(-ms): an upstream's 429 asking for 7 s reached it
    without the header, and the SDK came back after its own half second."""
    client = online.client(max_retries=0)
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}],
                                       extra_body={"x_fault": "429:1", "x_fault_key": "retry-7", "x_retry_after": "7"})
    assert caught.value.response.headers["retry-after"] == "7"
    assert "x-should-retry" not in caught.value.response.headers  # a 429 is worth retrying
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}],
                                       extra_body={"x_fault": "429:1", "x_fault_key": "retry-ms"})
    assert caught.value.response.headers["retry-after-ms"] == "50"
    with pytest.raises(openai.UnprocessableEntityError) as permanent:
        client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}],
                                       extra_body={"x_fault": "422"})
    assert permanent.value.response.headers["x-should-retry"] == "false"
    assert "retry-after" not in permanent.value.response.headers


def test_batch_lane_shrinks_while_online_requests_are_in_flight(tmp_path: Path) -> None:
    """An upstream allows 4 requests at once. A batch fills all 4; three slow online requests then
    start within a batch request's time (ahead of the batch lines queued for a slot), and while
    they run the batch gets 4 - 3 = 1 at once; afterwards 4 again."""
    up = Upstream(tmp_path)
    try:
        config = tmp_path / "overnight.toml"
        config.write_text(f'[[upstreams]]\nbase_url = "{up.base_url}"\nmax_concurrency = 4\n'
                          "initial_concurrency = 4\nmin_concurrency = 4\n")
        server = Server(tmp_path / "data", ["--config", str(config), "--api-key", API_KEY, "--no-embedded"]).start()
        try:
            _shrink_and_recover(server, up)
        finally:
            server.stop()
    finally:
        up.stop()


def _shrink_and_recover(server: Server, up: Upstream) -> None:
    client = server.client()
    lines = [chat_line(i, x_tag="batch", x_fault="slow:150") for i in range(400)]
    batch = client.batches.create(input_file_id=upload(client, lines), endpoint="/v1/chat/completions",
                                  completion_window="24h")

    def tag(name: str) -> dict[str, int]:
        return up.stats()["tags"].get(name, {"in_flight": 0, "peak": 0})

    until(lambda: tag("batch")["in_flight"] == 4, timeout=60)
    assert tag("batch")["peak"] == 4
    answers: list[float] = []

    def ask() -> None:
        started = time.monotonic()
        client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "now"}],
                                       extra_body={"x_tag": "online", "x_fault": "slow:2500"})
        answers.append(time.monotonic() - started)

    threads = [threading.Thread(target=ask) for _ in range(3)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    until(lambda: tag("online")["in_flight"] == 3, timeout=10)
    # Each got a slot as soon as a batch request finished, not after the queued batch lines.
    assert time.monotonic() - started < 1.5
    until(lambda: tag("batch")["in_flight"] <= 1, timeout=5)
    up.reset()  # peaks from now on
    time.sleep(1.0)  # several batch requests' time
    assert tag("online")["in_flight"] == 3
    assert tag("batch")["peak"] == 1  # 4 slots, 3 online: the batch lane shrank to one
    for thread in threads:
        thread.join(30)
    assert len(answers) == 3 and max(answers) < 4.5
    up.reset()
    until(lambda: tag("batch")["in_flight"] == 4, timeout=10)  # the batch lane grows back
    client.batches.cancel(batch.id)
    wait_terminal(client, batch.id, timeout=60)


def test_a_client_that_goes_away_frees_the_upstream_request(online: Server, upstream: Upstream) -> None:
    """Closing a stream after its first event ends the upstream request at once (through the worker
    process's relay), not when the upstream would have finished writing it."""
    import http.client

    body = orjson.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "a b c d e"}],
                         "stream": True, "x_chunk_delay_ms": 3000, "x_tag": "dropped"})
    conn = http.client.HTTPConnection("127.0.0.1", online.port, timeout=30)
    conn.request("POST", "/v1/chat/completions", body=body,
                 headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200 and response.read1(65536).startswith(b"data: ")
    assert upstream.stats()["tags"]["dropped"]["in_flight"] == 1
    conn.close()  # 6 more events would take 18 s
    until(lambda: upstream.stats()["tags"]["dropped"]["in_flight"] == 0, timeout=5)


def test_a_stream_longer_than_the_upstream_timeout_is_bounded_by_silence_only(
        tmp_path: Path, upstream: Upstream) -> None:
    """`timeout_seconds` bounds each wait for the upstream (its headers, the next event), not a
    streamed answer's whole length: with 1 s, a 2.4 s stream of an event every 0.4 s was cut off
    after 1 s; one that goes silent for 1.5 s is still cut off."""
    config = tmp_path / "overnight.toml"
    config.write_text(f'[[upstreams]]\nbase_url = "{upstream.base_url}"\ntimeout_seconds = 1\n')
    server = Server(tmp_path / "data", ["--config", str(config), "--api-key", API_KEY, "--no-embedded"]).start()
    try:
        client = server.client(max_retries=0)
        chunks = list(client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "a b c d e"}], stream=True,
            extra_body={"x_chunk_delay_ms": 400}))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "echo: a b c d e"
        with pytest.raises(Exception) as cut:  # the SDK's HTTP library's own error
            list(client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "a b"}], stream=True,
                extra_body={"x_chunk_delay_ms": 1500}))
        assert type(cut.value).__name__ in ("RemoteProtocolError", "APIConnectionError"), cut.value
    finally:
        server.stop()


@pytest.mark.parametrize("placement", [("--workers", "0"), ("--workers", "2"), ("--no-worker",)],
                         ids=["worker-in-api-process", "two-worker-processes", "no-worker"])
def test_online_requests_wherever_the_engines_run(tmp_path: Path, upstream: Upstream, placement: tuple[str, ...]) -> None:
    """On the API process's engines (no worker process, or none at all) or on each of several
    worker processes' in turn."""
    server = Server(tmp_path / "data", ["--upstream", f"*={upstream.base_url}", "--api-key", API_KEY,
                                        "--no-embedded", *placement]).start()
    try:
        client = server.client()
        for i in range(3):  # with two workers, both answer
            pieces = [c.choices[0].delta.content for c in client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": f"where {i}"}], stream=True) if c.choices]
            assert "".join(p or "" for p in pieces) == f"echo: where {i}"
        assert client.embeddings.create(model="e", input="abc").data[0].embedding == [3.0, 0.5, -0.25]
    finally:
        server.stop()
