"""Batch webhooks, as OpenAI sends them: `batch.completed`, `batch.failed`, `batch.expired` and
`batch.cancelled`, a thin payload (`{"id": "evt_...", "object": "event", "created_at", "type",
"data": {"id": "batch_..."}}`), signed per Standard Webhooks so that the official SDK's
`client.webhooks.unwrap(body, headers, secret=...)` verifies them unchanged.

Delivery is at least once and unordered: the events are stored with the terminal state that
causes them (`events_for`, passed to the store's phase-ending writes), then a worker's sender
claims due ones, POSTs them, and on anything but a 2xx retries after the next delay of the
`RetryPolicy`, until it gives up. A receiver should deduplicate on `webhook-id`."""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import hmac
import http.client
import logging
import random
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import orjson

from overnight import constants as C
from overnight.batches.ports import WebhookOutbox
from overnight.ids import new_event_id, new_lease_token
from overnight.store.records import ClaimedDelivery, WebhookEvent

log = logging.getLogger("overnight.webhooks")

EVENT_FOR_STATUS: Mapping[str, str] = {
    C.COMPLETED: "batch.completed",
    C.FAILED: "batch.failed",
    C.EXPIRED: "batch.expired",
    C.CANCELLED: "batch.cancelled",
}
SECRET_PREFIX = "whsec_"
USER_AGENT = "overnight-webhooks/1.0"
# How long delivered and given-up deliveries stay in the store (to see what was sent).
SETTLED_RETENTION_SECONDS = 7 * 24 * 3600
# A receiver's answer is read this far and no further: only its status matters.
_MAX_RESPONSE_BYTES = 64 * 1024

# url, body, headers, timeout -> the HTTP status (raises OSError when there is no answer)
Transport = Callable[[str, bytes, Mapping[str, str], float], int]


@dataclass(frozen=True, slots=True)
class WebhookEndpoint:
    """Where one owner's events go, and the key they are signed with."""

    owner: str
    url: str
    key: bytes = field(repr=False)
    events: frozenset[str] = frozenset(EVENT_FOR_STATUS.values())

    @property
    def id(self) -> str:
        """Stable across restarts and processes: deliveries name their endpoint by it."""
        return "we_" + hashlib.sha256(f"{self.owner}\n{self.url}".encode()).hexdigest()[:24]


def signing_key(secret: str) -> bytes:
    """The HMAC key of a secret, read the way the OpenAI SDK reads it: `whsec_<base64>` is the
    decoded bytes, anything else the UTF-8 text itself. ValueError for bad base64."""
    if not secret.startswith(SECRET_PREFIX):
        return secret.encode()
    try:
        return base64.b64decode(secret[len(SECRET_PREFIX):], validate=True)
    except binascii.Error:
        raise ValueError("a webhook secret 'whsec_...' must be base64 after 'whsec_'") from None


def sign(key: bytes, event_id: str, timestamp: int, body: str) -> str:
    """`v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">` (Standard Webhooks)."""
    digest = hmac.new(key, f"{event_id}.{timestamp}.{body}".encode(), hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


class WebhookRoutes:
    """The configured endpoints, by owner: which events a terminal state causes."""

    def __init__(self, endpoints: Sequence[WebhookEndpoint]) -> None:
        self._by_id = {endpoint.id: endpoint for endpoint in endpoints}
        self._by_owner: dict[str, list[WebhookEndpoint]] = {}
        for endpoint in self._by_id.values():
            self._by_owner.setdefault(endpoint.owner, []).append(endpoint)

    def __bool__(self) -> bool:
        return bool(self._by_id)

    def endpoint(self, endpoint_id: str) -> WebhookEndpoint | None:
        return self._by_id.get(endpoint_id)

    def _receivers(self, owner: str, event_type: str | None) -> list[WebhookEndpoint]:
        return [e for e in self._by_owner.get(owner, ()) if event_type in e.events] if event_type else []

    def receivers(self, owner: str, status: str | None) -> int:
        """How many events `events_for` makes for this owner and terminal state."""
        return len(self._receivers(owner, EVENT_FOR_STATUS.get(status) if status else None))

    def events_for(self, owner: str, batch_id: str, status: str, now: int) -> list[WebhookEvent]:
        """One event (one id, one body) for each of the owner's endpoints that wants it."""
        event_type = EVENT_FOR_STATUS.get(status)
        endpoints = self._receivers(owner, event_type)
        if event_type is None or not endpoints:
            return []
        event_id = new_event_id()
        payload = orjson.dumps({
            "id": event_id, "object": "event", "created_at": now, "type": event_type, "data": {"id": batch_id},
        }).decode()
        return [
            WebhookEvent(event_id, event_type, owner, batch_id, endpoint.id, endpoint.url, payload, now)
            for endpoint in endpoints
        ]


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """After the n-th failed attempt wait `delays[n-1]` (+/- `jitter`, so receivers that come back
    are not hit by every sender at once); after the last delay's attempt, give up."""

    delays: tuple[float, ...]
    jitter: float = 0.2

    def next_delay(self, attempts_made: int, rng: random.Random) -> float | None:
        if attempts_made > len(self.delays):
            return None
        base = self.delays[attempts_made - 1]
        return max(0.0, base * rng.uniform(1 - self.jitter, 1 + self.jitter))


class WebhookSender:
    """Claims due deliveries and sends them. `deliver` blocks (the worker runs it in a thread)."""

    def __init__(
        self,
        outbox: WebhookOutbox,
        routes: WebhookRoutes,
        policy: RetryPolicy,
        timeout_seconds: float,
        transport: Transport | None = None,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self.outbox = outbox
        self.routes = routes
        self.policy = policy
        self.timeout_seconds = timeout_seconds
        self.transport = transport or post_json
        self.clock = clock
        self.rng = rng or random.Random()

    @property
    def lease_seconds(self) -> float:
        """Long enough for one attempt; a sender that died holding a delivery frees it after this."""
        return self.timeout_seconds + 5.0

    def claim(self, limit: int) -> list[ClaimedDelivery]:
        return self.outbox.claim_deliveries(limit, self.lease_seconds, new_lease_token())

    def prune(self) -> int:
        """Forget deliveries settled more than SETTLED_RETENTION_SECONDS ago (the janitor's job)."""
        return self.outbox.prune_settled(int(self.clock()) - SETTLED_RETENTION_SECONDS)

    def deliver(self, delivery: ClaimedDelivery) -> bool:
        """One attempt; True when the receiver acknowledged it (any 2xx)."""
        endpoint = self.routes.endpoint(delivery.endpoint_id)
        if endpoint is None:
            log.error("webhook %s to %s given up: its endpoint is no longer configured",
                      delivery.event_id, delivery.url)
            self.outbox.give_up(delivery.id, delivery.lease_token, "endpoint no longer configured")
            return False
        timestamp = int(self.clock())
        headers = {
            "content-type": "application/json",
            "user-agent": USER_AGENT,
            "webhook-id": delivery.event_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(endpoint.key, delivery.event_id, timestamp, delivery.payload),
        }
        try:
            status = self.transport(delivery.url, delivery.payload.encode(), headers, self.timeout_seconds)
        except (OSError, http.client.HTTPException) as exc:
            error = f"{type(exc).__name__}: {exc}"[:500]
        else:
            if 200 <= status < 300:
                self.outbox.mark_delivered(delivery.id, delivery.lease_token)
                return True
            error = f"HTTP {status}"
        delay = self.policy.next_delay(delivery.attempts, self.rng)
        if delay is None:
            log.error("webhook %s to %s given up after %d attempts: %s",
                      delivery.event_id, delivery.url, delivery.attempts, error)
            self.outbox.give_up(delivery.id, delivery.lease_token, error)
        else:
            log.warning("webhook %s to %s failed (attempt %d: %s); retrying in %.1f s",
                        delivery.event_id, delivery.url, delivery.attempts, error, delay)
            self.outbox.retry_later(delivery.id, delivery.lease_token, delay, error)
        return False


def post_json(url: str, body: bytes, headers: Mapping[str, str], timeout: float) -> int:
    """POST with the standard library: deliveries are few, and a thread per attempt is cheap.
    Redirects are not followed: a webhook answered with one was not acknowledged. The whole
    attempt ends within `timeout` (a socket timeout bounds each read only: a receiver that drips
    its answer would hold a sender slot for ever, past the delivery's lease)."""
    parts = urlsplit(url)
    connection_type = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    connection = connection_type(parts.hostname or "", parts.port, timeout=timeout)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    expired = threading.Event()

    def cut_off() -> None:  # a blocked read returns at once once the socket is shut down
        expired.set()
        if connection.sock is not None:
            with contextlib.suppress(OSError):
                connection.sock.shutdown(socket.SHUT_RDWR)

    watchdog = threading.Timer(timeout, cut_off)
    watchdog.start()
    try:
        connection.request("POST", path, body=body, headers=dict(headers))
        response = connection.getresponse()
        response.read(_MAX_RESPONSE_BYTES)
        if expired.is_set():  # cut short, the answer may look whole (headers end at EOF): not acknowledged
            raise TimeoutError(f"the receiver did not answer within {timeout:g} s")
        return response.status
    except (OSError, http.client.HTTPException) as exc:
        if expired.is_set():
            raise TimeoutError(f"the receiver did not answer within {timeout:g} s") from exc
        raise
    finally:
        watchdog.cancel()
        connection.close()
