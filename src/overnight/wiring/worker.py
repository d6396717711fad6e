"""A worker's parts: engines behind the router, and the worker that claims and runs work."""

from __future__ import annotations

from overnight.engines.router import Router
from overnight.wiring.core import Core
from overnight.worker.worker import Worker


def build_worker(core: Core, router: Router) -> Worker:
    queue = core.store.queue
    return Worker(queue, queue, core.store.housekeeping, core.files, router, core.settings.worker,
                  core.settings.limits)
