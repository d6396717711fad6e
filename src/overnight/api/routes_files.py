"""/v1/files: upload (streamed), list, retrieve, content (streamed), delete."""

from __future__ import annotations

import asyncio
import unicodedata
from typing import Annotated, Literal
from urllib.parse import quote

from fastapi import APIRouter, Depends, Query, Request
from python_multipart.exceptions import FormParserError
from starlette.responses import Response, StreamingResponse

from overnight.api.auth import Principal, principal, principal_or_ticket
from overnight.api.json import json_response
from overnight.api.routes_admin import with_owner
from overnight.api.schemas import ERRORS, DownloadLink, FileDeleted, FileList, FileObject
from overnight.api.services import Services
from overnight.api.upload import receive_upload
from overnight.batches.errors import InvalidRequest
from overnight.batches.wire import file_object, list_object

router = APIRouter(prefix="/v1/files", tags=["files"], responses=ERRORS)
Caller = Annotated[Principal, Depends(principal)]
CallerOrTicket = Annotated[Principal, Depends(principal_or_ticket)]

_UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file", "purpose"],
                    "properties": {
                        "file": {"type": "string", "format": "binary"},
                        "purpose": {
                            "type": "string",
                            "enum": ["assistants", "batch", "fine-tune", "vision", "user_data", "evals"],
                        },
                        "expires_after[anchor]": {"type": "string", "enum": ["created_at"]},
                        "expires_after[seconds]": {"type": "integer", "minimum": 3600, "maximum": 2592000},
                    },
                }
            }
        },
    }
}


def _services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


@router.post("", response_model=FileObject, openapi_extra=_UPLOAD_BODY, summary="Upload a file")
async def create_file(request: Request, caller: Caller) -> Response:
    services = _services(request)
    file_id = services.files.new_upload_id()
    key = services.files.storage_key(file_id)
    # Every upload is fed to the validator: `purpose` may come after the file in the form. One that
    # is not a batch input stops it at its first line; only a batch file's record keeps the result.
    validator = services.files.upload_validator()
    try:
        upload = await receive_upload(request, services.files.files, key, services.limits.max_file_bytes,
                                      inspect=validator.feed if validator is not None else None)
    except FormParserError:
        raise InvalidRequest("The multipart/form-data body is malformed.", param="file") from None
    try:
        purpose = upload.fields.get("purpose")
        if purpose is None:
            raise InvalidRequest("Missing required parameter: 'purpose'.", param="purpose",
                                 code="missing_required_parameter")
        expires_after = _expires_after(upload.fields)
    except InvalidRequest:
        # Its bytes are stored, and refused, no row will name them (left, the orphan sweep would
        # take them after an hour, and only while a worker runs).
        await asyncio.to_thread(services.files.files.delete, key)
        raise
    record = await asyncio.to_thread(  # refused by its checks, the bytes are deleted there
        services.files.register_upload,
        caller.owner,
        file_id,
        upload.filename or "upload",
        purpose,
        upload.size,
        upload.head,
        expires_after,
        validator.result() if validator is not None else None,
    )
    return json_response(with_owner(file_object(record), record.owner, caller))


def _expires_after(fields: dict[str, str]) -> tuple[str, int] | None:
    anchor = fields.get("expires_after[anchor]")
    seconds = fields.get("expires_after[seconds]")
    if anchor is None and seconds is None:
        return None
    try:
        return anchor or "", int(seconds or "")
    except ValueError:
        raise InvalidRequest(
            "expires_after[seconds] must be an integer number of seconds.",
            param="expires_after.seconds",
            code="invalid_type",
        ) from None


@router.get("", response_model=FileList, summary="List files")
def list_files(
    request: Request,
    caller: Caller,
    purpose: str | None = None,
    after: str | None = None,
    limit: Annotated[int, Query()] = 10_000,
    order: Literal["asc", "desc"] = "desc",
) -> Response:
    records, has_more = _services(request).files.list(caller.scope, purpose, after, limit, order)
    return json_response(list_object([with_owner(file_object(r), r.owner, caller) for r in records], has_more))


@router.get("/{file_id}", response_model=FileObject, summary="Retrieve a file")
def retrieve_file(request: Request, caller: Caller, file_id: str) -> Response:
    record = _services(request).files.get(caller.scope, file_id)
    return json_response(with_owner(file_object(record), record.owner, caller))


@router.delete("/{file_id}", response_model=FileDeleted, summary="Delete a file")
def delete_file(request: Request, caller: Caller, file_id: str) -> Response:
    # `owner`, not `scope`: an admin reads every tenant's files but deletes only its own.
    _services(request).files.delete(caller.owner, file_id)
    return json_response({"id": file_id, "object": "file", "deleted": True})


@router.get(
    "/{file_id}/content",
    summary="Download a file's bytes (streamed)",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}},
)
def file_content(request: Request, caller: CallerOrTicket, file_id: str) -> Response:
    record, chunks = _services(request).files.content(caller.scope, file_id)
    return StreamingResponse(
        chunks,  # a sync iterator: Starlette reads each chunk in a worker thread
        media_type="application/octet-stream",
        headers={
            "content-length": str(record.bytes),
            "content-disposition": content_disposition(record.filename),
        },
    )


@router.post(
    "/{file_id}/download_link",
    response_model=DownloadLink,
    summary="A link that downloads the file's content for a minute without the API key (overnight)",
)
def download_link(request: Request, caller: Caller, file_id: str) -> Response:
    """For browsers: a plain link streams a download to disk, a fetch() with the key must buffer it."""
    services = _services(request)
    services.files.get(caller.scope, file_id)  # 404 unless the caller may read it
    ticket, expires_at = services.auth.download_ticket(caller, file_id, int(services.files.clock()))
    url = f"/v1/files/{quote(file_id, safe='')}/content?ticket={ticket}"
    return json_response({"object": "file.download_link", "file_id": file_id, "url": url, "expires_at": expires_at})


def content_disposition(filename: str) -> str:
    """RFC 6266: an ASCII `filename` for old clients, and the exact name as UTF-8 in `filename*`
    (RFC 5987). Header values must be Latin-1, so a raw non-ASCII name cannot go in as it is."""
    fallback: list[str] = []
    for ch in unicodedata.normalize("NFKD", filename):
        if unicodedata.combining(ch) or ord(ch) < 0x20 or ord(ch) == 0x7F:
            continue  # accents fall off their letters ("é" -> "e"); control characters go
        if ch in '"\\':
            fallback.append("\\" + ch)  # a quoted-pair inside the quoted-string
        else:
            fallback.append(ch if ord(ch) < 0x80 else "_")
    encoded = quote(filename, safe="!#$&+^`|~")  # RFC 5987 attr-chars stay as they are
    return f"attachment; filename=\"{''.join(fallback) or 'download'}\"; filename*=UTF-8''{encoded}"
