"""File bytes to and from the Files API, streamed: a file of any size passes in bounded memory."""

from __future__ import annotations

import json
import os
import tempfile
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
    """The JSON objects of a JSONL file on the server, one at a time, read from a local copy split at
    newline bytes only (the response's `iter_lines` splits as `str.splitlines` does, also at U+2028
    and U+0085, which JSON strings hold unescaped: one answer became two broken lines)."""
    with tempfile.TemporaryDirectory(prefix="overnight-file-") as tmp:
        path = Path(tmp, "file.jsonl")
        download_file(client, file_id, path)
        yield from iter_local_lines(path)


def iter_local_lines(path: Path) -> Iterator[dict[str, Any]]:
    with path.open("rb") as fh:
        for raw in fh:
            if raw.strip():
                yield json.loads(raw)
