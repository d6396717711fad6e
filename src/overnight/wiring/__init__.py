"""The one place adapters are chosen: settings in, wired parts out, built per process so each builds
only what it uses (a worker builds no authenticator or rate limiter; `overnight cleanup` neither
engines nor a worker). The CLI calls this; so do tests and benchmarks that need a whole server.

    core    the metadata store and the file store (every process)
    engines the router and its engines (processes that run lines; the API only lists models)
    api     the authenticator, rate limits and services
    worker  the worker
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from overnight.api.services import Services
from overnight.engines.router import Router
from overnight.settings import Settings
from overnight.wiring.api import build_api
from overnight.wiring.core import ConfigurationError, Core, build_core
from overnight.wiring.engines import build_router
from overnight.wiring.worker import build_worker
from overnight.worker.worker import Worker

__all__ = ["Components", "ConfigurationError", "Core", "build", "build_api", "build_core", "build_router",
           "build_worker"]


@dataclass(slots=True)
class Components:
    """A whole server in one process: the API and an in-process worker over one core."""

    core: Core
    router: Router
    worker: Worker
    services: Services

    async def start_engines(self) -> None:
        for engine in self.router.engines():
            await engine.start()

    async def close(self) -> None:
        for engine in self.router.engines():
            await engine.close()
        self.core.close()


def build(settings: Settings, announce: Callable[[str], None] | None = print) -> Components:
    """Wire everything. `announce` shows a newly created API key; None creates none."""
    core = build_core(settings)
    router = build_router(settings)
    worker = build_worker(core, router)
    return Components(core, router, worker, build_api(core, router, announce, on_change=worker.wake))
