"""Online requests from the API process to a worker process, over a Unix socket.

The engines that run batch lines live in the worker processes (`overnight serve` starts one by
default). An online request must run on those same engines, or it could not go ahead of the batch
lines there (and an embedded model would be loaded twice). So the API process forwards the
request's bytes to a worker and relays the answer's bytes back as they arrive.

Frames, both ways: 1 byte kind + 4 bytes big-endian length + payload.
    request:  b"Q" {"endpoint": ...} then b"B" body
    answer:   b"H" {"status": ..., "media_type": ..., "headers": {...}}, b"D" chunk (any number), b"E" end (an answer
              that ends without it broke off: the API aborts its response)
A connection carries one request. The socket lives in a directory only this user can open (the
worker trusts whoever connects: the API process already checked the key). A client that goes away
closes the connection; the worker then stops relaying and frees what the answer held.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

import orjson

from overnight.engines.online import OnlineReply
from overnight.online.port import OnlineAnswerer

log = logging.getLogger("overnight.online")

_HEADER = struct.Struct(">cI")
# Frames above this are refused: a request body is bounded by the API's body limit long before.
MAX_FRAME_BYTES = 256 * 1024 * 1024
_UNAVAILABLE = "No worker process is ready to answer this request. Try again in a few seconds."


async def _write_frame(writer: asyncio.StreamWriter, kind: bytes, payload: bytes) -> None:
    writer.write(_HEADER.pack(kind, len(payload)) + payload)
    await writer.drain()


async def _read_frame(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    kind, size = _HEADER.unpack(await reader.readexactly(_HEADER.size))
    if size > MAX_FRAME_BYTES:
        raise ValueError(f"frame of {size} bytes")
    return kind, await reader.readexactly(size)


class RelayServer:
    """In a worker process: answers the requests the API process forwards, with `answerer`."""

    def __init__(self, answerer: OnlineAnswerer, path: str) -> None:
        self.answerer = answerer
        self.path = path
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # left by a worker that this one replaces
        self._server = await asyncio.start_unix_server(self._serve, self.path)
        os.chmod(self.path, 0o600)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            kind, head = await _read_frame(reader)
            body_kind, body = await _read_frame(reader)
            if kind != b"Q" or body_kind != b"B":
                return
            endpoint = orjson.loads(head)["endpoint"]
            # The API process sends nothing more: end of file means its client went away. Watch for
            # it while the request runs and its answer is relayed, and stop there: a slow stream
            # would otherwise run on until its next event, a whole answer until it is done.
            work = asyncio.create_task(self._answer(endpoint, body, writer))
            gone = asyncio.create_task(reader.read(1))
            try:
                await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
                if not work.done():
                    work.cancel()
                await asyncio.gather(work, return_exceptions=True)
            finally:
                gone.cancel()
                work.cancel()
            error = None if work.cancelled() else work.exception()
            if error is not None:
                raise error
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the API process dropped the request (its client went away)
        except Exception:
            log.exception("online request failed in the worker")
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _answer(self, endpoint: str, body: bytes, writer: asyncio.StreamWriter) -> None:
        reply = await self.answerer.answer(endpoint, body)
        try:
            await _relay(reply, writer)
        finally:
            await reply.aclose()


async def _relay(reply: OnlineReply, writer: asyncio.StreamWriter) -> None:
    await _write_frame(writer, b"H", orjson.dumps({"status": reply.status, "media_type": reply.media_type,
                                                   "headers": reply.headers}))
    if reply.body is not None:
        await _write_frame(writer, b"D", reply.body)
    else:
        async for chunk in reply.chunks:
            await _write_frame(writer, b"D", chunk)
    await _write_frame(writer, b"E", b"")


class RelayClient:
    """In the API process: sends each request to the next worker's socket in turn."""

    def __init__(self, paths: Sequence[str]) -> None:
        self.paths = list(paths)
        self._next = itertools.cycle(range(len(self.paths)))

    async def answer(self, endpoint: str, raw: bytes) -> OnlineReply:
        for _ in self.paths:  # a worker being restarted is skipped
            path = self.paths[next(self._next)]
            try:
                reader, writer = await asyncio.open_unix_connection(path, limit=1024 * 1024)
            except OSError:
                continue
            try:
                await _write_frame(writer, b"Q", orjson.dumps({"endpoint": endpoint}))
                await _write_frame(writer, b"B", raw)
                kind, head = await _read_frame(reader)
            except (OSError, asyncio.IncompleteReadError, ValueError):
                writer.close()
                return OnlineReply.error(502, "The worker process failed while answering this request.",
                                         "server_error", code="engine_error")
            except BaseException:
                writer.close()
                raise
            if kind != b"H":
                writer.close()
                return OnlineReply.error(502, "The worker process sent an unexpected answer.", "server_error")
            meta = orjson.loads(head)
            return OnlineReply(int(meta["status"]), str(meta["media_type"]), chunks=_chunks(reader),
                               on_close=_closer(writer), headers=dict(meta.get("headers") or {}))
        return OnlineReply.error(503, _UNAVAILABLE, "server_error", code="engine_unavailable")


class AnswerBroken(ConnectionError):
    """The worker's answer stopped before its end frame (its engine's connection broke, or the
    worker died). Raised into the HTTP response, which is then aborted: ended normally, a client
    would take the events so far for the whole answer, and half a JSON body for a whole one."""


async def _chunks(reader: asyncio.StreamReader) -> AsyncIterator[bytes]:
    while True:
        try:
            kind, payload = await _read_frame(reader)
        except (asyncio.IncompleteReadError, ConnectionError, ValueError) as exc:
            raise AnswerBroken("the worker process's answer broke off before its end") from exc
        if kind == b"E":
            return
        if kind != b"D":
            raise AnswerBroken(f"the worker process sent a {kind!r} frame inside an answer")
        yield payload


def _closer(writer: asyncio.StreamWriter) -> Callable[[], Awaitable[None]]:
    async def close() -> None:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()

    return close
