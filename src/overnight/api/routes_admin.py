"""Admin-only routes (extensions; OpenAI has no such objects): what the dashboard's server page
shows. Also `with_owner`, the one extra field admin callers get on batches and files."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from overnight.api.auth import Principal, principal
from overnight.api.json import json_response
from overnight.api.schemas import ERRORS, ErrorResponse, ServerOverview
from overnight.api.services import Services
from overnight.batches.errors import OvernightError
from overnight.engines.overview import engines_overview, routes_overview

router = APIRouter(prefix="/v1/admin", tags=["admin"])
Caller = Annotated[Principal, Depends(principal)]


class PermissionDenied(OvernightError):
    status_code = 403


def with_owner(obj: dict[str, Any], owner: str, caller: Principal) -> dict[str, Any]:
    """An admin sees every tenant's objects, so it is told whose each one is. Tenants are not:
    their own objects need no owner, and the object stays exactly OpenAI's."""
    if caller.is_admin:
        obj["owner"] = owner
    return obj


def _require_admin(caller: Principal) -> None:
    if not caller.is_admin:
        raise PermissionDenied("You have insufficient permissions for this operation: it needs an admin key "
                               "(--admin-key).", code="insufficient_permissions")


@router.get(
    "/server",
    response_model=ServerOverview,
    responses={**ERRORS, 403: {"model": ErrorResponse, "description": "Called with a tenant's (not an admin) key"}},
    summary="Engines, routes, concurrency limiters, queue depth per model and workers (admin keys only)",
)
def server_overview(request: Request, caller: Caller) -> Response:
    _require_admin(caller)
    services: Services = request.app.state.services
    router_ = services.router
    return json_response({
        "object": "server",
        "owner": caller.owner,
        "engines": engines_overview(router_),
        "routes": routes_overview(router_),
        "queue": [{"model": q.model, "batches": q.batches, "waiting_requests": q.waiting_requests}
                  for q in services.overview.queue_by_model()],
        "workers": [{"id": w.id, "started_at": w.started_at, "last_seen": w.last_seen,
                     "seen_seconds_ago": w.seen_seconds_ago} for w in services.overview.workers()],
    })
