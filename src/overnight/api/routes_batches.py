"""/v1/batches: create, retrieve, list, cancel."""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from starlette.responses import Response

from overnight.api.auth import Principal, principal
from overnight.api.errors import request_id_of
from overnight.api.json import json_response
from overnight.api.schemas import ERRORS, Batch, BatchList, CreateBatchRequest
from overnight.api.services import Services
from overnight.api.text import reject_lone_surrogates
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
    log.info("batch %s created", record.id, extra={"batch_id": record.id})
    return json_response(batch_object(record))


@router.get("", response_model=BatchList, summary="List batches, newest first")
def list_batches(
    request: Request, caller: Caller, after: str | None = None, limit: Annotated[int, Query()] = 20
) -> Response:
    records, has_more = _services(request).batches.list(caller.scope, after, limit)
    return json_response(list_object([batch_object(r) for r in records], has_more))


@router.get("/{batch_id}", response_model=Batch, summary="Retrieve a batch")
def retrieve_batch(request: Request, caller: Caller, batch_id: str) -> Response:
    return json_response(batch_object(_services(request).batches.get(caller.scope, batch_id)))


@router.post("/{batch_id}/cancel", response_model=Batch, summary="Cancel a batch")
def cancel_batch(request: Request, caller: Caller, batch_id: str) -> Response:
    return json_response(batch_object(_services(request).batches.cancel(caller.scope, batch_id)))
