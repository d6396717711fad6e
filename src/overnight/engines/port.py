"""The engine port: one async call, endpoint + body in, status + body (+ usage inside) out."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable


# Not frozen: one of each is built per line, and a frozen dataclass's __init__ costs ~3x more.
# Treat both as immutable.
@dataclass(slots=True)
class EngineRequest:
    endpoint: str  # as in the batch line, e.g. "/v1/chat/completions"
    body: dict[str, Any]  # the line's body, parsed (alias already applied)
    deadline: float  # epoch seconds: no attempt starts, and no retry waits, past this
    # The body's JSON text exactly as the user wrote it (alias applied): what an HTTP engine
    # sends, so numbers keep their digits and strings their characters. None: serialize `body`.
    raw_body: bytes | None = None
    # Someone waits for this answer interactively (not a batch line): an engine that schedules its
    # own work (the embedded llama engine) runs it before queued batch work.
    online: bool = False
    # Whether the caller no longer wants the answer (its batch was cancelled, its lease lost): an
    # engine that waited for a slot, or between retries, asks before it sends. None: always wanted.
    stopped: Callable[[], bool] | None = None


@dataclass(slots=True)
class EngineResponse:
    """An HTTP-shaped answer (status_code + body), or a failure with no response behind it
    (status_code None, error_code + error_message), which becomes the line's `error` object."""

    status_code: int | None
    body: dict[str, Any] | None = None
    request_id: str | None = None
    error_code: str | None = None
    error_message: str | None = None
    # The body's JSON text as the upstream sent it, less its line breaks: written to the output
    # file as is, so the values the user gets are exactly the upstream's.
    raw: bytes | None = None

    @property
    def ok(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300

    @classmethod
    def failure(cls, code: str, message: str) -> EngineResponse:
        return cls(status_code=None, error_code=code, error_message=message)

    @classmethod
    def http_error(cls, status: int, message: str, code: str | None = None, param: str | None = None,
                   error_type: str = "invalid_request_error") -> EngineResponse:
        body = {"error": {"message": message, "type": error_type, "param": param, "code": code}}
        return cls(status_code=status, body=body)


@runtime_checkable
class SharedBudgetEngine(Protocol):
    """An engine whose concurrency limit is shared by every worker (a remote server's)."""

    max_in_flight: int

    def set_share(self, share: int) -> None: ...


@runtime_checkable
class RawBodyEngine(Protocol):
    """An engine that sends `EngineRequest.raw_body` as is and never reads `body` when it is given
    (an HTTP engine). The worker then skips parsing the body into a dict for it: a dict per line
    held for a whole shard costs more in garbage collection than its parse."""

    sends_raw_body: bool


class Engine(Protocol):
    """Executes one request. Implementations own their concurrency and retries; `execute` never
    raises for a per-request failure, it returns it."""

    name: str
    # How many requests it is useful to have outstanding at once: the worker runs this many senders.
    max_in_flight: int
    # Who provides its models, as GET /v1/models says (a licence notice where one is owed).
    owned_by: str
    # Requests per shard for batches it serves: many for fast engines (less bookkeeping per line),
    # few for slow ones (less work redone after a crash, since a shard commits as a whole).
    shard_lines: int

    async def start(self) -> None: ...

    async def execute(self, request: EngineRequest) -> EngineResponse: ...

    async def close(self) -> None: ...

    def served_models(self) -> list[str]:
        """Concrete model names this engine answers for (for GET /v1/models)."""
        ...
