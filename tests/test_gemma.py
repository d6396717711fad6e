"""The optional Gemma 3 270M engine: refused until its terms are accepted, assembled once into the
data directory, routed by name, and announced with its notice."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from conftest import API_KEY, Server, raw_request, results_by_id, run_batch, serve_refused
from overnight.engines.packaged_models import GEMMA_CHAT_TEMPLATE, GEMMA_MODEL_NAME

pytestmark = pytest.mark.embedded


def test_gemma_turn_format() -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Colour?"}]
    formatter = Jinja2ChatFormatter(template=GEMMA_CHAT_TEMPLATE, eos_token="<eos>", bos_token="<bos>",
                                    add_generation_prompt=True)  # as the engine renders it
    text = formatter(messages=messages).prompt
    assert text == (
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n"
        "<start_of_turn>model\nHello.<end_of_turn>\n"
        "<start_of_turn>user\nColour?<end_of_turn>\n"
        "<start_of_turn>model\n"
    )


def test_gemma_is_refused_until_its_terms_are_accepted(tmp_path: Path) -> None:
    stderr = serve_refused("--data-dir", str(tmp_path), "--gemma", "--api-key", API_KEY)
    assert "ai.google.dev/gemma/terms" in stderr and "--accept-gemma-terms" in stderr


def test_gemma_serves_a_batch_by_name(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    # 8 slots, not 64: both models' KV caches are cleared at start (~5 GB at the defaults took this
    # server past the 30 s that start is given, once, on a busy CI run).
    config = tmp_path / "overnight.toml"
    config.write_text("[embedded]\nn_seq_max = 8\nn_ctx = 16384\n")
    srv = Server(data_dir, ["--api-key", API_KEY, "--gemma", "--accept-gemma-terms", "--config", str(config)]).start()
    try:
        model_file = data_dir / "models" / "gemma-3-270m-q4_k_m.gguf"
        assembled_at = model_file.stat().st_mtime
        status, _, raw = raw_request("GET", f"{srv.base_url}/models", {"Authorization": f"Bearer {API_KEY}"})
        models = {m["id"]: m for m in json.loads(raw)["data"]}
        assert status == 200 and "Gemma Terms of Use" in models[GEMMA_MODEL_NAME]["owned_by"]
        lines = [{"custom_id": f"g{i}", "method": "POST", "url": "/v1/chat/completions",
                  "body": {"model": GEMMA_MODEL_NAME, "max_tokens": 6, "temperature": 0,
                           "messages": [{"role": "user", "content": f"Count to {i + 3}."}]}} for i in range(4)]
        done = run_batch(srv.client(), lines, timeout=180)
        outputs, errors = results_by_id(srv.client(), done)
        assert not errors and len(outputs) == 4
        body = outputs["g0"]["response"]["body"]
        assert body["model"] == GEMMA_MODEL_NAME and 0 < body["usage"]["completion_tokens"] <= 6
        srv.stop()
        srv.start()  # the assembled model is reused, not rebuilt
        assert model_file.stat().st_mtime == assembled_at
    finally:
        srv.stop()


def test_deterministic_mode_serves_gemma_in_q8_0_and_a_line_answers_as_it_does_alone(tmp_path: Path) -> None:
    """Gemma's file stores most matrices in Q5_0 and K-quants, whose CPU kernels sum a row
    differently with the number of rows decoded together: in deterministic mode 13 of these 48
    answers (3 copies each of 16 prompts, 8 with a system prompt) differed from the prompt's answer
    alone. Deterministic mode serves a Q8_0 copy of it, made once, and each copy answers as alone."""
    import asyncio
    import time

    from overnight.engines.port import EngineRequest
    from overnight.settings import EmbeddedSettings, Settings
    from overnight.wiring.engines import gemma_engine

    questions = ["Hi.", "Name a fruit.", "What is the capital of France?", "Write a haiku about the sea.",
                 "Count to five.", "Why is the sky blue?", "Tell me a joke about cats.", "Describe a tree."]
    system = "You are a careful assistant who answers in one short sentence. " * 6

    def chat(question: str, with_system: bool) -> EngineRequest:
        messages = [{"role": "system", "content": system}] if with_system else []
        body = {"model": GEMMA_MODEL_NAME, "max_tokens": 48, "temperature": 0,
                "messages": [*messages, {"role": "user", "content": question}]}
        return EngineRequest("/v1/chat/completions", body, time.time() + 600)

    prompts = [chat(q, s) for s in (False, True) for q in questions]
    settings = Settings(data_dir=tmp_path, embedded=EmbeddedSettings(
        gemma=True, accept_gemma_terms=True, deterministic=True, n_seq_max=16, n_ctx=16 * 512, threads=2))
    engine: Any = gemma_engine(settings)
    assert re.fullmatch(r"gemma-3-270m-q4_k_m\.[0-9a-f]{12}\.Q8_0\.gguf", Path(engine.model_path).name)

    def text(response: Any) -> str:
        assert response.status_code == 200, response.body
        return str(response.body["choices"][0]["message"]["content"])

    async def work() -> tuple[list[str], list[str]]:
        await engine.start()
        try:
            alone = [text(await engine.execute(p)) for p in prompts]
            together = await asyncio.gather(*(engine.execute(p) for p in prompts for _ in range(3)))
            return alone, [text(r) for r in together]
        finally:
            await engine.close()

    alone, together = asyncio.run(work())
    assert together == [a for a in alone for _ in range(3)]
