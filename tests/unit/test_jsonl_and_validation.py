"""Property-based tests of the streaming line reader and the validator."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from overnight import constants as C
from overnight.batches import validation
from overnight.batches.jsonl import iter_lines, split_requests
from overnight.batches.validation import validate_input
from overnight.settings import Limits

line_text = st.text(alphabet=st.characters(blacklist_characters="\n", blacklist_categories=("Cs",)), max_size=40)


@given(lines=st.lists(line_text, max_size=30), chunk=st.integers(1, 64), crlf=st.booleans(),
       final_newline=st.booleans())
def test_iter_lines_matches_a_naive_split(lines: list[str], chunk: int, crlf: bool, final_newline: bool) -> None:
    sep = b"\r\n" if crlf else b"\n"
    data = sep.join(x.encode() for x in lines) + (sep if final_newline and lines else b"")
    chunks = [data[i : i + chunk] for i in range(0, len(data), chunk)]
    got = [(ln.number, ln.data) for ln in iter_lines(chunks, 10_000)]
    expected = []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        text = raw[:-1] if raw.endswith(b"\r") else raw
        if raw.strip():
            expected.append((number, text))
    assert got == expected
    for ln in iter_lines(chunks, 10_000):  # offsets point at the line's bytes
        assert ln.data is not None and data[ln.offset : ln.offset + len(ln.data)] == ln.data


def _line(i: int, **changes: object) -> dict[str, object]:
    base: dict[str, object] = {"custom_id": f"id-{i}", "method": "POST", "url": C.CHAT_COMPLETIONS,
                               "body": {"model": "m", "messages": [{"role": "user", "content": "hi"}]}}
    base.update(changes)
    return base


def _validate(lines: list[object], limits: Limits | None = None) -> object:
    data = b"".join((x if isinstance(x, bytes) else json.dumps(x).encode()) + b"\n" for x in lines)
    served = lambda m: None if m == "unknown" else 100  # noqa: E731
    return validate_input(lambda: [data], C.CHAT_COMPLETIONS, served, limits or Limits()), data


@given(st.lists(st.integers(0, 50), min_size=1, max_size=60), st.integers(1, 7))
@settings(max_examples=60)
def test_duplicates_reported_exactly_and_shards_cover_every_line(ids: list[int], shard_lines: int) -> None:
    report, data = _validate([_line(i) for i in ids], Limits(shard_max_lines=shard_lines))
    seen: set[int] = set()
    expected_dups = []
    for number, i in enumerate(ids, start=1):
        if i in seen:
            expected_dups.append(number)
        seen.add(i)
    assert [e["line"] for e in report.errors] == expected_dups  # type: ignore[attr-defined]
    # shards are contiguous, cover every request once, and split back into the same lines
    plans = report.plans  # type: ignore[attr-defined]
    assert sum(p.request_count for p in plans) == len(ids)
    recovered = [line for p in plans for line in split_requests(data[p.byte_offset : p.byte_offset + p.byte_length])]
    assert [json.loads(x)["custom_id"] for x in recovered] == [f"id-{i}" for i in ids]
    assert all(p.request_count <= shard_lines for p in plans)


@given(st.lists(st.one_of(st.binary(max_size=30), st.text(max_size=30).map(str.encode)), max_size=20))
@settings(max_examples=80)
def test_garbage_never_crashes_the_validator(garbage: list[bytes]) -> None:
    report, _ = _validate([g.replace(b"\n", b" ") for g in garbage] + [_line(0)])
    for error in report.errors:  # type: ignore[attr-defined]
        assert set(error) == {"code", "message", "param", "line"} and error["message"]


def test_error_list_is_capped_but_counted() -> None:
    report, _ = _validate(["{bad"] * 30, Limits(max_reported_errors=5))  # type: ignore[list-item]
    assert report.error_count == 30  # type: ignore[attr-defined]
    assert len(report.errors) == 6 and report.errors[-1]["code"] == "too_many_errors"  # type: ignore[attr-defined]


def test_oversized_line_is_reported() -> None:
    report, _ = _validate([_line(0), _line(1, pad="x" * 500)], Limits(shard_max_bytes=300))
    assert [(e["line"], e["code"]) for e in report.errors] == [(2, "line_too_long")]  # type: ignore[attr-defined]


def test_shard_size_is_the_serving_engines_unless_configured() -> None:
    report, _ = _validate([_line(i) for i in range(250)])
    assert [p.request_count for p in report.plans] == [100, 100, 50]  # type: ignore[attr-defined]
    report, _ = _validate([_line(i) for i in range(250)], Limits(shard_max_lines=120))
    assert [p.request_count for p in report.plans] == [120, 120, 10]  # type: ignore[attr-defined]


def test_model_lookups_are_remembered_only_up_to_a_bound() -> None:
    """A file of distinct model names must not grow the validator's memory without bound."""
    asked: list[str] = []

    def served(model: str) -> int | None:
        asked.append(model)
        return 10

    lines = b"".join(json.dumps(_line(i, body={"model": f"m{i % 3000}", "messages": [{"role": "user",
                     "content": "x"}]})).encode() + b"\n" for i in range(6000))
    report = validate_input(lambda: [lines], C.CHAT_COMPLETIONS, served, Limits())
    assert report.ok
    # the first 1,024 names are remembered; the rest are asked each time (the router caches them)
    remembered = validation._MAX_REMEMBERED_MODELS
    assert len(asked) == remembered + 2 * (3000 - remembered)
    assert [p.request_count for p in report.plans][:2] == [10, 10]


def _endpoint_report(
    endpoint: str, bodies: list[dict[str, object]], served_models: set[str]
) -> list[tuple[int | None, str, str | None]]:
    lines = [{"custom_id": f"id-{i}", "method": "POST", "url": endpoint, "body": b} for i, b in enumerate(bodies)]
    data = b"".join(json.dumps(x).encode() + b"\n" for x in lines)
    report = validate_input(lambda: [data], endpoint, lambda m: 10 if m in served_models else None, Limits())
    return [(e["line"], e["code"], e["param"]) for e in report.errors]


def test_responses_lines_need_model_and_input_and_refuse_stream() -> None:
    errors = _endpoint_report(C.RESPONSES, [
        {"model": "m", "input": "hi"},
        {"model": "m"},
        {"input": "hi"},
        {"model": "m", "input": [{"role": "user", "content": "hi"}], "stream": True},
        {"model": "other", "input": "hi"},
    ], {"m"})
    assert errors == [(2, "invalid_request", "body.input"), (3, "invalid_request", "body.model"),
                      (4, "streaming_unsupported", "body.stream"), (5, "model_not_found", "body.model")]


def test_streaming_message_names_the_endpoint_as_openai_does() -> None:
    data = json.dumps({"custom_id": "a", "method": "POST", "url": C.RESPONSES,
                       "body": {"model": "m", "input": "x", "stream": True}}).encode()
    report = validate_input(lambda: [data], C.RESPONSES, lambda m: 10, Limits())
    assert report.errors[0]["message"].startswith("Responses: Streaming is not supported in the Batch API.")


def test_moderation_lines_need_input_and_route_by_the_default_model_without_one() -> None:
    bodies: list[dict[str, object]] = [{"input": "text"}, {"model": "omni-moderation-latest", "input": ["a", "b"]},
                                       {"model": "text-moderation-stable", "input": "x"}, {}]
    errors = _endpoint_report(C.MODERATIONS, bodies, {"omni-moderation-latest"})
    assert errors == [(3, "model_not_found", "body.model"), (4, "invalid_request", "body.input")]
    # with nothing that serves moderations, a line without a model names the model it would need
    data = json.dumps({"custom_id": "a", "method": "POST", "url": C.MODERATIONS, "body": {"input": "x"}}).encode()
    report = validate_input(lambda: [data], C.MODERATIONS, lambda m: None, Limits())
    assert [e["code"] for e in report.errors] == ["model_not_found"]
    assert report.errors[0]["message"].startswith(
        "The provided model 'omni-moderation-latest' is not supported by the Batch API.")


def test_model_not_found_uses_openais_wording_and_says_what_to_configure() -> None:
    report, _ = _validate([_line(0, body={"model": "unknown", "messages": [{"role": "user", "content": "x"}]})])
    message = report.errors[0]["message"]  # type: ignore[attr-defined]
    assert message.startswith("The provided model 'unknown' is not supported by the Batch API. ")
    assert "--upstream PATTERN=URL" in message and "GET /v1/models" in message
