"""A request template: a body dict whose string leaves may hold placeholders like `{prompt}`.

The template is serialized to JSON once, at compile time, into literal text and the few leaves
that hold placeholders; a line is the literal text joined with those leaves rendered. Nothing is
copied or re-serialized per line except the rendered leaves, so building a batch of a million
lines costs about one string format and one `json.dumps` of a short string per placeholder.

Placeholders are `{name}` with `name` an identifier; any other brace (a JSON example in a system
prompt, `{"a": 1}`) is literal text. `{{name}}` renders as the literal `{name}`. A leaf that is
exactly one placeholder takes the record's value with its JSON type (a number for `max_tokens`,
a list for an embeddings `input`); a placeholder inside longer text is formatted with `str()`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from overnight.client.errors import TemplateError

_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}|\{(\w+)\}")
_WHOLE = re.compile(r"\{(\w+)\}")

# Where a template's request goes, told from the keys its body has; anything else needs --endpoint.
_ENDPOINT_BY_KEY = (("messages", "/v1/chat/completions"), ("prompt", "/v1/completions"))


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


@dataclass(frozen=True, slots=True)
class _Leaf:
    """A string leaf with placeholders: literal pieces (str) and placeholder names (tuple of one)."""

    pieces: tuple[str | tuple[str], ...]
    whole: str | None  # the name, when the leaf is exactly `{name}`

    def render(self, values: Mapping[str, Any]) -> str:
        if self.whole is not None:
            return _dumps(values[self.whole])
        return _dumps("".join(p if isinstance(p, str) else str(values[p[0]]) for p in self.pieces))


def _leaf(text: str) -> _Leaf | None:
    pieces: list[str | tuple[str]] = []
    start = 0
    for match in _PLACEHOLDER.finditer(text):
        pieces.append(text[start:match.start()])
        if match.group(1) is not None:  # `{{name}}`: the literal `{name}`
            pieces.append("{" + match.group(1) + "}")
        else:
            pieces.append((match.group(2),))
        start = match.end()
    if start == 0:  # no braces that matter: a plain string
        return None
    pieces.append(text[start:])
    whole = _WHOLE.fullmatch(text)
    return _Leaf(tuple(p for p in pieces if p != ""), whole.group(1) if whole else None)


def _segments(value: Any) -> Iterator[str | _Leaf]:
    """The template as JSON text, with the leaves that hold placeholders left as `_Leaf`s."""
    if isinstance(value, Mapping):
        yield "{"
        for i, (key, item) in enumerate(value.items()):
            if not isinstance(key, str):
                raise TemplateError(f"template keys must be strings, not {key!r}")
            yield ("," if i else "") + _dumps(key) + ":"
            yield from _segments(item)
        yield "}"
    elif isinstance(value, list | tuple):
        yield "["
        for i, item in enumerate(value):
            if i:
                yield ","
            yield from _segments(item)
        yield "]"
    elif isinstance(value, str):
        leaf = _leaf(value)
        yield _dumps(value) if leaf is None else leaf
    else:
        try:
            yield _dumps(value)
        except TypeError as exc:
            raise TemplateError(f"the template holds a value JSON cannot encode: {value!r}") from exc


class RequestTemplate:
    """A compiled request body template; `render(values)` returns the body as JSON text."""

    __slots__ = ("_parts", "placeholders", "template")

    def __init__(self, template: Mapping[str, Any]) -> None:
        if not isinstance(template, Mapping):
            raise TemplateError("the template must be a JSON object (the request body)")
        self.template = template
        parts: list[str | _Leaf] = []
        for segment in _segments(template):
            if isinstance(segment, str) and parts and isinstance(parts[-1], str):
                parts[-1] += segment
            else:
                parts.append(segment)
        self._parts = tuple(parts)
        names: list[str] = []
        for part in self._parts:
            if isinstance(part, _Leaf):
                names += [p[0] for p in part.pieces if isinstance(p, tuple) and p[0] not in names]
                if part.whole is not None and part.whole not in names:
                    names.append(part.whole)
        if not names:
            raise TemplateError("the template has no placeholder such as {prompt}: every line would be the same")
        self.placeholders: tuple[str, ...] = tuple(names)

    def render(self, values: Mapping[str, Any]) -> str:
        """The body for one record, as compact JSON text."""
        try:
            return "".join(p if isinstance(p, str) else p.render(values) for p in self._parts)
        except KeyError as exc:
            raise TemplateError(f"the template's placeholder {{{exc.args[0]}}} has no value in this record") from None
        except TypeError as exc:
            raise TemplateError(f"a record value JSON cannot encode: {exc}") from None

    def infer_endpoint(self) -> str | None:
        """The endpoint this body is for, when its keys say so unambiguously."""
        for key, endpoint in _ENDPOINT_BY_KEY:
            if key in self.template:
                return endpoint
        return None
