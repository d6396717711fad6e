"""Submit, wait for, cancel and list batches, through the public Files and Batch API only: the
same calls work against overnight, OpenAI and any other compatible server."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, cast

from openai import OpenAI
from openai.types import Batch

from overnight.client.build import first_url
from overnight.client.errors import BatchInputError, WaitTimeout
from overnight.client.outcome import TERMINAL
from overnight.client.progress import BatchProgress

DEFAULT_WINDOW = "24h"
FIRST_POLL_SECONDS = 0.25
MAX_POLL_SECONDS = 10.0


def submit(
    client: OpenAI,
    path: str | Path,
    *,
    endpoint: str | None = None,
    completion_window: str = DEFAULT_WINDOW,
    metadata: Mapping[str, str] | None = None,
) -> Batch:
    """Upload a batch input file and create a batch from it. `endpoint` defaults to the first
    line's `url`."""
    path = Path(path)
    endpoint = endpoint or first_url(path)
    if endpoint is None:
        raise BatchInputError(f"{path}: cannot tell the endpoint from the first line's url; give it")
    with path.open("rb") as fh:
        uploaded = client.files.create(file=(path.name, fh), purpose="batch")
    # Metadata only when there is some: the key is left out rather than sent as null.
    optional: dict[str, Any] = {"metadata": dict(metadata)} if metadata else {}
    # The SDK types these as the literals OpenAI serves today; other servers may serve more.
    return client.batches.create(
        input_file_id=uploaded.id, endpoint=cast(Any, endpoint), completion_window=cast(Any, completion_window),
        **optional,
    )


def wait(
    client: OpenAI,
    batch_id: str,
    *,
    timeout: float | None = None,
    poll_seconds: float = MAX_POLL_SECONDS,
    progress: bool | None = None,
    on_update: Callable[[Batch], None] | None = None,
) -> Batch:
    """Poll until the batch reaches a final state and return it. Polls start fast and slow down to
    one every `poll_seconds`. `progress`: a bar on stderr (None: when stderr is a terminal).
    Raises WaitTimeout after `timeout` seconds."""
    deadline = None if timeout is None else time.monotonic() + timeout
    interval = min(FIRST_POLL_SECONDS, poll_seconds)
    bar = BatchProgress(progress)
    try:
        while True:
            batch = client.batches.retrieve(batch_id)
            bar.update(batch)
            if on_update is not None:
                on_update(batch)
            if batch.status in TERMINAL:
                return batch
            if deadline is not None and time.monotonic() + interval > deadline:
                raise WaitTimeout(f"batch {batch_id} is still {batch.status} after {timeout:g} s")
            time.sleep(interval)
            interval = min(interval * 2, poll_seconds)
    finally:
        bar.close()


def cancel(client: OpenAI, batch_id: str) -> Batch:
    """Ask the server to cancel a batch; it answers `cancelling` (or `cancelled` already)."""
    return client.batches.cancel(batch_id)


def list_batches(client: OpenAI, limit: int = 20) -> Iterator[Batch]:
    """The newest batches first, at most `limit` (pages are followed as needed)."""
    page_size = max(1, min(limit, 100))
    for n, batch in enumerate(client.batches.list(limit=page_size)):
        if n >= limit:
            return
        yield batch
