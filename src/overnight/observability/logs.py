"""Logging set-up for every process, and the context log lines carry.

`--log-format json` writes one JSON object per line: time, level, logger, message, process (api
or worker), and the context of the work at hand: request_id (the API call; in a worker, the call
that created the batch), batch_id, shard. The context lives in a ContextVar, so each request and
each shard task sees its own (asyncio tasks and threads started with to_thread copy it).

What never reaches a log line: keys and prompts. Messages name ids, counts and error kinds only;
this module adds no field beyond those listed in CONTEXT_FIELDS.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from contextvars import ContextVar, Token
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any

import orjson

CONTEXT_FIELDS = ("request_id", "batch_id", "shard")
FORMATS = ("text", "json")
# A ContextVar holds a value per task and thread, not state shared between them; the mapping in it
# is replaced, never mutated.
_CONTEXT: ContextVar[Mapping[str, Any]] = ContextVar("overnight_log_context",
                                                      default=MappingProxyType({}))


def bind(**fields: Any) -> Token[Mapping[str, Any]]:
    """Add fields to the context of this task (and what it starts); `unbind(token)` restores it."""
    return _CONTEXT.set({**_CONTEXT.get(), **fields})


def bind_request_id(request_id: str) -> Token[Mapping[str, Any]]:
    return bind(request_id=request_id)


def unbind(token: Token[Mapping[str, Any]]) -> None:
    _CONTEXT.reset(token)


class JsonFormatter(logging.Formatter):
    def __init__(self, process: str) -> None:
        super().__init__()
        self.process = process

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "process": self.process,
        }
        context = _CONTEXT.get()
        for name in CONTEXT_FIELDS:
            value = getattr(record, name, None)  # extra={...} of the call wins over the context
            if value is None:
                value = context.get(name)
            if value is not None:
                entry[name] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


def configure_logging(log_format: str, process: str) -> None:
    """Root logging for a process ("api" or "worker"); replaces what was configured before."""
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter(process))
    else:
        tag = "[worker]" if process == "worker" else ""
        handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s %(name)s{tag}: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    logging.getLogger("alembic").setLevel(logging.WARNING)
