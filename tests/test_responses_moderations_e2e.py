"""/v1/responses and /v1/moderations batches, end to end: the lines' bodies are exactly what the
official SDK sends for `client.responses.create(...)` / `client.moderations.create(...)`, they run
on the fake upstream unchanged, and the results parse back with the SDK's own types."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import openai
import pytest
from openai.types import ModerationCreateResponse
from openai.types.responses import Response

from conftest import Upstream, results_by_id, run_batch

pytestmark = pytest.mark.both_tiers  # SQLite + local directory, and PostgreSQL + S3

RESPONSES = "/v1/responses"
MODERATIONS = "/v1/moderations"


class _Capture(BaseHTTPRequestHandler):
    """Records each POST body and answers 500, so the SDK call ends at once (no retries)."""

    bodies: list[bytes]

    def do_POST(self) -> None:  # the name http.server calls
        self.bodies.append(self.rfile.read(int(self.headers["Content-Length"])))
        payload = b'{"error": {"message": "captured", "type": "server_error", "param": null, "code": null}}'
        self.send_response(500)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:  # quiet: no request log on stderr
        pass


@pytest.fixture(scope="module")
def sdk_body() -> Iterator[Callable[[Callable[[openai.OpenAI], Any]], bytes]]:
    """`sdk_body(lambda c: c.responses.create(...))` -> the exact request body the SDK sent."""
    bodies: list[bytes] = []
    handler = type("Capture", (_Capture,), {"bodies": bodies})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    sdk = openai.OpenAI(base_url=f"http://127.0.0.1:{httpd.server_address[1]}/v1", api_key="sk-capture",
                        max_retries=0)

    def capture(call: Callable[[openai.OpenAI], Any]) -> bytes:
        with pytest.raises(openai.InternalServerError):
            call(sdk)
        return bodies.pop()

    yield capture
    sdk.close()
    httpd.shutdown()
    httpd.server_close()


def _file(endpoint: str, bodies: dict[str, bytes]) -> bytes:
    """A batch input file whose line bodies are the given bytes, exactly."""
    return b"".join(
        b'{"custom_id": ' + json.dumps(cid).encode() + b', "method": "POST", "url": "' + endpoint.encode()
        + b'", "body": ' + body + b"}\n"
        for cid, body in bodies.items()
    )


def test_responses_batch_with_the_sdks_own_bodies(
    client: openai.OpenAI, upstream: Upstream, sdk_body: Callable[[Callable[[openai.OpenAI], Any]], bytes]
) -> None:
    upstream.reset()
    bodies = {
        "plain": sdk_body(lambda c: c.responses.create(model="gpt-4.1-mini", input="Say hello to the moon")),
        "parts": sdk_body(lambda c: c.responses.create(
            model="gpt-4.1-mini",
            input=[{"role": "user", "content": [{"type": "input_text", "text": "Name three colours"}]}],
            instructions="Answer in one line.", max_output_tokens=8, temperature=0, top_p=0.5,
            metadata={"n": "1"}, extra_body={"x_echo_raw": True})),
        "turns": sdk_body(lambda c: c.responses.create(
            model="gpt-4.1-mini",
            input=[{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "first"},
                   {"role": "assistant", "content": "ok"}, {"role": "user", "content": "and the second one"}])),
    }
    assert b'"input_text"' in bodies["parts"] and b'"max_output_tokens":8' in bodies["parts"]
    done = run_batch(client, _file(RESPONSES, bodies), endpoint=RESPONSES)  # type: ignore[arg-type]
    assert done.status == "completed" and done.endpoint == RESPONSES
    assert (done.request_counts.completed, done.request_counts.failed) == (3, 0)
    outputs, errors = results_by_id(client, done)
    assert not errors
    parsed = {cid: Response.model_validate(line["response"]["body"]) for cid, line in outputs.items()}
    assert parsed["plain"].output_text == "echo: Say hello to the moon"
    assert parsed["parts"].output_text == "echo: Name three colours"
    assert parsed["turns"].output_text == "echo: and the second one"
    assert all(r.object == "response" and r.status == "completed" for r in parsed.values())
    # passed through byte for byte: the upstream saw exactly the SDK's body
    echoed = outputs["parts"]["response"]["body"]["x_request"]
    assert json.dumps(echoed, separators=(",", ":")).encode() == bodies["parts"]
    # the batch's usage is the sum of the Responses-shaped usage of its lines
    usages = [r.usage for r in parsed.values()]
    assert all(u is not None for u in usages)
    assert done.usage.input_tokens == sum(u.input_tokens for u in usages if u) > 0
    assert done.usage.output_tokens == sum(u.output_tokens for u in usages if u) > 0
    assert done.usage.input_tokens_details.cached_tokens == sum(
        u.input_tokens_details.cached_tokens for u in usages if u) > 0
    assert done.usage.output_tokens_details.reasoning_tokens == 3
    assert done.usage.total_tokens == done.usage.input_tokens + done.usage.output_tokens
    assert upstream.stats()["requests"] == 3


def test_responses_lines_without_input_or_with_stream_fail_validation(
    client: openai.OpenAI, upstream: Upstream, sdk_body: Callable[[Callable[[openai.OpenAI], Any]], bytes]
) -> None:
    upstream.reset()
    streamed = sdk_body(lambda c: c.responses.create(model="gpt-4.1-mini", input="hi", stream=True))
    bodies = {
        "ok": sdk_body(lambda c: c.responses.create(model="gpt-4.1-mini", input="hi")),
        "no-input": b'{"model": "gpt-4.1-mini", "instructions": "Say hi."}',
        "stream": streamed,
        "no-model": b'{"input": "hi"}',
    }
    done = run_batch(client, _file(RESPONSES, bodies), endpoint=RESPONSES)  # type: ignore[arg-type]
    assert done.status == "failed" and done.output_file_id is None
    errors = [(e.line, e.code, e.param) for e in done.errors.data]
    assert errors == [(2, "invalid_request", "body.input"), (3, "streaming_unsupported", "body.stream"),
                      (4, "invalid_request", "body.model")]
    assert done.errors.data[1].message.startswith("Responses: Streaming is not supported in the Batch API.")
    assert upstream.stats()["requests"] == 0  # nothing ran


def test_moderations_run_on_the_upstream_with_or_without_a_model(
    client: openai.OpenAI, upstream: Upstream, sdk_body: Callable[[Callable[[openai.OpenAI], Any]], bytes]
) -> None:
    upstream.reset()
    bodies = {
        "default-model": sdk_body(lambda c: c.moderations.create(input="a calm sentence",
                                                                 extra_body={"x_echo_raw": True})),
        "named": sdk_body(lambda c: c.moderations.create(model="omni-moderation-latest",
                                                         input=["fine", "flag-me please"])),
    }
    assert b'"model"' not in bodies["default-model"]
    done = run_batch(client, _file(MODERATIONS, bodies), endpoint=MODERATIONS)  # type: ignore[arg-type]
    assert done.status == "completed" and done.request_counts.completed == 2
    outputs, errors = results_by_id(client, done)
    assert not errors
    named = ModerationCreateResponse.model_validate(outputs["named"]["response"]["body"])
    assert [r.flagged for r in named.results] == [False, True] and named.results[1].categories.violence
    default = ModerationCreateResponse.model_validate(outputs["default-model"]["response"]["body"])
    assert default.model == "omni-moderation-latest" and not default.results[0].flagged
    # a line without a model went upstream as written: no model added
    echoed = outputs["default-model"]["response"]["body"]["x_request"]
    assert json.dumps(echoed, separators=(",", ":")).encode() == bodies["default-model"]
    assert upstream.stats()["requests"] == 2


def test_moderations_with_no_route_fail_validation_with_model_not_found(make_server: Any, upstream: Upstream) -> None:
    upstream.reset()
    client = make_server(routes=("gpt-*",)).client()  # an upstream for chat models only
    bodies = {"named": b'{"model": "omni-moderation-latest", "input": "x"}', "default": b'{"input": "x"}',
              "no-input": b'{"model": "gpt-moderation"}'}
    done = run_batch(client, _file(MODERATIONS, bodies), endpoint=MODERATIONS)  # type: ignore[arg-type]
    assert done.status == "failed"
    assert [(e.line, e.code, e.param) for e in done.errors.data] == [
        (1, "model_not_found", "body.model"), (2, "model_not_found", "body.model"),
        (3, "invalid_request", "body.input")]
    for error in done.errors.data[:2]:
        assert error.message.startswith(
            "The provided model 'omni-moderation-latest' is not supported by the Batch API. ")
        assert "--upstream PATTERN=URL" in error.message
    assert upstream.stats()["requests"] == 0


def test_an_alias_for_the_default_moderation_model_picks_the_model_of_lines_without_one(
    make_server: Any, upstream: Upstream, tmp_path: Any
) -> None:
    config = tmp_path / "aliases.toml"
    config.write_text('[aliases]\n"omni-moderation-latest" = "mod-small"\n')
    client = make_server("--config", str(config), routes=("mod-*",)).client()
    bodies = {"default": b'{"input": "hello", "x_echo_raw": true}'}
    done = run_batch(client, _file(MODERATIONS, bodies), endpoint=MODERATIONS)  # type: ignore[arg-type]
    assert done.status == "completed"
    outputs, _ = results_by_id(client, done)
    body = outputs["default"]["response"]["body"]
    assert body["model"] == "mod-small" and body["x_request"] == {"input": "hello", "x_echo_raw": True,
                                                                  "model": "mod-small"}
