"""Validation of a batch input while it is uploaded, so that `batches.create` on the file can go
straight to `in_progress` with its shards (no `validating` phase: no second read of the file, no
worker round trip).

The same checks as the worker's validation (`LineChecks`), fed with the bytes as they arrive. Only
a clean file is remembered, with the endpoint its first line names, the shard plan, and what the
plan depended on: each model's routing (served, and by an engine with which shard size) and the
limits. `batches.create` re-checks just those against the server as it is then; anything else (a
bad line, another endpoint, routes or limits changed since, a custom_id hash collision that needs
a second pass) leaves the batch to the worker's validation, which reports errors as always.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import orjson

from overnight import constants as C
from overnight.batches.jsonl import Line, LineSplitter
from overnight.batches.request_line import RequestLineError, loads_line
from overnight.batches.validation import LineChecks, ShardLinesFor
from overnight.settings import Limits
from overnight.store.records import ShardPlan

# A file routed to more distinct models than this is left to the worker: what the plan depends on
# must stay small (it is stored with the file and re-checked by every batches.create).
MAX_MODELS = 1024
_VERSION = 1


@dataclass(frozen=True, slots=True)
class CheckedUpload:
    """A clean batch input, as validated on upload."""

    endpoint: str
    total: int
    plans: tuple[ShardPlan, ...]
    models: dict[str, int]  # routed model -> shard size of the engine that served it
    limits: tuple[int | None, int, int]

    def to_json(self) -> str:
        return orjson.dumps({
            "v": _VERSION, "endpoint": self.endpoint, "total": self.total, "models": self.models,
            "limits": self.limits,
            "plans": [[p.shard_index, p.first_request, p.request_count, p.byte_offset, p.byte_length]
                      for p in self.plans],
        }).decode()

    @staticmethod
    def from_json(text: str) -> CheckedUpload | None:
        """None for anything but this version's shape (written by an older or newer overnight)."""
        try:
            d = orjson.loads(text)
            if d.get("v") != _VERSION:
                return None
            return CheckedUpload(
                endpoint=d["endpoint"], total=d["total"], models=d["models"],
                limits=(d["limits"][0], d["limits"][1], d["limits"][2]),
                plans=tuple(ShardPlan(*p) for p in d["plans"]),
            )
        except (orjson.JSONDecodeError, AttributeError, KeyError, IndexError, TypeError):
            return None

    def holds_for(self, endpoint: str, shard_lines_for: ShardLinesFor, limits: Limits) -> bool:
        """Whether a batch on `endpoint` would be validated the same way now."""
        return (
            endpoint == self.endpoint
            and self.limits == limits_key(limits)
            and all(shard_lines_for(model, endpoint) == lines for model, lines in self.models.items())
        )


def limits_key(limits: Limits) -> tuple[int | None, int, int]:
    """The limits a shard plan and a clean report depend on."""
    return limits.shard_max_lines, limits.shard_max_bytes, limits.max_requests_per_batch


class UploadChecks:
    """Validation on upload for one server: its routing and limits."""

    def __init__(self, shard_lines_for: ShardLinesFor, limits: Limits) -> None:
        self.shard_lines_for = shard_lines_for
        self.limits = limits

    def validator(self) -> UploadValidator:
        return UploadValidator(self.shard_lines_for, self.limits)

    def plan_for(self, upload_check: str | None, endpoint: str) -> CheckedUpload | None:
        """The file's checked plan, when a batch on `endpoint` may use it as it is."""
        if upload_check is None:
            return None
        checked = CheckedUpload.from_json(upload_check)
        if checked is None or not checked.holds_for(endpoint, self.shard_lines_for, self.limits):
            return None
        return checked


class UploadValidator:
    """Fed every chunk of an upload in order (`feed`), then asked for the `result`. Gives up at
    the first thing that would not make a clean report, and from then on costs nothing."""

    def __init__(self, shard_lines_for: ShardLinesFor, limits: Limits) -> None:
        self._shard_lines_for = shard_lines_for
        self._limits = limits
        self._splitter = LineSplitter(limits.shard_max_bytes)
        self._checks: LineChecks | None = None
        self._models: dict[str, int | None] = {}
        self.gave_up = False

    def feed(self, chunk: bytes) -> None:
        if self.gave_up:
            return
        for line in self._splitter.feed(chunk):
            if not self._add(line):
                self.gave_up = True
                return

    def result(self) -> CheckedUpload | None:
        if not self.gave_up:
            for line in self._splitter.end():
                if not self._add(line):
                    self.gave_up = True
        checks = self._checks
        if self.gave_up or checks is None:
            return None
        checks.finish()
        if checks.report.error_count or checks.collisions:
            return None
        models = {model: lines for model, lines in self._models.items() if lines is not None}
        return CheckedUpload(checks.endpoint, checks.report.total, tuple(checks.report.plans), models,
                             limits_key(self._limits))

    def _add(self, line: Line) -> bool:
        checks = self._checks
        if checks is None:
            endpoint = _endpoint_of(line)
            if endpoint is None:
                return False
            checks = self._checks = LineChecks(endpoint, self._lookup(endpoint), self._limits)
        return checks.add(line) and not checks.report.error_count and len(self._models) <= MAX_MODELS

    def _lookup(self, endpoint: str) -> Callable[[str], int | None]:
        """The routing lookup for `LineChecks`, recording each model's answer."""
        def shard_lines(model: str) -> int | None:
            lines = self._models[model] = self._shard_lines_for(model, endpoint)
            return lines

        return shard_lines


def _endpoint_of(line: Line) -> str | None:
    """The endpoint the file's first request names, if it is one a batch can have."""
    if line.data is None:
        return None
    try:
        url = loads_line(line.data).get("url")
    except (RequestLineError, AttributeError):
        return None
    return url if url in C.SUPPORTED_ENDPOINTS else None
