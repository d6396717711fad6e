"""/health and /metrics (no key needed) and /v1/models."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from starlette.responses import PlainTextResponse, Response

from overnight.api.auth import Principal, principal
from overnight.api.errors import error_response
from overnight.api.json import json_response
from overnight.api.schemas import ERRORS, ModelList
from overnight.api.services import Services
from overnight.observability.metrics import CONTENT_TYPE, render_metrics

router = APIRouter()


@router.get("/health", tags=["health"], summary="200 once the server and its workers are ready")
def health(request: Request) -> Response:
    services = request.app.state.services
    if not services.ready:
        return error_response(503, "Starting up.", error_type="server_error")
    if not services.workers_ready():
        return error_response(503, "The worker is not ready: it is starting up, or it stopped (see the server's "
                              "log).", error_type="server_error")
    return json_response({"status": "ok"})


@router.get("/metrics", tags=["health"], summary="Prometheus metrics of the API and its worker processes",
            response_class=PlainTextResponse,
            responses={200: {"description": "Prometheus text exposition format 0.0.4",
                             "content": {"text/plain": {"schema": {"type": "string"}}}}})
def metrics(request: Request) -> Response:
    """No key, like /health: scrapers rarely carry one, and nothing here is a user's data (counts,
    latencies, model names). Bind the server to a private address, or filter /metrics at the proxy,
    where model names or volumes must not be seen."""
    services: Services = request.app.state.services
    gauges = services.gauges
    body = render_metrics(
        services.metrics_dir,
        gauges.queued_lines_by_model if gauges is not None else dict,
        gauges.open_batches_by_status if gauges is not None else dict,
    )
    return Response(body, media_type=CONTENT_TYPE)


@router.get("/v1/models", tags=["models"], response_model=ModelList, responses=ERRORS, summary="Served models")
def list_models(request: Request, _caller: Annotated[Principal, Depends(principal)]) -> Response:
    models = request.app.state.services.router.models()
    data = [{"id": name, "object": "model", "created": 0, "owned_by": owner} for name, owner in models.items()]
    return json_response({"object": "list", "data": data})
