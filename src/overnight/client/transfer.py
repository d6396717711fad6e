"""File bytes to and from the Files API, streamed: a file of any size passes in bounded memory."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from openai import OpenAI


@contextmanager
def replaced_on_success(path: Path) -> Iterator[Path]:
    """A temporary sibling of `path` to write, which becomes `path` when the block ends without an
    error: an interrupted download leaves no file that looks complete."""
    part = path.with_name(f".{path.name}.part")
    try:
        yield part
        os.replace(part, path)
    finally:
        part.unlink(missing_ok=True)


def download_file(client: OpenAI, file_id: str, path: Path) -> None:
    """Write a file's content to `path`, chunk by chunk."""
    with (replaced_on_success(path) as part, client.files.with_streaming_response.content(file_id) as response,
          part.open("wb") as out):
        for chunk in response.iter_bytes(1024 * 1024):
            out.write(chunk)


def iter_file_lines(client: OpenAI, file_id: str) -> Iterator[dict[str, Any]]:
    """The JSON objects of a JSONL file on the server, one at a time. Split on newline bytes only:
    `iter_lines` splits text as `str.splitlines` does, also at U+2028, U+0085 and others, which
    JSON strings may hold unescaped (one answer became two broken lines)."""
    with client.files.with_streaming_response.content(file_id) as response:
        pending = bytearray()  # the line in progress
        for chunk in response.iter_bytes(1024 * 1024):
            end = chunk.find(b"\n")
            if end < 0:
                pending += chunk
                continue
            pending += chunk[:end]
            lines = chunk[end + 1:].split(b"\n")
            for line in (bytes(pending), *lines[:-1]):
                if line.strip():
                    yield json.loads(line)
            pending = bytearray(lines[-1])
        if pending.strip():
            yield json.loads(pending)


def iter_local_lines(path: Path) -> Iterator[dict[str, Any]]:
    with path.open("rb") as fh:
        for raw in fh:
            if raw.strip():
                yield json.loads(raw)
