"""/v1/uploads: a file sent in parts (create, add parts, complete into a File, cancel)."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from python_multipart.exceptions import FormParserError
from starlette.responses import Response

from overnight import constants as C
from overnight.api.auth import Principal, principal
from overnight.api.json import json_response
from overnight.api.schemas import ERRORS, CompleteUploadRequest, CreateUploadRequest, Upload, UploadPart
from overnight.api.services import Services
from overnight.api.text import reject_lone_surrogates
from overnight.api.upload import receive_upload
from overnight.batches.errors import InvalidRequest
from overnight.batches.wire import upload_object, upload_part_object

router = APIRouter(prefix="/v1/uploads", tags=["uploads"], responses=ERRORS)
# Uploads are changed only by their owner: an admin key reads other tenants' files, not their uploads.
Caller = Annotated[Principal, Depends(principal)]

_PART_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["data"],
                    "properties": {"data": {"type": "string", "format": "binary"}},
                }
            }
        },
    }
}


def _services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


@router.post("", response_model=Upload, summary="Create an upload")
def create_upload(request: Request, caller: Caller, body: CreateUploadRequest) -> Response:
    reject_lone_surrogates(body.model_dump())
    uploads = _services(request).uploads
    expires_after = (body.expires_after.anchor, body.expires_after.seconds) if body.expires_after else None
    record = uploads.create(caller.owner, body.filename, body.purpose, body.bytes, body.mime_type, expires_after)
    return json_response(upload_object(record, record.status, None))


@router.post("/{upload_id}/parts", response_model=UploadPart, openapi_extra=_PART_BODY, summary="Add a part")
async def add_upload_part(request: Request, caller: Caller, upload_id: str) -> Response:
    services = _services(request)
    uploads = services.uploads
    part_id, key, room = await asyncio.to_thread(uploads.new_part, caller.owner, upload_id)
    if room < C.UPLOAD_PART_MAX_BYTES:
        too_large = (f"This part would take upload {upload_id} past {services.limits.max_file_bytes:,} bytes, "
                     "the most a file on this server can have.")
    else:
        too_large = f"A part can be at most {C.UPLOAD_PART_MAX_BYTES:,} bytes (64 MB). Send smaller parts."
    try:
        received = await receive_upload(request, uploads.files, key, room, file_field="data", too_large=too_large)
    except FormParserError:
        raise InvalidRequest("The multipart/form-data body is malformed.", param="data") from None
    part = await asyncio.to_thread(uploads.add_part, caller.owner, upload_id, part_id, key, received.size)
    return json_response(upload_part_object(part))


@router.post("/{upload_id}/complete", response_model=Upload, summary="Complete an upload into a File")
def complete_upload(request: Request, caller: Caller, upload_id: str, body: CompleteUploadRequest) -> Response:
    record, file = _services(request).uploads.complete(caller.owner, upload_id, body.part_ids, body.md5)
    return json_response(upload_object(record, record.status, file))


@router.post("/{upload_id}/cancel", response_model=Upload, summary="Cancel an upload")
def cancel_upload(request: Request, caller: Caller, upload_id: str) -> Response:
    record = _services(request).uploads.cancel(caller.owner, upload_id)
    return json_response(upload_object(record, record.status, None))
