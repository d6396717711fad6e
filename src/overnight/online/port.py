"""What the API calls to answer an online request: the engines in this process (`OnlineService`)
or a worker process's, through its socket (`RelayClient`)."""

from __future__ import annotations

from typing import Protocol

from overnight.engines.online import OnlineReply


class OnlineAnswerer(Protocol):
    async def answer(self, endpoint: str, raw: bytes) -> OnlineReply:
        """The answer to `raw`, a request body sent to `endpoint`; a bad request is answered, not raised."""
        ...
