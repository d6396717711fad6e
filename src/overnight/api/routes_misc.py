"""/health (no key needed) and /v1/models."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from overnight.api.auth import Principal, principal
from overnight.api.errors import error_response
from overnight.api.json import json_response
from overnight.api.schemas import ERRORS, ModelList

router = APIRouter()


@router.get("/health", tags=["health"], summary="200 once the server and its workers are ready")
def health(request: Request) -> Response:
    services = request.app.state.services
    if not services.ready:
        return error_response(503, "Starting up.", error_type="server_error")
    if not services.workers_ready():
        return error_response(503, "Starting up: the worker process is loading.", error_type="server_error")
    return json_response({"status": "ok"})


@router.get("/v1/models", tags=["models"], response_model=ModelList, responses=ERRORS, summary="Served models")
def list_models(request: Request, _caller: Annotated[Principal, Depends(principal)]) -> Response:
    models = request.app.state.services.router.models()
    data = [{"id": name, "object": "model", "created": 0, "owned_by": owner} for name, owner in models.items()]
    return json_response({"object": "list", "data": data})
