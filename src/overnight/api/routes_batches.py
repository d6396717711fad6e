"""/v1/batches: create, retrieve, list, cancel; and overnight's extensions: results while running
(`/output`, `/errors`), `/retry` and the `/joined` results of a batch and its retries."""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from starlette.responses import Response, StreamingResponse

from overnight import constants as C
from overnight.api.auth import Principal, principal
from overnight.api.errors import request_id_of
from overnight.api.json import json_response
from overnight.api.routes_admin import with_owner
from overnight.api.schemas import ERRORS, Batch, BatchList, CreateBatchRequest, RetryBatchRequest
from overnight.api.services import Services
from overnight.api.text import reject_lone_surrogates
from overnight.batches.live_results import ERROR, OUTPUT
from overnight.batches.wire import batch_object, list_object

log = logging.getLogger("overnight.api")
router = APIRouter(prefix="/v1/batches", tags=["batches"], responses=ERRORS)
Caller = Annotated[Principal, Depends(principal)]


def _services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


@router.post("", response_model=Batch, summary="Create a batch")
def create_batch(request: Request, caller: Caller, body: CreateBatchRequest) -> Response:
    reject_lone_surrogates(body.model_dump())
    record = _services(request).batches.create(
        caller.owner,
        body.input_file_id,
        body.endpoint,
        body.completion_window,
        body.metadata,
        body.output_expires_after,
        request_id=request_id_of(request),
    )
    started = " (its input was validated on upload)" if record.status == C.IN_PROGRESS else ""
    log.info("batch %s created: %s%s", record.id, record.status, started, extra={"batch_id": record.id})
    return json_response(with_owner(batch_object(record), record.owner, caller))


@router.get("", response_model=BatchList, summary="List batches, newest first")
def list_batches(
    request: Request, caller: Caller, after: str | None = None, limit: Annotated[int, Query()] = 20
) -> Response:
    services = _services(request)
    records, has_more = services.batches.list(caller.scope, after, limit)
    now = services.batches.clock()
    return json_response(list_object([with_owner(batch_object(r, now), r.owner, caller) for r in records], has_more))


@router.get("/{batch_id}", response_model=Batch, summary="Retrieve a batch")
def retrieve_batch(request: Request, caller: Caller, batch_id: str) -> Response:
    services = _services(request)
    record = services.batches.get(caller.scope, batch_id)
    return json_response(with_owner(batch_object(record, services.batches.clock()), record.owner, caller))


@router.post("/{batch_id}/cancel", response_model=Batch, summary="Cancel a batch")
def cancel_batch(request: Request, caller: Caller, batch_id: str) -> Response:
    record = _services(request).batches.cancel(caller.scope, batch_id)
    return json_response(with_owner(batch_object(record), record.owner, caller))


_JSONL: dict[int | str, dict[str, Any]] = {200: {"content": {"application/jsonl": {"schema": {"type": "string", "format": "binary"}}}}}
_LIVE_HEADERS = (
    "`x-overnight-complete-through`: input lines [0, N) are covered (their results are in this "
    "response or an earlier one); `x-overnight-next-cursor`: pass it as `after` to resume; "
    "`x-overnight-finished`: true once the batch has finished (nothing more will come)."
)


def _live_section(request: Request, caller: Principal, batch_id: str, kind: str, after: int) -> Response:
    section = _services(request).live_results.section(caller.scope, batch_id, kind, after)
    return StreamingResponse(
        section.chunks,  # a sync iterator: Starlette reads each chunk in a worker thread
        media_type="application/jsonl",
        headers={
            "x-overnight-complete-through": str(section.complete_through),
            "x-overnight-next-cursor": str(section.complete_through),
            "x-overnight-finished": "true" if section.finished else "false",
        },
    )


@router.get("/{batch_id}/output", response_class=StreamingResponse, responses=_JSONL,
            summary="overnight: the output lines committed so far, in input order (streamed)",
            description="Output-file lines of input lines `after` onwards, as far as they are committed. "
            + _LIVE_HEADERS)
def batch_output(request: Request, caller: Caller, batch_id: str, after: Annotated[int, Query()] = 0) -> Response:
    return _live_section(request, caller, batch_id, OUTPUT, after)


@router.get("/{batch_id}/errors", response_class=StreamingResponse, responses=_JSONL,
            summary="overnight: the error lines committed so far, in input order (streamed)",
            description="Error-file lines of input lines `after` onwards, as far as they are committed. "
            + _LIVE_HEADERS)
def batch_errors(request: Request, caller: Caller, batch_id: str, after: Annotated[int, Query()] = 0) -> Response:
    return _live_section(request, caller, batch_id, ERROR, after)


@router.post("/{batch_id}/retry", response_model=Batch,
             summary="overnight: a new batch of a finished batch's failed lines",
             description="Re-runs the error lines of the kinds in `include` (default: failed) without "
             "re-uploading; the new batch has metadata `overnight_retry_of`. 409 while the batch runs.")
def retry_batch(request: Request, caller: Caller, batch_id: str, body: RetryBatchRequest | None = None) -> Response:
    services = _services(request)
    include: list[str] = list(body.include) if body is not None else ["failed"]
    record = services.retries.retry(caller.owner, batch_id, include)  # an admin's own batches only
    return json_response(with_owner(batch_object(record, services.batches.clock()), record.owner, caller))


@router.get("/{batch_id}/joined", response_class=StreamingResponse, responses=_JSONL,
            summary="overnight: for each custom_id, the latest attempt's result across a batch and its retries",
            description="`x-overnight-attempts`: how many finished batches (the batch and its retries) are joined.")
def joined_results(request: Request, caller: Caller, batch_id: str) -> Response:
    attempts, chunks = _services(request).retries.joined(caller.scope, batch_id)
    return StreamingResponse(chunks, media_type="application/jsonl",
                             headers={"x-overnight-attempts": str(attempts)})
