"""overnight.client's pure logic: templates, request lines, reading answers and errors of every
endpoint, and the summary line and exit code of an outcome."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

import pytest

from overnight.client import BatchInputError, Outcome, RequestTemplate, TemplateError, request_lines
from overnight.client.answers import FAILED, MISSING, SUCCEEDED, answer_of, input_of, result_of
from overnight.client.results import _joined

CHAT = {"model": "m", "messages": [{"role": "system", "content": 'Reply as {"a": 1}'},
                                   {"role": "user", "content": "Q: {prompt}"}], "max_tokens": 5}


def test_template_formats_only_placeholder_leaves() -> None:
    template = RequestTemplate(CHAT)
    body = json.loads(template.render({"prompt": 'say "hi" {x} é'}))
    assert body == {"model": "m", "messages": [{"role": "system", "content": 'Reply as {"a": 1}'},
                                               {"role": "user", "content": 'Q: say "hi" {x} é'}], "max_tokens": 5}
    assert template.placeholders == ("prompt",)
    assert template.infer_endpoint() == "/v1/chat/completions"
    assert CHAT["messages"][1]["content"] == "Q: {prompt}"  # the template itself is never changed


def test_a_whole_leaf_placeholder_keeps_the_value_type_and_doubled_braces_are_literal() -> None:
    template = RequestTemplate({"model": "{model}", "input": "{texts}", "n": "{n}", "note": "{{literal}} {n}"})
    body = json.loads(template.render({"model": "e", "texts": ["a", "b"], "n": 3}))
    assert body == {"model": "e", "input": ["a", "b"], "n": 3, "note": "{literal} 3"}
    assert template.infer_endpoint() is None  # `input` could be embeddings or responses


def test_template_errors() -> None:
    with pytest.raises(TemplateError, match="no placeholder"):
        RequestTemplate({"model": "m", "prompt": "the same every time"})
    with pytest.raises(TemplateError, match=r"\{topic\} has no value"):
        RequestTemplate({"prompt": "{topic}"}).render({"prompt": "x"})
    with pytest.raises(TemplateError, match="JSON object"):
        RequestTemplate(["{prompt}"])  # type: ignore[arg-type]


def test_request_lines_generate_or_take_custom_ids() -> None:
    lines = [json.loads(x) for x in request_lines(["a", "b"], CHAT, "/v1/chat/completions")]
    assert [x["custom_id"] for x in lines] == ["request-1", "request-2"]
    assert lines[1] == {"custom_id": "request-2", "method": "POST", "url": "/v1/chat/completions",
                        "body": json.loads(RequestTemplate(CHAT).render({"prompt": "b"}))}
    records = [{"id": "q7", "prompt": "a"}, {"id": 8, "prompt": "b"}, {"prompt": "c"}]
    ids = [json.loads(x)["custom_id"] for x in request_lines(records, CHAT, "/v1/x", id_field="id", id_prefix="p")]
    assert ids == ["q7", "8", "p3"]


def test_request_lines_refuse_duplicate_ids_and_missing_values() -> None:
    with pytest.raises(BatchInputError, match="'q1' is used twice"):
        list(request_lines([{"custom_id": "q1", "prompt": "a"}, {"custom_id": "q1", "prompt": "b"}], CHAT, "/u"))
    with pytest.raises(TemplateError, match=r"item 2 \(request-2\)"):
        list(request_lines([{"prompt": "a"}, {"text": "b"}], CHAT, "/u"))


def _ok(body: dict[str, Any]) -> dict[str, Any]:
    return {"id": "r", "custom_id": "c", "response": {"status_code": 200, "request_id": "q", "body": body}, "error": None}


def test_answers_of_every_endpoint() -> None:
    usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    chat = {"object": "chat.completion", "choices": [{"message": {"role": "assistant", "content": "four"}}], "usage": usage}
    completion = {"object": "text_completion", "choices": [{"text": "blue"}]}
    embedding = {"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": [0.5, 1.0]}]}
    response = {"object": "response", "output": [
        {"type": "reasoning", "summary": []},
        {"type": "message", "content": [{"type": "output_text", "text": "Hel"}, {"type": "output_text", "text": "lo"}]}]}
    assert [answer_of(b) for b in (chat, completion, embedding, response)] == ["four", "blue", [0.5, 1.0], "Hello"]
    record = result_of("c", _ok(chat), "2+2?")
    assert (record.status, record.answer, record.input, record.usage) == (SUCCEEDED, "four", "2+2?", usage)
    assert record.as_row()["input_tokens"] == 3 and record.as_row()["output_tokens"] == 2


def test_inputs_of_every_endpoint() -> None:
    assert input_of(CHAT) == "Q: {prompt}"
    assert input_of({"model": "m", "prompt": "p"}) == "p"
    assert input_of({"model": "m", "input": ["a", "b"]}) == ["a", "b"]
    parts = {"role": "user", "content": [{"type": "input_text", "text": "hi"}]}
    assert input_of({"model": "m", "input": [parts]}) == "hi"


def test_failed_lines_are_classified_by_status_code_not_by_error_alone() -> None:
    http_error = {"custom_id": "c", "error": None, "response": {"status_code": 400, "request_id": "q", "body": {
        "error": {"message": "too long", "type": "invalid_request_error", "param": None, "code": "context_length_exceeded"}}}}
    record = result_of("c", http_error, "x")
    assert (record.status, record.status_code, record.error_code, record.error_message) == (
        FAILED, 400, "context_length_exceeded", "too long")
    expired = {"custom_id": "c", "response": None, "error": {"code": "batch_expired", "message": "late"}}
    assert result_of("c", expired, "x").error_code == "batch_expired"
    zero = _ok({"choices": []}) | {"response": {"status_code": 0, "body": None}}  # seen in OpenAI output files
    assert result_of("c", zero, "x").status == FAILED
    assert result_of("c", None, "x").status == MISSING


@pytest.mark.parametrize(
    ("outcome", "summary", "code"),
    [
        (Outcome("b", "completed", 1000, 970, 30, {"upstream_error": 30}),
         "completed: 970 of 1,000 succeeded, 30 failed (upstream_error: 30)", 1),
        (Outcome("b", "completed", 3, 3, 0), "completed: 3 of 3 succeeded, 0 failed", 0),
        (Outcome("b", "completed", 3, 0, 3, {"invalid_value": 3}), "completed: 0 of 3 succeeded, 3 failed (invalid_value: 3)", 1),
        (Outcome("b", "cancelled", 10, 4, 6, {"batch_cancelled": 6}), "cancelled: 4 of 10 succeeded, 6 failed (batch_cancelled: 6)", 3),
        (Outcome("b", "cancelled", 10, 4, 0), "cancelled: 4 of 10 succeeded, 0 failed, 6 not reported", 3),
        (Outcome("b", "in_progress", 10, 4, 1), "in_progress: 4 of 10 succeeded so far, 1 failed", 5),
        (Outcome("b", "failed", 0, 0, 0, validation_errors=("line 2: duplicate_custom_id: twice",)),
         "failed: the batch was rejected with 1 error(s), nothing ran\n  line 2: duplicate_custom_id: twice", 3),
    ],
)
def test_summary_lines_and_exit_codes(outcome: Outcome, summary: str, code: int) -> None:
    assert outcome.summary() == summary
    assert outcome.exit_code == code


def test_join_follows_input_order_keeps_first_result_and_reports_missing_and_unknown_lines(tmp_path: Path) -> None:
    def write(name: str, lines: list[dict[str, Any]]) -> Path:
        path = tmp_path / name
        path.write_text("".join(json.dumps(x) + "\n" for x in lines))
        return path

    ok = {"choices": [{"message": {"content": "yes"}}]}
    out = write("out.jsonl", [_ok(ok) | {"custom_id": "r2"}, _ok(ok) | {"custom_id": "r9"}, _ok(ok) | {"custom_id": "r1"}])
    err = write("err.jsonl", [{"custom_id": "r1", "response": None, "error": {"code": "engine_error", "message": "x"}}])
    inputs = write("in.jsonl", [{"custom_id": f"r{i}", "body": {"prompt": f"p{i}"}} for i in (1, 2, 3)])
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    records = list(_joined(cast(Any, None), cast(Any, None), out, err, scratch, inputs, None))
    assert [(r.custom_id, r.status, r.input, r.answer) for r in records] == [
        ("r1", SUCCEEDED, "p1", "yes"),  # reported twice: the success is kept
        ("r2", SUCCEEDED, "p2", "yes"),
        ("r3", MISSING, "p3", None),  # the batch said nothing about it
        ("r9", SUCCEEDED, None, "yes"),  # a result for no input line comes last
    ]
