"""Batch files from prompts or records: one request line per item, written as it is rendered."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from overnight.client.errors import BatchInputError, TemplateError
from overnight.client.template import RequestTemplate

Record = str | Mapping[str, Any]

DEFAULT_ID_PREFIX = "request-"


def request_lines(
    items: Iterable[Record],
    template: RequestTemplate | Mapping[str, Any],
    endpoint: str,
    *,
    id_field: str = "custom_id",
    id_prefix: str = DEFAULT_ID_PREFIX,
) -> Iterator[str]:
    """One batch input line (JSON text, no newline) per item.

    An item is a prompt (a string, the value of `{prompt}`) or a record (a mapping whose keys are the
    placeholders). A record's `id_field` is its custom_id; other items get `<id_prefix><n>`, n counting
    from 1 in input order. A repeated custom_id is refused here: the batch would fail validation."""
    compiled = template if isinstance(template, RequestTemplate) else RequestTemplate(template)
    head = ',"method":"POST","url":' + json.dumps(endpoint) + ',"body":'
    seen: set[str] = set()
    for n, item in enumerate(items, start=1):
        values: Mapping[str, Any] = {"prompt": item} if isinstance(item, str) else item
        custom_id = values.get(id_field) if id_field in values else f"{id_prefix}{n}"
        if isinstance(custom_id, int) and not isinstance(custom_id, bool):
            custom_id = str(custom_id)
        if not isinstance(custom_id, str) or not custom_id:
            raise BatchInputError(f"item {n}: {id_field} must be a non-empty string, not {custom_id!r}")
        if custom_id in seen:
            raise BatchInputError(f"item {n}: the custom_id {custom_id!r} is used twice; each must be unique")
        seen.add(custom_id)
        try:
            body = compiled.render(values)
        except TemplateError as exc:
            raise TemplateError(f"item {n} ({custom_id}): {exc}") from None
        yield '{"custom_id":' + json.dumps(custom_id, ensure_ascii=False) + head + body + "}"


def write_batch_file(
    path: str | Path,
    items: Iterable[Record],
    template: RequestTemplate | Mapping[str, Any],
    endpoint: str | None = None,
    *,
    id_field: str = "custom_id",
    id_prefix: str = DEFAULT_ID_PREFIX,
) -> int:
    """Write a batch input file and return its line count. `endpoint` defaults to what the template's
    keys say (`messages`: chat completions, `prompt`: completions)."""
    compiled = template if isinstance(template, RequestTemplate) else RequestTemplate(template)
    endpoint = endpoint or compiled.infer_endpoint()
    if endpoint is None:
        raise BatchInputError("cannot tell the endpoint from the template; give it (e.g. /v1/embeddings)")
    count = 0
    with Path(path).open("w", encoding="utf-8", newline="\n") as out:
        for line in request_lines(items, compiled, endpoint, id_field=id_field, id_prefix=id_prefix):
            out.write(line + "\n")
            count += 1
    if count == 0:
        raise BatchInputError("no prompts or records: a batch needs at least one line")
    return count


def read_prompts(path: str | Path) -> Iterator[str]:
    """Prompts from a text file, one per line; empty lines are skipped. (A prompt with newlines
    belongs in a records file: JSON Lines, one object per line.)"""
    with Path(path).open(encoding="utf-8-sig") as fh:
        for raw in fh:
            prompt = raw.rstrip("\r\n")
            if prompt:
                yield prompt


def read_records(path: str | Path) -> Iterator[Mapping[str, Any]]:
    """Records from a JSON Lines file, one object per line; empty lines are skipped."""
    with Path(path).open(encoding="utf-8-sig") as fh:
        for number, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise BatchInputError(f"{path}, line {number}: not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict):
                raise BatchInputError(f"{path}, line {number}: a record must be a JSON object")
            yield record


def first_url(path: str | Path) -> str | None:
    """The `url` of a batch file's first line: the endpoint the batch is for."""
    with Path(path).open("rb") as fh:
        for raw in fh:
            if raw.strip():
                try:
                    url = json.loads(raw.removeprefix(b"\xef\xbb\xbf")).get("url")
                except (ValueError, AttributeError):
                    return None
                return url if isinstance(url, str) else None
    return None
