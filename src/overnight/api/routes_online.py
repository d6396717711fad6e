"""OpenAI's online endpoints at the same base URL: `client.chat.completions.create(...)`,
`client.completions.create(...)`, `client.embeddings.create(...)` and `client.responses.create(...)`
work with the same keys as the Batch API, on the same engines and routes, ahead of batch lines.

Bodies are not modelled here: they go to the engine as the client wrote them (see online/). The
routes are left out of the OpenAPI document, whose contract is the Batch API's; OpenAI's API
reference is theirs.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from starlette.responses import Response, StreamingResponse

from overnight import constants as C
from overnight.api.auth import Principal, principal
from overnight.api.errors import error_response
from overnight.api.services import Services
from overnight.engines.online import EVENT_STREAM, OnlineReply

router = APIRouter(prefix="/v1", include_in_schema=False)
CLIENT_CLOSED_REQUEST = 499  # nginx's status for a request whose client left before the answer
Caller = Annotated[Principal, Depends(principal)]


@router.post("/chat/completions")
async def chat_completions(request: Request, _caller: Caller) -> Response:
    return await _answer(request, C.CHAT_COMPLETIONS)


@router.post("/completions")
async def completions(request: Request, _caller: Caller) -> Response:
    return await _answer(request, C.COMPLETIONS)


@router.post("/embeddings")
async def embeddings(request: Request, _caller: Caller) -> Response:
    return await _answer(request, C.EMBEDDINGS)


@router.post("/responses")
async def responses(request: Request, _caller: Caller) -> Response:
    return await _answer(request, C.RESPONSES)


async def _answer(request: Request, endpoint: str) -> Response:
    services: Services = request.app.state.services
    if services.online is None:
        return error_response(503, "This server process answers no online requests.", "server_error")
    reply = await _unless_the_client_leaves(request, services.online.answer(endpoint, await request.body()))
    if reply is None:
        return Response(status_code=CLIENT_CLOSED_REQUEST)  # nobody reads it; request metrics count it
    headers = dict(reply.headers)  # an upstream's retry-after, x-should-retry, x-ratelimit-*
    if 400 <= reply.status < 500 and reply.status not in (408, 429):
        headers.setdefault("x-should-retry", "false")  # as for the API's own errors: it will not change
    if reply.body is not None:
        await reply.aclose()
        return Response(reply.body, status_code=reply.status, media_type=reply.media_type, headers=headers)
    if reply.media_type.startswith(EVENT_STREAM):
        headers["cache-control"] = "no-cache"
    return StreamingResponse(_relay(reply), status_code=reply.status, media_type=reply.media_type, headers=headers)


async def _unless_the_client_leaves(request: Request, answer: Awaitable[OnlineReply]) -> OnlineReply | None:
    """The answer, or None once the client has gone away before it came: the work is cancelled
    then (freeing its engine slot or upstream connection). uvicorn cancels no handler when its
    client leaves: an SDK's timed-out request ran to its end while the SDK's retries ran beside it."""
    work = asyncio.ensure_future(answer)
    gone = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        work.cancel()
        raise
    finally:
        gone.cancel()  # before any response: a streamed one listens for the disconnect itself
        await asyncio.gather(gone, return_exceptions=True)
    if gone.cancelled():  # the client is still there, and the answer came
        return work.result()
    work.cancel()
    for outcome in await asyncio.gather(work, return_exceptions=True):
        if isinstance(outcome, OnlineReply):
            await outcome.aclose()  # it came just as the client left
    return None


async def _disconnect(request: Request) -> None:
    """Returns when the client has gone away (its body is read: nothing else can arrive)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _relay(reply: OnlineReply) -> AsyncIterator[bytes]:
    """The answer's bytes as they come; whatever ends the response (the last byte, a client that
    went away) frees what the answer holds."""
    try:
        async for chunk in reply.chunks:
            yield chunk
    finally:
        await reply.aclose()
