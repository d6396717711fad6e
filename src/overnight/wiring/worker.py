"""A worker's parts: engines behind the router, the webhook sender, and the worker that claims and
runs work."""

from __future__ import annotations

from overnight.api.auth import hash_key, owner_of
from overnight.batches.webhooks import RetryPolicy, WebhookEndpoint, WebhookRoutes, WebhookSender, signing_key
from overnight.engines.router import Router
from overnight.observability.metrics import WorkerMetrics
from overnight.settings import BATCH_WEBHOOK_EVENTS, Settings
from overnight.store.notify import BatchChangeListener
from overnight.wiring.core import ConfigurationError, Core
from overnight.worker.worker import Worker


def build_worker(core: Core, router: Router) -> Worker:
    queue = core.store.queue
    delivery = core.settings.webhook_delivery
    routes = webhook_routes(core.settings)
    sender = None
    if routes:
        policy = RetryPolicy(delivery.retry_delays, delivery.jitter)
        sender = WebhookSender(core.store.webhooks, routes, policy, delivery.timeout_seconds)
    worker = Worker(queue, queue, core.store.housekeeping, core.files, router, core.settings.worker,
                    core.settings.limits, membership=core.store.membership, webhooks=sender,
                    webhook_slots=delivery.max_in_flight, webhook_poll_seconds=delivery.poll_seconds,
                    metrics=WorkerMetrics())
    if not core.store.db.is_sqlite:  # other machines' API replicas wake it with NOTIFY
        worker.wake_sources.append(BatchChangeListener(core.store.db.url, worker.wake))
    return worker


def webhook_routes(settings: Settings) -> WebhookRoutes:
    """The `[[webhooks]]` of the config file, checked: ConfigurationError says what is wrong."""
    endpoints = []
    for n, item in enumerate(settings.webhooks, 1):
        where = f"[[webhooks]] #{n}"
        if (item.api_key is None) == (item.owner is None):
            raise ConfigurationError(f"{where}: give exactly one of api_key (the owner's key) or owner (key_...)")
        if not item.url.startswith(("http://", "https://")):
            raise ConfigurationError(f"{where}: url must start with http:// or https://")
        unknown = set(item.events) - set(BATCH_WEBHOOK_EVENTS)
        if unknown:
            raise ConfigurationError(f"{where}: unknown events {sorted(unknown)} (known: {', '.join(BATCH_WEBHOOK_EVENTS)})")
        try:
            key = signing_key(item.secret)
        except ValueError as exc:
            raise ConfigurationError(f"{where}: {exc}") from None
        if not key:
            raise ConfigurationError(f"{where}: the secret is empty")
        owner = owner_of(hash_key(item.api_key)) if item.api_key is not None else str(item.owner)
        endpoints.append(WebhookEndpoint(owner, item.url, key, frozenset(item.events)))
    return WebhookRoutes(endpoints)
