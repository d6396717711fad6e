"""API keys: only their sha256 is kept. Each key is its own tenant (owner). An admin key reads every
owner's files and batches (list, retrieve, download) and may cancel any batch (an operator must be
able to stop runaway work), but creates batches only from its own files and deletes only its own
files. Objects out of reach answer 404, never 403, so existence does not leak.
Keys longer than `MAX_KEY_CHARS` are refused without hashing them: no configured key is that long,
and hashing whatever a client sends would let it choose how much work each request costs."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from dataclasses import dataclass, field

from fastapi import Request

from overnight.api.download_tickets import TICKET_SECONDS, make_ticket, ticket_key
from overnight.batches.errors import OvernightError

MAX_KEY_CHARS = 1024


class Unauthorized(OvernightError):
    status_code = 401


@dataclass(frozen=True, slots=True)
class Principal:
    owner: str
    is_admin: bool = False
    key_hash: str = field(default="", repr=False, compare=False)  # signs its download tickets

    @property
    def scope(self) -> str | None:
        """The owner filter for reads and for cancelling a batch: None (everyone) for an admin.
        Creating and deleting use `owner` instead: an admin cannot remove a tenant's data."""
        return None if self.is_admin else self.owner


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def owner_of(key_hash: str) -> str:
    return "key_" + key_hash[:24]


class Authenticator:
    def __init__(self, hashes: dict[str, tuple[str, bool]]) -> None:
        self._hashes = hashes  # sha256 hex -> (owner, is_admin)

    def authenticate(self, authorization: str | None) -> Principal:
        scheme, _, given = (authorization or "").partition(" ")
        key = given.strip()
        if scheme.lower() != "bearer" or not key:
            raise Unauthorized(
                "You didn't provide an API key. Send it as 'Authorization: Bearer <key>' "
                "(the OpenAI SDK does this when you pass api_key=...).",
                code="invalid_api_key",
            )
        if len(key) > MAX_KEY_CHARS:
            raise Unauthorized(
                f"The API key provided is longer than {MAX_KEY_CHARS} characters; no key this server accepts is.",
                code="invalid_api_key",
            )
        digest = hash_key(key)
        match = None
        for known, entry in self._hashes.items():  # constant-time compare against every key
            if hmac.compare_digest(known, digest):
                match = entry
        if match is None:
            raise Unauthorized(
                f"Incorrect API key provided: {_mask(key)}. Use a key configured with --api-key or "
                "OVERNIGHT_API_KEYS, or the one printed when the server first started.",
                code="invalid_api_key",
            )
        return Principal(owner=match[0], is_admin=match[1], key_hash=digest)

    def download_ticket(self, caller: Principal, file_id: str, now: int) -> tuple[str, int]:
        """A ticket for `file_id` signed by the caller's key, and when it expires."""
        expires = now + TICKET_SECONDS
        return make_ticket(caller.key_hash, file_id, expires), expires

    def redeem(self, ticket: str, file_id: str, now: int) -> Principal:
        """The caller a download ticket stands for, or 401 (forged, expired, another file's, or
        signed by a key no longer configured)."""
        key_hash = ticket_key(ticket, file_id, list(self._hashes), now)
        if key_hash is None:
            raise Unauthorized(
                "The download link is invalid or has expired; request a new one "
                f"(POST /v1/files/{file_id}/download_link with your API key).",
                code="invalid_download_ticket",
            )
        owner, is_admin = self._hashes[key_hash]
        return Principal(owner=owner, is_admin=is_admin, key_hash=key_hash)


def _mask(key: str) -> str:
    return key[:3] + "*" * 4 + key[-2:] if len(key) > 8 else "****"


async def principal(request: Request) -> Principal:
    """FastAPI dependency: the caller, or a 401 (unknown key) / 429 (over its rate, or its address
    over its budget of failed attempts) in the OpenAI envelope.
    `async` although it never waits: it runs on the event loop, not in the thread pool, which
    saves a thread hop per request and keeps the limiters' buckets single-threaded."""
    services = request.app.state.services
    return _admitted(request, lambda: services.auth.authenticate(request.headers.get("authorization")))


async def principal_or_ticket(request: Request, ticket: str | None = None) -> Principal:
    """FastAPI dependency for a file's content: the caller by its key, or (with no Authorization
    header) by a download ticket for the file in the path, throttled and rate-limited the same."""
    if ticket is None or "authorization" in request.headers:
        return await principal(request)
    services = request.app.state.services
    file_id = request.path_params["file_id"]
    return _admitted(request, lambda: services.auth.redeem(ticket, file_id, int(services.files.clock())))


def _admitted(request: Request, identify: Callable[[], Principal]) -> Principal:
    """`identify`'s caller, behind the failed-attempt throttle of the client's address (a failure
    spends its budget) and the caller's rate limit."""
    services = request.app.state.services
    address = request.client.host if request.client is not None else ""
    services.auth_throttle.check(address)
    try:
        caller = identify()
    except Unauthorized:
        services.auth_throttle.failed(address)
        raise
    services.rate_limiter.check(caller.owner)
    return caller
