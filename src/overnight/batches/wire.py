"""Records as the JSON objects OpenAI's API returns: every key present, null when unset."""

from __future__ import annotations

from typing import Any

from overnight.batches.deadline import deadline_warning
from overnight.store.records import BatchRecord, FileRecord, UploadPartRecord, UploadRecord


def file_object(record: FileRecord) -> dict[str, Any]:
    return {
        "id": record.id,
        "object": "file",
        "bytes": record.bytes,
        "created_at": record.created_at,
        "expires_at": record.expires_at,
        "filename": record.filename,
        "purpose": record.purpose,
        "status": "processed",
        "status_details": None,
    }


def upload_object(record: UploadRecord, status: str, file: FileRecord | None) -> dict[str, Any]:
    """`status` as the caller sees it now (a pending upload past its hour is expired)."""
    return {
        "id": record.id,
        "object": "upload",
        "bytes": record.bytes,
        "created_at": record.created_at,
        "expires_at": record.expires_at,
        "filename": record.filename,
        "purpose": record.purpose,
        "status": status,
        "file": file_object(file) if file is not None else None,
    }


def upload_part_object(record: UploadPartRecord) -> dict[str, Any]:
    return {"id": record.id, "object": "upload.part", "created_at": record.created_at, "upload_id": record.upload_id}


def batch_object(record: BatchRecord, now: float | None = None) -> dict[str, Any]:
    """OpenAI's batch object, plus overnight's extensions (the SDK keeps extra fields): `outcome`
    once finished, `deadline_warning` while running late (`now` given), `retry_of`."""
    has_usage = record.request_completed or record.input_tokens or record.output_tokens
    return {
        "id": record.id,
        "object": "batch",
        "endpoint": record.endpoint,
        "model": record.model,
        "errors": {"object": "list", "data": record.errors} if record.errors else None,
        "input_file_id": record.input_file_id,
        "completion_window": record.completion_window,
        "status": record.status,
        "output_file_id": record.output_file_id,
        "error_file_id": record.error_file_id,
        "created_at": record.created_at,
        "in_progress_at": record.in_progress_at,
        "expires_at": record.expires_at,
        "finalizing_at": record.finalizing_at,
        "completed_at": record.completed_at,
        "failed_at": record.failed_at,
        "expired_at": record.expired_at,
        "cancelling_at": record.cancelling_at,
        "cancelled_at": record.cancelled_at,
        "request_counts": {
            "total": record.request_total,
            "completed": record.request_completed,
            "failed": record.request_failed,
        },
        "usage": {
            "input_tokens": record.input_tokens,
            "input_tokens_details": {"cached_tokens": record.cached_tokens},
            "output_tokens": record.output_tokens,
            "output_tokens_details": {"reasoning_tokens": record.reasoning_tokens},
            "total_tokens": record.input_tokens + record.output_tokens,
        }
        if has_usage
        else None,
        "metadata": record.metadata,
        "outcome": record.outcome,
        "deadline_warning": deadline_warning(record, now) if now is not None else None,
        "retry_of": record.retry_of,
        # Extensions (the SDK keeps unknown fields): lines/s over the last minute and the seconds
        # left at that rate, for in-progress batches; null otherwise (batches/progress.py).
        "throughput": record.throughput,
        "eta_seconds": record.eta_seconds,
    }


def list_object(data: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": has_more,
    }
