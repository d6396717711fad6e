"""A worker's parts: engines behind the router, and the worker that claims and runs work."""

from __future__ import annotations

from overnight.engines.router import Router
from overnight.observability.metrics import WorkerMetrics
from overnight.store.notify import BatchChangeListener
from overnight.wiring.core import Core
from overnight.worker.worker import Worker


def build_worker(core: Core, router: Router) -> Worker:
    queue = core.store.queue
    worker = Worker(queue, queue, core.store.housekeeping, core.files, router, core.settings.worker,
                    core.settings.limits, membership=core.store.membership, metrics=WorkerMetrics())
    if not core.store.db.is_sqlite:  # other machines' API replicas wake it with NOTIFY
        worker.wake_sources.append(BatchChangeListener(core.store.db.url, worker.wake))
    return worker
