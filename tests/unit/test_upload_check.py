"""Validation on upload: fed in any chunking it finds what the worker's validation finds for a
clean file (endpoint, total, shard plan), gives up on anything else, and a stored result is used
only while the routing and limits it depended on still hold."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from overnight import constants as C
from overnight.batches.jsonl import LineSplitter, iter_lines
from overnight.batches.upload_check import CheckedUpload, UploadChecks, UploadValidator
from overnight.batches.validation import validate_input
from overnight.settings import Limits


def _line(i: int, model: str = "m", url: str = C.CHAT_COMPLETIONS, **changes: object) -> dict[str, object]:
    line: dict[str, object] = {"custom_id": f"id-{i}", "method": "POST", "url": url,
                               "body": {"model": model, "messages": [{"role": "user", "content": "hi " * i}]}}
    line.update(changes)
    return line


def _file(lines: list[object]) -> bytes:
    return b"".join((x if isinstance(x, bytes) else json.dumps(x).encode()) + b"\n" for x in lines)


def _served(model: str, endpoint: str) -> int | None:
    return {"m": 7, "other": 3}.get(model) if endpoint == C.CHAT_COMPLETIONS else None


def _check(data: bytes, chunk: int = 1 << 20, limits: Limits | None = None) -> CheckedUpload | None:
    validator = UploadValidator(_served, limits or Limits())
    for start in range(0, len(data), chunk):
        validator.feed(data[start : start + chunk])
    return validator.result()


@given(count=st.integers(1, 40), chunk=st.integers(1, 300), models=st.lists(st.sampled_from(["m", "other"]),
       min_size=1, max_size=40), crlf=st.booleans(), final_newline=st.booleans())
@settings(max_examples=60)
def test_a_clean_upload_plans_what_the_worker_would(count: int, chunk: int, models: list[str], crlf: bool,
                                                    final_newline: bool) -> None:
    data = _file([_line(i, models[i % len(models)]) for i in range(count)])
    if crlf:
        data = data.replace(b"\n", b"\r\n")
    if not final_newline:
        data = data.rstrip(b"\r\n")
    checked = _check(data, chunk)
    report = validate_input(lambda: [data], C.CHAT_COMPLETIONS, lambda m: _served(m, C.CHAT_COMPLETIONS), Limits())
    assert report.ok and checked is not None
    assert checked.endpoint == C.CHAT_COMPLETIONS
    assert checked.total == report.total == count
    assert list(checked.plans) == report.plans
    used = {models[i % len(models)] for i in range(count)}
    assert checked.models == {m: _served(m, C.CHAT_COMPLETIONS) for m in used}


@given(data=st.binary(max_size=400), chunk=st.integers(1, 50), limit=st.integers(1, 60))
def test_pushed_lines_are_the_pulled_lines(data: bytes, chunk: int, limit: int) -> None:
    splitter = LineSplitter(limit)
    pushed = []
    for start in range(0, len(data), chunk):
        pushed += list(splitter.feed(data[start : start + chunk]))
    pushed += list(splitter.end())
    assert pushed == list(iter_lines([data], limit))


def test_anything_short_of_a_clean_file_is_left_to_the_worker() -> None:
    good = [_line(i) for i in range(5)]
    assert _check(_file(good)) is not None
    assert _check(_file([*good, b"{not json"])) is None
    assert _check(_file([*good, _line(9, model="unknown")])) is None  # not served
    assert _check(_file([*good, _line(0)])) is None  # duplicate custom_id
    assert _check(_file([*good, _line(9, url=C.EMBEDDINGS)])) is None  # mixed endpoints
    assert _check(_file([_line(0, url="/v1/unknown")])) is None  # no batch endpoint to check against
    assert _check(_file([_line(0, url=C.EMBEDDINGS)])) is None  # an endpoint no engine serves here
    assert _check(b"") is None and _check(b"\n \n") is None  # no requests
    assert _check(_file(good), limits=Limits(max_requests_per_batch=4)) is None
    assert _check(_file([*good, _line(9, model="x" * 70_000)]), limits=Limits(shard_max_bytes=65_536)) is None


def test_a_stored_check_is_used_only_while_what_it_depended_on_holds() -> None:
    limits = Limits()
    checked = _check(_file([_line(i) for i in range(3)]))
    assert checked is not None
    stored = checked.to_json()
    assert CheckedUpload.from_json(stored) == checked
    assert UploadChecks(_served, limits).plan_for(stored, C.CHAT_COMPLETIONS) == checked
    assert UploadChecks(_served, limits).plan_for(stored, C.EMBEDDINGS) is None  # the batch's endpoint differs
    assert UploadChecks(_served, limits).plan_for(None, C.CHAT_COMPLETIONS) is None
    assert UploadChecks(lambda m, e: 8, limits).plan_for(stored, C.CHAT_COMPLETIONS) is None  # other shard size
    assert UploadChecks(lambda m, e: None, limits).plan_for(stored, C.CHAT_COMPLETIONS) is None  # not served now
    assert UploadChecks(_served, Limits(shard_max_lines=2)).plan_for(stored, C.CHAT_COMPLETIONS) is None
    for garbage in ("", "[]", '{"v": 2}', '{"v": 1, "endpoint": "x"}', "not json"):
        assert CheckedUpload.from_json(garbage) is None
