"""Handing results from an engine's worker thread to the event loop that waits for them.

The embedded engines compute on a thread of their own (never the event loop); an asyncio future or
queue belongs to its loop and must only be touched from it, so every hand-off goes through
`loop.call_soon_threadsafe`. Callbacks scheduled that way run in the order they were scheduled,
which is what lets a stream's pieces arrive before the future that ends it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any


def set_result(future: asyncio.Future[Any], result: Any) -> None:
    """Event-loop side: a future cancelled meanwhile (its waiter gave up) is left alone."""
    if not future.done():
        future.set_result(result)


def call_in_loop(loop: asyncio.AbstractEventLoop, callback: Callable[..., Any], *args: Any) -> None:
    """Run `callback(*args)` on `loop`, from any thread. A loop already closed has nobody waiting,
    so the call is dropped instead of raising in the worker thread."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(callback, *args)


def resolve_threadsafe(loop: asyncio.AbstractEventLoop, future: asyncio.Future[Any], result: Any) -> None:
    """Set `future`'s result from a worker thread."""
    call_in_loop(loop, set_result, future, result)
