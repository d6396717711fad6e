"""The zero-configuration default: `overnight serve` with no upstream runs chat, completions,
responses and embeddings batches on the embedded engines, driven with the official SDK."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from openai.types.responses import Response

from conftest import API_KEY, Server, raw_request, results_by_id, run_batch, serve_refused
from overnight.engines.packaged_models import default_weights

pytestmark = pytest.mark.embedded

CHAT_MODEL = "SmolLM2-135M-Instruct"
EMBED_MODEL = "all-MiniLM-L6-v2"


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = Server(tmp_path_factory.mktemp("embedded") / "data", ["--api-key", API_KEY]).start()
    yield srv
    srv.stop()


def _chat(i: int, model: str = "gpt-4o-mini", **body: Any) -> dict[str, Any]:
    return {
        "custom_id": f"chat-{i}",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {
            "model": model,
            "messages": [
                {"role": "system", "content": "You are a terse assistant."},
                {"role": "user", "content": f"Name a colour. Request {i % 8}."},
            ],
            "max_tokens": 8,
            "temperature": 0,
            **body,
        },
    }


def test_chat_batch_of_64_on_the_default_model(embedded: Server) -> None:
    client = embedded.client()
    lines = [_chat(i) for i in range(64)]
    lines[5]["body"]["messages"][1]["content"] = "word " * 4000  # longer than a slot's context
    done = run_batch(client, lines, timeout=300)
    assert done.status == "completed" and done.request_counts.total == 64
    outputs, errors = results_by_id(client, done)
    assert len(outputs) == 63 and list(errors) == ["chat-5"]
    assert errors["chat-5"]["response"]["status_code"] == 400
    assert errors["chat-5"]["response"]["body"]["error"]["code"] == "context_length_exceeded"
    body = outputs["chat-0"]["response"]["body"]
    assert body["object"] == "chat.completion" and body["model"] == CHAT_MODEL  # the model that answered
    assert body["choices"][0]["finish_reason"] in ("stop", "length")
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert 0 < body["usage"]["completion_tokens"] <= 8
    # (the same prompt giving the same answer whatever it is batched with is deterministic mode's
    # promise, tested below; the default mode may vary with batching, as OpenAI and vLLM do)
    assert done.model == CHAT_MODEL
    assert done.usage.output_tokens == sum(o["response"]["body"]["usage"]["completion_tokens"]
                                           for o in outputs.values())
    assert done.usage.input_tokens_details.cached_tokens > 0  # the shared system prompt was reused
    # the packaged Q4_1 weights, requantized once (BF16 with AVX512_BF16, else Q8_0: fast CPU kernels)
    # inside the data directory
    [fast] = (embedded.data_dir / "models").glob(f"SmolLM2-135M-Instruct.*.{default_weights()}.gguf")
    assert fast.is_file() and fast.stat().st_mode & 0o777 == 0o600
    assert not list(fast.parent.glob("*.partial"))


def test_completions_and_stop(embedded: Server) -> None:
    client = embedded.client()
    lines = [
        {"custom_id": f"c{i}", "method": "POST", "url": "/v1/completions",
         "body": {"model": "davinci-002", "prompt": "One, two, three,", "max_tokens": 6, "temperature": 0,
                  "stop": [","] if i % 2 else None}}
        for i in range(4)
    ]
    done = run_batch(client, lines, endpoint="/v1/completions", timeout=120)
    outputs, _ = results_by_id(client, done)
    assert outputs["c1"]["response"]["body"]["object"] == "text_completion"
    assert "," not in outputs["c1"]["response"]["body"]["choices"][0]["text"]


def test_embeddings_batch_of_64(embedded: Server) -> None:
    client = embedded.client()
    sentences = ["A man is eating food.", "A man is eating a piece of bread."]
    lines = [
        {"custom_id": f"e{i}", "method": "POST", "url": "/v1/embeddings",
         "body": {"model": "text-embedding-3-small", "input": sentences if i == 0 else f"sentence {i}"}}
        for i in range(64)
    ]
    done = run_batch(client, lines, endpoint="/v1/embeddings", timeout=120)
    outputs, errors = results_by_id(client, done)
    assert not errors and len(outputs) == 64
    body = outputs["e0"]["response"]["body"]
    assert body["model"] == EMBED_MODEL
    a, b = (d["embedding"] for d in body["data"])
    assert len(a) == 384
    cosine = sum(x * y for x, y in zip(a, b, strict=True)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))
    assert abs(cosine - 0.755) < 0.005
    assert done.usage.input_tokens == sum(o["response"]["body"]["usage"]["prompt_tokens"] for o in outputs.values())


def test_responses_batch_on_the_default_model(embedded: Server) -> None:
    """`client.responses.create(...)` bodies, as the SDK sends them, answered by the embedded chat
    model with nothing configured."""
    client = embedded.client()
    inputs: list[Any] = ["Name a colour.", [{"role": "user", "content": [{"type": "input_text",
                                                                       "text": "Name a fruit."}]}]]
    lines = [
        {"custom_id": f"r{i}", "method": "POST", "url": "/v1/responses",
         "body": {"model": "gpt-4.1-mini", "input": inputs[i % 2], "instructions": "You are terse.",
                  "max_output_tokens": 16, "temperature": 0}}
        for i in range(4)
    ]
    lines.append({"custom_id": "tools", "method": "POST", "url": "/v1/responses",
                  "body": {"model": "gpt-4.1-mini", "input": "hi", "tools": [{"type": "web_search"}]}})
    done = run_batch(client, lines, endpoint="/v1/responses", timeout=120)
    assert done.status == "completed" and done.model == CHAT_MODEL
    outputs, errors = results_by_id(client, done)
    assert sorted(outputs) == ["r0", "r1", "r2", "r3"] and list(errors) == ["tools"]
    assert errors["tools"]["response"]["status_code"] == 400
    assert errors["tools"]["response"]["body"]["error"]["param"] == "tools"
    parsed = {cid: Response.model_validate(line["response"]["body"]) for cid, line in outputs.items()}
    for response in parsed.values():
        assert response.object == "response" and response.model == CHAT_MODEL
        assert response.id.startswith("resp_") and response.output_text.strip()
        assert response.status in ("completed", "incomplete") and response.usage is not None
        assert 0 < response.usage.output_tokens <= 16
    assert done.usage.output_tokens == sum(r.usage.output_tokens for r in parsed.values() if r.usage)
    assert done.usage.input_tokens == sum(r.usage.input_tokens for r in parsed.values() if r.usage)


def test_moderations_are_refused_without_a_moderation_engine(embedded: Server) -> None:
    client = embedded.client()
    line = {"custom_id": "m", "method": "POST", "url": "/v1/moderations", "body": {"input": "hello"}}
    batch = run_batch(client, [line], endpoint="/v1/moderations", timeout=60)
    assert batch.status == "failed"
    assert [(e.line, e.code, e.param) for e in batch.errors.data] == [(1, "model_not_found", "body.model")]
    assert batch.errors.data[0].message.startswith(
        "The provided model 'omni-moderation-latest' is not supported by the Batch API.")


def test_models_lists_the_embedded_models(embedded: Server) -> None:
    status, _, raw = raw_request("GET", f"{embedded.base_url}/models", {"Authorization": f"Bearer {API_KEY}"})
    ids = {m["id"] for m in json.loads(raw)["data"]}
    assert status == 200 and {CHAT_MODEL, EMBED_MODEL} <= ids


def test_fallback_off_rejects_unknown_models(tmp_path: Path) -> None:
    srv = Server(tmp_path / "data", ["--api-key", API_KEY, "--no-fallback"]).start()
    try:
        client = srv.client()
        batch = run_batch(client, [_chat(0), _chat(1, model=CHAT_MODEL)], timeout=120)
        assert batch.status == "failed"
        assert [(e.line, e.code) for e in batch.errors.data] == [(1, "model_not_found")]
        assert run_batch(client, [_chat(1, model=CHAT_MODEL)], timeout=120).status == "completed"
    finally:
        srv.stop()


def test_embedded_engine_metrics(embedded: Server) -> None:
    """Tokens generated, prompt tokens reused and slots, published by the worker's heartbeat."""
    from prometheus_client.parser import text_string_to_metric_families

    from conftest import until

    def embedded_samples() -> dict[str, float]:
        text = raw_request("GET", f"http://127.0.0.1:{embedded.port}/metrics")[2].decode()
        return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples
                if s.labels.get("engine") == f"embedded:{CHAT_MODEL}"}

    def settled() -> dict[str, float]:  # what earlier tests generated, once the last heartbeat published it
        import time

        for _ in range(20):
            first = embedded_samples()
            time.sleep(1.5)  # longer than a heartbeat
            if embedded_samples() == first:
                return first
        raise AssertionError("the embedded engine's metrics kept moving with no batch running")

    before = settled()
    done = run_batch(embedded.client(), [_chat(i) for i in range(16)], timeout=300)
    assert done.status == "completed"
    tokens = before.get("overnight_embedded_generated_tokens_total", 0) + done.usage.output_tokens
    until(lambda: embedded_samples().get("overnight_embedded_generated_tokens_total", 0) >= tokens, timeout=10)
    after = embedded_samples()
    assert after["overnight_embedded_generated_tokens_total"] == tokens
    reused = after["overnight_embedded_cached_prompt_tokens_total"] - before.get(
        "overnight_embedded_cached_prompt_tokens_total", 0)
    assert reused == done.usage.input_tokens_details.cached_tokens > 0
    assert after["overnight_embedded_slots"] >= 1 and after["overnight_embedded_busy_slots"] == 0
    assert "overnight_embedded_tokens_per_second" in after


def test_deterministic_mode_answers_each_line_as_it_answers_it_alone(tmp_path: Path) -> None:
    """`--deterministic`: 4 copies of each of 4 prompts (two share a system prompt) in one batch give
    each prompt one answer at temperature 0, equal to its answer in a batch of its own, on the
    weights deterministic mode serves by default (Q8_0, on every CPU)."""
    system = "You are a helpful assistant. Answer clearly and concretely, in a few sentences."
    prompts = [(system, "What is the capital of France?"), (system, "Describe a river at dawn."),
               (None, "Write a short story about a dragon."), (None, "Count to five.")]

    def line(custom_id: str, prompt: tuple[str | None, str]) -> dict[str, Any]:
        messages = ([{"role": "system", "content": prompt[0]}] if prompt[0] else []) + [
            {"role": "user", "content": prompt[1]}]
        return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
                "body": {"model": CHAT_MODEL, "messages": messages, "max_tokens": 32, "temperature": 0}}

    def text(output: dict[str, Any]) -> str:
        return str(output["response"]["body"]["choices"][0]["message"]["content"])

    srv = Server(tmp_path / "data", ["--api-key", API_KEY, "--deterministic"]).start()
    try:
        client = srv.client()
        done = run_batch(client, [line(f"p{p}-{c}", prompt) for c in range(4) for p, prompt in enumerate(prompts)],
                         timeout=300)
        outputs, errors = results_by_id(client, done)
        assert not errors and len(outputs) == 16
        for p, prompt in enumerate(prompts):
            alone, _ = results_by_id(client, run_batch(client, [line("alone", prompt)], timeout=120))
            assert [text(outputs[f"p{p}-{c}"]) for c in range(4)] == [text(alone["alone"])] * 4, prompt
        made = [p.name for p in (tmp_path / "data" / "models").glob("*.gguf")]
        assert len(made) == 1 and re.fullmatch(r"SmolLM2-135M-Instruct\.[0-9a-f]{12}\.Q8_0\.gguf", made[0]), made
    finally:
        srv.stop()


def test_weights_q4_0_serves_the_packaged_model_requantized_once(tmp_path: Path) -> None:
    """`--weights Q4_0`: the faster (and lossier) format is made once in the data directory and
    serves the batch; the default's file is not made."""
    srv = Server(tmp_path / "data", ["--api-key", API_KEY, "--weights", "Q4_0"]).start()
    try:
        done = run_batch(srv.client(), [_chat(i) for i in range(4)], timeout=300)
        outputs, errors = results_by_id(srv.client(), done)
        assert done.status == "completed" and not errors and len(outputs) == 4
        assert all(o["response"]["body"]["usage"]["completion_tokens"] > 0 for o in outputs.values())
        made = sorted(p.name for p in (tmp_path / "data" / "models").glob("*.gguf"))
        assert len(made) == 1 and re.fullmatch(r"SmolLM2-135M-Instruct\.[0-9a-f]{12}\.Q4_0\.gguf", made[0]), made
    finally:
        srv.stop()


def test_weights_that_do_not_exist_are_refused_at_start(tmp_path: Path) -> None:
    stderr = serve_refused("--data-dir", str(tmp_path), "--api-key", API_KEY, "--weights", "Q5_K")
    assert "invalid choice: 'Q5_K'" in stderr, stderr


@pytest.mark.parametrize(("toml", "says"), [
    ('weights = "q8"', "[embedded] weights = 'q8': use one of Q8_0, BF16, IQ4_NL, Q4_0, Q4_1"),
    ('weights = "IQ4_NL"\ndeterministic = true', "deterministic mode cannot serve IQ4_NL"),
    ('weights = "BF16"\ndeterministic = true', "deterministic mode cannot serve BF16"),
    ('weights = "Q4_0"\nchat_model_path = "/models/mine.gguf"', "chat_model_path is served as it is"),
])
def test_weights_in_the_config_file_are_checked(tmp_path: Path, toml: str, says: str) -> None:
    config = tmp_path / "overnight.toml"
    config.write_text(f"[embedded]\n{toml}\n")
    stderr = serve_refused("--data-dir", str(tmp_path), "--api-key", API_KEY, "--config", str(config))
    assert says in stderr, stderr


def test_deterministic_mode_refuses_a_configured_model_with_matrices_in_other_formats(tmp_path: Path) -> None:
    """A GGUF of one's own in deterministic mode: Q5_0 matrices (as most of Gemma's, whose answers
    changed with batching in this mode) are refused at start with the way out; a Q8_0 copy is served."""
    from overnight.engines import packaged_models

    source = packaged_models.default_chat_model_path()
    assert source is not None
    mixed, plain = str(tmp_path / "mixed.Q5_0.gguf"), str(tmp_path / "plain.Q8_0.gguf")
    packaged_models.requantize(source, mixed, "Q5_0")
    packaged_models.requantize(source, plain, "Q8_0")
    config = tmp_path / "overnight.toml"
    config.write_text(f'[embedded]\ndeterministic = true\nchat_model_path = "{mixed}"\n')
    stderr = serve_refused("--data-dir", str(tmp_path / "data"), "--api-key", API_KEY, "--config", str(config))
    assert f"deterministic mode cannot serve {mixed}: some of its matrices are stored in Q5_0" in stderr, stderr
    assert "llama-quantize --allow-requantize" in stderr
    config.write_text(f'[embedded]\ndeterministic = true\nchat_model_path = "{plain}"\n')
    srv = Server(tmp_path / "data", ["--api-key", API_KEY, "--config", str(config)]).start()
    try:
        done = run_batch(srv.client(), [_chat(0, model="plain.Q8_0")], timeout=120)
        assert done.status == "completed" and done.request_counts.completed == 1
    finally:
        srv.stop()


def test_overnight_run_makes_the_fast_weights_once_in_the_users_cache(tmp_path: Path) -> None:
    """`overnight run` without a data dir works in a scratch directory: the weights it made
    there (~0.9 s, every run) went with it. They are kept in $XDG_CACHE_HOME/overnight/models."""
    import os
    import subprocess
    import sys

    (tmp_path / "in.jsonl").write_text("".join(json.dumps(_chat(i)) + "\n" for i in range(2)))
    scratch, cache = tmp_path / "scratch", tmp_path / "cache"
    scratch.mkdir()
    env = {**os.environ, "XDG_CACHE_HOME": str(cache), "TMPDIR": str(scratch)}
    made = []
    for run in range(2):
        result = subprocess.run([sys.executable, "-m", "overnight", "run", "-i", "in.jsonl", "-o", f"out{run}.jsonl"],
                                cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        assert len((tmp_path / f"out{run}.jsonl").read_text().splitlines()) == 2
        files = list((cache / "overnight" / "models").glob("*.gguf"))
        assert len(files) == 1 and re.fullmatch(rf"SmolLM2-135M-Instruct\.[0-9a-f]{{12}}\.{default_weights()}\.gguf",
                                                files[0].name)
        made.append((files[0].stat().st_ino, files[0].stat().st_mtime_ns))
        assert list(scratch.iterdir()) == []  # the scratch directory is gone, the cache stays
    assert made[0] == made[1]  # the second run used the first one's file
