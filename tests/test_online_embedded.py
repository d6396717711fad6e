"""Online requests on the embedded engines (the packaged SmolLM2 and MiniLM): answered whole and
as server-sent events in OpenAI's formats, and an online request served while a batch fills the
chat engine. Kept few and short (max_tokens 8): the engine runs on the test machine's CPU."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from conftest import API_KEY, Server, upload, wait_status, wait_terminal

pytestmark = pytest.mark.embedded

CHAT_MODEL = "SmolLM2-135M-Instruct"
QUESTION = [{"role": "user", "content": "Name a colour."}]


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Two sequence slots (and so 8 lines queued in the engine at most): a batch fills it at once."""
    root = tmp_path_factory.mktemp("online-embedded")
    config = root / "overnight.toml"
    config.write_text("[embedded]\nn_seq_max = 2\nn_ctx = 4096\n")
    srv = Server(root / "data", ["--config", str(config), "--api-key", API_KEY, "--lease-seconds", "2"]).start()
    yield srv
    srv.stop()


def test_chat_whole_and_streamed(embedded: Server) -> None:
    client = embedded.client()
    answer = client.chat.completions.create(model="gpt-4o-mini", messages=QUESTION, max_tokens=8, temperature=0)
    assert answer.model == CHAT_MODEL and answer.choices[0].message.content
    assert answer.usage is not None and 0 < answer.usage.completion_tokens <= 8
    chunks = list(client.chat.completions.create(model="gpt-4o-mini", messages=QUESTION, max_tokens=8,
                                                 temperature=0, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].object == "chat.completion.chunk" and chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(pieces).strip() and len(pieces) > 1  # text as it was generated, not in one piece
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage is not None and 0 < usage.completion_tokens <= 8
    assert all(c.usage is None for c in chunks[:-1])


def test_penalties_are_applied_while_another_request_decodes(embedded: Server) -> None:
    """A request with a presence or frequency penalty once failed on the decode thread, taking the
    request decoding beside it down too ("engine_error" for both)."""
    client = embedded.client()
    prompt = "blue, blue, blue, blue, blue, blue, blue, blue,"  # the model goes on repeating it
    with ThreadPoolExecutor(2) as pool:
        plain = pool.submit(client.chat.completions.create, model="gpt-4o-mini", messages=QUESTION, max_tokens=8,
                            temperature=0)
        penalised = pool.submit(client.completions.create, model="gpt-4o-mini", prompt=prompt, max_tokens=12,
                                temperature=0, frequency_penalty=2.0, presence_penalty=2.0)
        unpenalised = client.completions.create(model="gpt-4o-mini", prompt=prompt, max_tokens=12, temperature=0)
        assert plain.result().choices[0].message.content
        text = penalised.result().choices[0].text
    repeated = unpenalised.choices[0].text
    assert repeated.count("blue") >= 3, repeated
    assert text.count("blue") < repeated.count("blue"), (text, repeated)  # drawn tokens were penalised


def test_completions_streamed(embedded: Server) -> None:
    chunks = list(embedded.client().completions.create(model="davinci-002", prompt="One, two, three,",
                                                       max_tokens=6, temperature=0, stream=True))
    assert all(c.object == "text_completion" and c.model == CHAT_MODEL for c in chunks)
    assert "".join(c.choices[0].text for c in chunks).strip()
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_responses_streamed(embedded: Server) -> None:
    events = list(embedded.client().responses.create(model="gpt-4.1-mini", input="Name a fruit.",
                                                     max_output_tokens=16, temperature=0, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert "response.output_text.delta" in kinds and "response.output_text.done" in kinds
    assert kinds[-1] in ("response.completed", "response.incomplete")
    final: Any = events[-1]
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas.strip() and final.response.output_text == deltas
    assert final.response.id == events[0].response.id  # type: ignore[union-attr]
    assert final.response.created_at == events[0].response.created_at  # type: ignore[union-attr]  # not the finish
    assert [e.sequence_number for e in events] == list(range(len(events)))


def test_embeddings(embedded: Server) -> None:
    answer = embedded.client().embeddings.create(model="text-embedding-3-small", input=["A man is eating food."])
    assert answer.model == "all-MiniLM-L6-v2" and len(answer.data[0].embedding) == 384


def test_bad_parameter_is_a_400_from_the_engine(embedded: Server) -> None:
    import openai

    with pytest.raises(openai.BadRequestError) as caught:
        embedded.client().chat.completions.create(model="gpt-4o-mini", messages=QUESTION, n=3, stream=True)
    assert caught.value.param == "n"


# Long enough that the 8 lines of a shard take 4 rounds of this many tokens on each of the 2 slots:
# several seconds, so the lines reported done a heartbeat after the online answer are still fewer
# than 8 (with 32 tokens a fast machine finished the whole shard in that heartbeat, and the test
# failed though the online request had been answered at once).
LINE_TOKENS = 160


def test_online_request_goes_ahead_of_queued_batch_lines(embedded: Server) -> None:
    """The worker hands the engine 8 lines (one shard: 4 x its 2 slots) and queues no more until
    some finish. An online request sent then is admitted at the next free slot, ahead of the 6
    queued lines, so it is answered before that shard commits; in arrival order it would wait for
    all 8 lines, and their commit would count them done first."""
    client = embedded.client()
    lines = [{"custom_id": f"b{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": "gpt-4o-mini", "max_tokens": LINE_TOKENS, "temperature": 0,
                       "messages": [{"role": "user", "content": f"Count from {i} to 1000, separated by commas."}]}}
             for i in range(16)]
    batch = client.batches.create(input_file_id=upload(client, lines), endpoint="/v1/chat/completions",
                                  completion_window="24h")
    wait_status(client, batch.id, {"in_progress"}, timeout=60)
    time.sleep(1.5)  # the worker has handed the engine its 8 lines
    before = _completed(client, batch.id)
    started = time.monotonic()
    stream = client.chat.completions.create(model="gpt-4o-mini", messages=QUESTION, max_tokens=8, temperature=0,
                                            stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    took = time.monotonic() - started
    time.sleep(1.5)  # the heartbeat that reports the lines done by then
    during = _completed(client, batch.id) - before
    assert text.strip()
    assert during < 8, f"{during} batch lines were done when the online request was answered ({took:.1f}s)"
    client.batches.cancel(batch.id)
    wait_terminal(client, batch.id, timeout=120)


def _completed(client: Any, batch_id: str) -> int:
    counts = client.batches.retrieve(batch_id).request_counts
    return int(counts.completed + counts.failed)
