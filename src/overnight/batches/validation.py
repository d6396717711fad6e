"""Validation of a batch input file: one streaming pass that checks every line, reports every bad
one (1-based line, code, param, a message that says what to fix) and records shard boundaries.

Memory stays flat: one read chunk, one line, a 64-bit hash per custom_id (exact duplicates are
confirmed by a second pass over only the colliding hashes), and the shard plan.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from overnight import constants as C
from overnight.batches.endpoints import ENDPOINT_LABELS, REQUIRED_BODY_FIELDS, model_required, routing_model
from overnight.batches.jsonl import Line, iter_lines
from overnight.batches.request_line import RequestLineError, loads_line
from overnight.settings import Limits
from overnight.store.records import ShardPlan


@dataclass(slots=True)
class ValidationReport:
    errors: list[dict[str, Any]] = field(default_factory=list)
    error_count: int = 0
    plans: list[ShardPlan] = field(default_factory=list)
    total: int = 0

    @property
    def ok(self) -> bool:
        return self.error_count == 0


class _Collector:
    def __init__(self, report: ValidationReport, cap: int) -> None:
        self.report = report
        self.cap = cap

    def add(self, code: str, message: str, param: str | None, line: int | None) -> None:
        self.report.error_count += 1
        if len(self.report.errors) < self.cap:
            self.report.errors.append({"code": code, "message": message, "param": param, "line": line})


# model, endpoint -> the serving engine's shard size, or None when no engine serves the model
ShardLinesFor = Callable[[str, str], "int | None"]

DEFAULT_SHARD_LINES = 256
# Distinct model names whose routing one validation remembers; past this the router's own
# (bounded) cache answers. Input must not be able to grow memory without bound.
_MAX_REMEMBERED_MODELS = 1024


class _ShardPlanner:
    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        # Fixed by the first line whose model is served (unless the limits fix it).
        self.max_lines: int | None = limits.shard_max_lines
        self.plans: list[ShardPlan] = []
        self.first_request = 0
        self.count = 0
        self.start = 0
        self.end = 0

    def add(self, request_index: int, offset: int, length: int) -> None:
        if self.count and (
            self.count >= (self.max_lines or DEFAULT_SHARD_LINES)
            or offset + length - self.start > self.limits.shard_max_bytes
        ):
            self.flush()
        if not self.count:
            self.first_request, self.start = request_index, offset
        self.count += 1
        self.end = offset + length

    def flush(self) -> None:
        if self.count:
            self.plans.append(
                ShardPlan(len(self.plans), self.first_request, self.count, self.start, self.end - self.start)
            )
            self.count = 0


def validate_input(
    chunks: Callable[[], Iterable[bytes]],
    endpoint: str,
    shard_lines_for: Callable[[str], int | None],
    limits: Limits,
) -> ValidationReport:
    """`chunks()` opens a fresh stream over the file (called twice only if custom_id hashes collide).
    `shard_lines_for(model)` is None when no engine serves the model, else that engine's shard size."""
    checks = LineChecks(endpoint, shard_lines_for, limits)
    for line in iter_lines(chunks(), limits.shard_max_bytes):
        if not checks.add(line):
            break
    checks.finish()
    report = checks.report
    if checks.collisions:
        _report_duplicates(chunks, checks.collisions, limits, checks.errors)
    report.errors.sort(key=lambda e: (e["line"] is None, e["line"] or 0))
    if report.error_count > len(report.errors):
        report.errors.append(
            {
                "code": "too_many_errors",
                "message": f"{report.error_count - len(report.errors):,} more errors are not listed; "
                "fix the ones above and try again.",
                "param": None,
                "line": None,
            }
        )
    return report


class LineChecks:
    """The checks of one file, a line at a time (pulled from storage by `validate_input`, or pushed
    as an upload arrives by `UploadValidator`): errors, the shard plan, custom_id hashes whose
    collisions a second pass must look at."""

    def __init__(self, endpoint: str, shard_lines_for: Callable[[str], int | None], limits: Limits) -> None:
        self.endpoint = endpoint
        self.limits = limits
        self.report = ValidationReport()
        self.errors = _Collector(self.report, limits.max_reported_errors)
        self.planner = _ShardPlanner(limits)
        self.seen: set[int] = set()
        self.collisions: set[int] = set()
        self.required = REQUIRED_BODY_FIELDS.get(endpoint, ())
        self.served = _ModelRouting(shard_lines_for)

    def add(self, line: Line) -> bool:
        """Check one line; False when the file holds more requests than a batch may (stop reading)."""
        report, limits = self.report, self.limits
        if report.total >= limits.max_requests_per_batch:
            self.errors.add(
                "too_many_tasks",
                f"The input file has more than {limits.max_requests_per_batch:,} requests, the most one batch "
                f"may hold. Split it into several batches.",
                None,
                None,
            )
            return False
        planner = self.planner
        planner.add(report.total, line.offset, line.length)
        report.total += 1
        if line.data is None:
            self.errors.add(
                "line_too_long",
                f"This line is longer than {limits.shard_max_bytes:,} bytes, the most one request may be.",
                None,
                line.number,
            )
            return True
        custom_id = _check_line(line.data, line.number, self.endpoint, self.required, self.served, self.errors)
        if planner.max_lines is None:
            planner.max_lines = self.served.first_shard_lines
        if custom_id is not None:
            h = hash(custom_id)
            if h in self.seen:
                self.collisions.add(h)
            else:
                self.seen.add(h)
        return True

    def finish(self) -> None:
        self.planner.flush()
        self.report.plans = self.planner.plans
        if self.report.total == 0:
            self.errors.add("empty_file", "The input file contains no requests. Add one JSON request per line.",
                            None, None)


def _check_line(
    data: bytes,
    number: int,
    endpoint: str,
    required: tuple[str, ...],
    served: _ModelRouting,
    errors: _Collector,
) -> str | None:
    """Check one line; return its custom_id when it has a usable one."""
    # One plain parse: whatever parses here, the worker's `parse_request_line` parses too (its
    # fast split falls back to this same parse), so the body's bytes need not be found now.
    try:
        obj = loads_line(data)
    except RequestLineError:
        errors.add("invalid_json_line", "This line is not parseable as valid JSON (UTF-8).", None, number)
        return None
    custom_id = _well_formed(obj, endpoint, required, served)
    if custom_id is not None:
        return custom_id
    if not isinstance(obj, dict):
        errors.add(
            "invalid_request",
            "Each line must be a JSON object with custom_id, method, url and body.",
            None,
            number,
        )
        return None
    ok = True
    for key in ("custom_id", "method", "url", "body"):
        if key not in obj:
            errors.add("missing_required_parameter", f"Missing required parameter: '{key}'.", key, number)
            ok = False
    custom_id = obj.get("custom_id")
    if "custom_id" in obj and (not isinstance(custom_id, str) or not custom_id):
        errors.add("invalid_request", "custom_id must be a non-empty string.", "custom_id", number)
        custom_id, ok = None, False
    method = obj.get("method")
    if "method" in obj and method != "POST":
        errors.add("invalid_request", f"Invalid method {method!r}: only 'POST' is supported.", "method", number)
        ok = False
    url = obj.get("url")
    if "url" in obj and url != endpoint:
        errors.add(
            "invalid_url",
            f"The URL provided for this request ({url!r}) does not match the batch endpoint ({endpoint!r}).",
            "url",
            number,
        )
        ok = False
    body = obj.get("body")
    if "body" in obj:
        ok = _check_body(body, number, endpoint, required, served, errors) and ok
    return custom_id if isinstance(custom_id, str) and custom_id else None


def _well_formed(obj: Any, endpoint: str, required: tuple[str, ...], served: _ModelRouting) -> str | None:
    """The custom_id of a line that passes every check, by the shortest path (nearly every line of
    nearly every file); None sends the line through the checks that say what is wrong."""
    if type(obj) is not dict or len(obj) != 4:
        return None
    custom_id, body = obj.get("custom_id"), obj.get("body")
    if (
        type(custom_id) is not str
        or not custom_id
        or type(body) is not dict
        or obj.get("method") != "POST"
        or obj.get("url") != endpoint
        or body.get("stream") is True
    ):
        return None
    model = body.get("model")
    if type(model) is not str or not model or len(model) > C.MAX_MODEL_NAME_CHARS:
        return None
    for name in required:
        if name not in body:
            return None
    if endpoint == C.CHAT_COMPLETIONS:
        messages = body["messages"]
        if type(messages) is not list or not messages:
            return None
    return custom_id if served.shard_lines(model) is not None else None


def _check_body(
    body: Any,
    number: int,
    endpoint: str,
    required: tuple[str, ...],
    served: _ModelRouting,
    errors: _Collector,
) -> bool:
    if not isinstance(body, dict):
        errors.add("invalid_request", "body must be a JSON object (the request body of the endpoint).", "body", number)
        return False
    ok = True
    if body.get("stream") is True:
        label = ENDPOINT_LABELS.get(endpoint, endpoint)
        errors.add(
            "streaming_unsupported",
            f"{label}: Streaming is not supported in the Batch API. Remove body.stream.",
            "body.stream",
            number,
        )
        ok = False
    ok = _check_model(body, number, endpoint, served, errors) and ok
    for name in required:
        if name not in body:
            errors.add("invalid_request", f"{name.capitalize()} parameter is required (body.{name}).",
                       f"body.{name}", number)
            ok = False
    if endpoint == C.CHAT_COMPLETIONS and "messages" in body and (
        not isinstance(body["messages"], list) or not body["messages"]
    ):
        errors.add("invalid_request", "body.messages must be a non-empty array of messages.", "body.messages", number)
        ok = False
    return ok


def _check_model(body: dict[str, Any], number: int, endpoint: str, served: _ModelRouting, errors: _Collector) -> bool:
    model = body.get("model")
    if model is None and model_required(endpoint):
        errors.add("invalid_request", "Model parameter is required (body.model).", "body.model", number)
        return False
    if model is not None and (not isinstance(model, str) or not model):
        errors.add("invalid_request", "body.model must be a non-empty string.", "body.model", number)
        return False
    if isinstance(model, str) and len(model) > C.MAX_MODEL_NAME_CHARS:
        errors.add(
            "invalid_request",
            f"body.model is {len(model):,} characters long; a model name may be at most "
            f"{C.MAX_MODEL_NAME_CHARS} characters.",
            "body.model",
            number,
        )
        return False
    # A line without a model (moderations) is routed by the endpoint's default model.
    routed = routing_model(endpoint, body)
    if served.shard_lines(routed) is None:
        # OpenAI's wording, then what to configure here.
        errors.add(
            "model_not_found",
            f"The provided model '{routed}' is not supported by the Batch API. No engine of this server "
            f"serves it for {endpoint}: configure a route for it (--upstream PATTERN=URL) or use a served "
            "model (GET /v1/models).",
            "body.model",
            number,
        )
        return False
    return True


class _ModelRouting:
    """Which models are served (and their engines' shard sizes), remembered for up to
    `_MAX_REMEMBERED_MODELS` names."""

    def __init__(self, shard_lines_for: Callable[[str], int | None]) -> None:
        self._lookup = shard_lines_for
        self._known: dict[str, int | None] = {}
        self.first_shard_lines: int | None = None  # of the first served model seen

    def shard_lines(self, model: str) -> int | None:
        try:
            return self._known[model]
        except KeyError:
            lines = self._lookup(model)
            if len(self._known) < _MAX_REMEMBERED_MODELS:
                self._known[model] = lines
            if self.first_shard_lines is None:
                self.first_shard_lines = lines
            return lines


def _report_duplicates(
    chunks: Callable[[], Iterable[bytes]], collisions: set[int], limits: Limits, errors: _Collector
) -> None:
    """Second pass over lines whose custom_id hash collided: report exact repeats only."""
    first_seen: dict[str, int] = {}
    for line in iter_lines(chunks(), limits.shard_max_bytes):
        if line.data is None:
            continue
        try:
            custom_id = loads_line(line.data).get("custom_id")
        except (RequestLineError, AttributeError):
            continue
        if not isinstance(custom_id, str) or hash(custom_id) not in collisions:
            continue
        if custom_id in first_seen:
            errors.add(
                "duplicate_custom_id",
                f"The custom_id '{custom_id}' for this request is a duplicate of line {first_seen[custom_id]}. "
                "The custom_id parameter must be unique for each request in a batch.",
                "custom_id",
                line.number,
            )
        else:
            first_seen[custom_id] = line.number
