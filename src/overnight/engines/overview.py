"""The engines and routes as an operator sees them (the dashboard's server page): what each route
matches, which engine serves it, and each upstream's concurrency limiter.

A limiter lives in the process that runs lines. `overnight serve` runs its worker in a child
process by default, so the API's copy shows the configured bounds with nothing in flight; with
`--workers 0` (the worker in the API's process) it shows the live window and requests in flight."""

from __future__ import annotations

from typing import Any

from overnight.engines.limiter import AdaptiveLimiter
from overnight.engines.port import Engine
from overnight.engines.router import Router


def engine_name(engine: Engine) -> str:
    return str(getattr(engine, "name", type(engine).__name__))


def limiter_state(limiter: AdaptiveLimiter) -> dict[str, Any]:
    return {
        "minimum": limiter.minimum,
        "maximum": limiter.maximum,
        "limit": int(limiter.limit),
        "ceiling": limiter.ceiling,
        "in_flight": limiter.in_flight,
        "peak_in_flight": limiter.peak_in_flight,
    }


def engines_overview(router: Router) -> list[dict[str, Any]]:
    out = []
    for engine in router.engines():
        limiter = getattr(engine, "limiter", None)
        out.append({
            "name": engine_name(engine),
            "kind": type(engine).__name__,
            "owned_by": engine.owned_by,
            "models": list(engine.served_models()),
            "concurrency": limiter_state(limiter) if isinstance(limiter, AdaptiveLimiter) else None,
        })
    return out


def routes_overview(router: Router) -> list[dict[str, Any]]:
    routes = [
        {"pattern": r.pattern, "engine": engine_name(r.engine),
         "endpoints": sorted(r.endpoints) if r.endpoints is not None else None}
        for r in router.routes
    ]
    defaults = [{"pattern": "(default)", "engine": engine_name(e), "endpoints": [endpoint]}
                for endpoint, e in sorted(router.defaults.items())]
    return routes + defaults
