"""Batches as the API sees them: create (checks the parameters, answers `validating` at once, or
`in_progress` with its shards planned when the input was validated on upload), retrieve, list,
cancel. The work itself is done by the worker."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from overnight import constants as C
from overnight.batches.errors import Conflict, InvalidRequest, NotFound
from overnight.batches.ports import BatchCatalog, FileCatalog, ProgressReader
from overnight.batches.progress import WINDOW_SECONDS, estimate
from overnight.batches.upload_check import UploadChecks
from overnight.ids import new_batch_id
from overnight.store.records import BatchRecord


class BatchService:
    def __init__(
        self,
        batches: BatchCatalog,
        files: FileCatalog,
        endpoints: tuple[str, ...] = C.SUPPORTED_ENDPOINTS,
        windows: dict[str, int] | None = None,
        clock: Callable[[], float] = time.time,
        on_change: Callable[[str], None] = lambda change: None,
        progress: ProgressReader | None = None,
        upload_checks: UploadChecks | None = None,
    ) -> None:
        self.batches = batches
        self.files = files
        self.endpoints = endpoints
        self.windows = dict(C.COMPLETION_WINDOWS) if windows is None else windows  # name -> seconds
        self.clock = clock
        self.on_change = on_change  # wakes the worker(s) with a C.CHANGE_*
        self.progress = progress  # None: batches carry no throughput or ETA
        self.upload_checks = upload_checks  # None: every batch is validated by a worker

    def create(
        self,
        owner: str,
        input_file_id: str,
        endpoint: str,
        completion_window: str,
        metadata: Any = None,
        output_expires_after: Any = None,
        retry_of: str | None = None,
        request_id: str | None = None,
    ) -> BatchRecord:
        """`request_id`: the creating call's x-request-id, kept so worker logs can name it."""
        if endpoint not in self.endpoints:
            raise InvalidRequest(
                f"Invalid value: '{endpoint}'. Supported values are: {', '.join(repr(e) for e in self.endpoints)}.",
                param="endpoint",
                code="invalid_value",
            )
        if completion_window not in self.windows:
            supported = ", ".join(f"'{name}'" for name in self.windows)
            raise InvalidRequest(
                f"Invalid value: '{completion_window}'. Supported values are: {supported}.",
                param="completion_window",
                code="invalid_value",
            )
        check_metadata(metadata)
        output_ttl = check_output_expires_after(output_expires_after)
        now = int(self.clock())
        input_file = self.files.get_file(owner, input_file_id, now)
        if input_file is None:
            raise NotFound(f"No such File object: {input_file_id}", param="input_file_id")
        if input_file.purpose != "batch":
            raise InvalidRequest(
                f"File {input_file_id} has purpose '{input_file.purpose}'; a batch input needs purpose 'batch'.",
                param="input_file_id",
                code="invalid_value",
            )
        checked = self.upload_checks.plan_for(input_file.upload_check, endpoint) if self.upload_checks else None
        record = BatchRecord(
            id=new_batch_id(),
            owner=owner,
            endpoint=endpoint,
            input_file_id=input_file_id,
            completion_window=completion_window,
            status=C.VALIDATING if checked is None else C.IN_PROGRESS,
            created_at=now,
            in_progress_at=None if checked is None else now,
            request_total=0 if checked is None else checked.total,
            expires_at=now + self.windows[completion_window],
            metadata=metadata,
            output_expires_after=output_ttl,
            retry_of=retry_of,
            request_id=request_id,
        )
        self.batches.insert_batch(record, checked.plans if checked is not None else ())
        self.on_change(C.CHANGE_CREATED if checked is None else C.CHANGE_STARTED)
        return record

    def get(self, owner: str | None, batch_id: str) -> BatchRecord:
        record = self.batches.get_batch(owner, batch_id)
        if record is None:
            raise NotFound(f"No batch found with id '{batch_id}'.", param="batch_id")
        return _with_progress(self.progress, [record])[0]

    def list(self, owner: str | None, after: str | None, limit: int) -> tuple[list[BatchRecord], bool]:
        if not 1 <= limit <= 100:
            raise InvalidRequest("limit must be between 1 and 100.", param="limit", code="invalid_value")
        page = self.batches.list_batches(owner, after, limit)
        if page is None:
            raise InvalidRequest(f"No batch with id '{after}' to list after.", param="after", code="invalid_value")
        records, has_more = page
        return _with_progress(self.progress, records), has_more


    def cancel(self, owner: str | None, batch_id: str) -> BatchRecord:
        record = self.batches.request_cancel(owner, batch_id, int(self.clock()))
        if record is None:
            raise NotFound(f"No batch found with id '{batch_id}'.", param="batch_id")
        if record.status not in (C.CANCELLING, C.CANCELLED):
            raise Conflict(f"Cannot cancel a batch with status '{record.status}'.")
        self.on_change(C.CHANGE_CANCELLED)
        return record


def check_metadata(metadata: Any) -> None:
    if metadata is None:
        return
    if not isinstance(metadata, dict):
        raise InvalidRequest(
            f"Invalid type for 'metadata': expected an object, but got {_json_type(metadata)} instead.",
            param="metadata",
            code="invalid_type",
        )
    if len(metadata) > C.METADATA_MAX_PAIRS:
        raise InvalidRequest(
            f"Invalid 'metadata': too many properties. Expected at most {C.METADATA_MAX_PAIRS}, "
            f"but got {len(metadata)} instead.",
            param="metadata",
            code="object_above_max_size",
        )
    for key, value in metadata.items():
        if len(key) > C.METADATA_MAX_KEY:
            raise InvalidRequest(
                f"Invalid 'metadata': keys can be at most {C.METADATA_MAX_KEY} characters; '{key[:80]}' is {len(key)}.",
                param=f"metadata.{key[:80]}",
                code="invalid_value",
            )
        if not isinstance(value, str):
            raise InvalidRequest(
                f"Invalid type for 'metadata.{key}': expected a string, but got {_json_type(value)} instead.",
                param=f"metadata.{key}",
                code="invalid_type",
            )
        if len(value) > C.METADATA_MAX_VALUE:
            raise InvalidRequest(
                f"Invalid 'metadata.{key}': string too long. Expected a string with maximum length "
                f"{C.METADATA_MAX_VALUE}, but got a string with length {len(value)} instead.",
                param=f"metadata.{key}",
                code="string_above_max_length",
            )


def check_output_expires_after(value: Any) -> int | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise InvalidRequest("output_expires_after must be an object.", param="output_expires_after",
                             code="invalid_type")
    if value.get("anchor") != "created_at":
        raise InvalidRequest("output_expires_after.anchor must be 'created_at'.",
                             param="output_expires_after.anchor", code="invalid_value")
    seconds = value.get("seconds")
    if not isinstance(seconds, int) or isinstance(seconds, bool) or not (
        C.FILE_EXPIRY_MIN_SECONDS <= seconds <= C.FILE_EXPIRY_MAX_SECONDS
    ):
        raise InvalidRequest(
            f"output_expires_after.seconds must be an integer between {C.FILE_EXPIRY_MIN_SECONDS} "
            f"and {C.FILE_EXPIRY_MAX_SECONDS}.",
            param="output_expires_after.seconds",
            code="invalid_value",
        )
    return seconds


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    if value is None:
        return "null"
    return "a string"


def _with_progress(progress: ProgressReader | None, records: list[BatchRecord]) -> list[BatchRecord]:
    """Throughput and ETA of the in-progress ones, in one read for the whole page."""
    running = [r.id for r in records if r.status == C.IN_PROGRESS and r.in_progress_at is not None]
    if progress is None or not running:
        return records
    now, spans = progress.recent_spans(running, WINDOW_SECONDS)
    out = []
    for record in records:
        if record.id in running:
            remaining = record.request_total - record.request_completed - record.request_failed
            found = estimate(spans.get(record.id, []), now, float(record.in_progress_at or now), remaining)
            record = replace(record, throughput=found.throughput, eta_seconds=found.eta_seconds)
        out.append(record)
    return out
