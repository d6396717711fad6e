"""The app factory: routes, error handlers, request ids; lifecycle of the engines and worker."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any

from fastapi import FastAPI

from overnight import __version__
from overnight.api import (
    routes_admin,
    routes_batches,
    routes_files,
    routes_misc,
    routes_online,
    routes_ui,
    routes_uploads,
)
from overnight.api.body_timeout import BodyIdleTimeoutMiddleware
from overnight.api.errors import BodySizeLimitMiddleware, RequestIdMiddleware, install_error_handlers
from overnight.api.request_metrics import RequestMetricsMiddleware
from overnight.api.services import Services
from overnight.runtime import freeze_startup_objects
from overnight.settings import HttpSettings

log = logging.getLogger("overnight")


def _report_stopped(task: asyncio.Task[None], stop: asyncio.Event) -> None:
    if stop.is_set() or task.cancelled():
        return
    error = task.exception()
    log.error("the worker stopped%s; /health answers 503 until the server is restarted",
              f": {error!r}" if error is not None else "", exc_info=error)


def create_app(
    services: Services,
    on_startup: Callable[[], Awaitable[None]] | None = None,
    background: Callable[[asyncio.Event], Coroutine[Any, Any, None]] | None = None,
    on_shutdown: Callable[[], Awaitable[None]] | None = None,
    body_idle_timeout: float = HttpSettings().body_idle_timeout_seconds,
) -> FastAPI:
    """`background(stop)` runs for the app's lifetime (the in-process worker)."""

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        stop = asyncio.Event()
        if on_startup is not None:
            await on_startup()
        freeze_startup_objects()
        task = asyncio.create_task(background(stop)) if background is not None else None
        if task is not None:
            # The in-process worker (or the worker processes' supervisor): one that ended (an error
            # before its loops ran, say a database it could not join) is reported, in the log and
            # by /health, not left silent. Besides the worker processes' own readiness, not instead.
            task.add_done_callback(lambda ended: _report_stopped(ended, stop))
            processes_ready = services.workers_ready
            services.workers_ready = lambda: processes_ready() and not task.done()
        services.ready = True
        try:
            yield
        finally:
            services.ready = False
            stop.set()
            if task is not None:
                await task
            if on_shutdown is not None:
                await on_shutdown()

    app = FastAPI(
        title="overnight",
        version=__version__,
        description="A self-hosted, OpenAI-compatible Batch API.",
        lifespan=lifespan,
    )
    app.state.services = services
    install_error_handlers(app)
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=services.limits.max_json_body_bytes)
    app.add_middleware(BodyIdleTimeoutMiddleware, idle_seconds=body_idle_timeout)
    app.add_middleware(RequestMetricsMiddleware, metrics=services.metrics)
    app.add_middleware(RequestIdMiddleware)  # outermost: every response, 413s included, gets an id
    app.include_router(routes_files.router)
    app.include_router(routes_uploads.router)
    app.include_router(routes_batches.router)
    app.include_router(routes_misc.router)
    app.include_router(routes_admin.router)
    app.include_router(routes_online.router)
    routes_ui.mount_dashboard(app)
    return app
