"""File bytes to and from the Files API, streamed: a file of any size passes in bounded memory."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from openai import OpenAI


def download_file(client: OpenAI, file_id: str, path: Path) -> None:
    """Write a file's content to `path`, chunk by chunk."""
    with client.files.with_streaming_response.content(file_id) as response, path.open("wb") as out:
        for chunk in response.iter_bytes(1024 * 1024):
            out.write(chunk)


def iter_file_lines(client: OpenAI, file_id: str) -> Iterator[dict[str, Any]]:
    """The JSON objects of a JSONL file on the server, one at a time."""
    with client.files.with_streaming_response.content(file_id) as response:
        for line in response.iter_lines():
            if line.strip():
                yield json.loads(line)


def iter_local_lines(path: Path) -> Iterator[dict[str, Any]]:
    with path.open("rb") as fh:
        for raw in fh:
            if raw.strip():
                yield json.loads(raw)
