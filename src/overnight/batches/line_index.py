"""Reading result lines back: the input line index in a result line's `id`, and streams of
whole lines filtered by it. Result lines carry `batch_req_<batch hex><index hex>` (ids.py), so
a line says which input line it answers without a lookup."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from overnight.batches.jsonl import iter_lines
from overnight.batches.request_line import loads_line
from overnight.ids import line_id_prefix

_UNLIMITED = 1 << 62  # result lines are our own, written whole


def line_index(line: bytes, prefix: str) -> int:
    """The input line index of a result line of the batch whose line ids start with `prefix`."""
    return index_of(loads_line(line)["id"], prefix)  # answers may hold 1e400


def index_of(ident: object, prefix: str) -> int:
    """The input line index that a result line's `id` names (of the batch whose ids start with `prefix`)."""
    if not isinstance(ident, str) or not ident.startswith(prefix):
        raise ValueError(f"result line id {ident!r} is not of this batch")
    return int(ident[len(prefix):], 16)


def lines_of(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """The non-blank lines of a stream, without their newline (one chunk plus one line in memory)."""
    for line in iter_lines(chunks, _UNLIMITED):
        if line.data is not None:
            yield line.data


def lines_in_range(batch_id: str, chunks: Iterable[bytes], start: int, stop: int | None) -> Iterator[bytes]:
    """The lines (newline-terminated) whose input index is in [start, stop)."""
    prefix = line_id_prefix(batch_id)
    for line in lines_of(chunks):
        index = line_index(line, prefix)
        if index >= start and (stop is None or index < stop):
            yield line + b"\n"


def indexes_where(batch_id: str, chunks: Iterable[bytes], keep: Callable[[bytes], bool]) -> Iterator[int]:
    """The input indexes of the lines `keep` accepts, in file order."""
    prefix = line_id_prefix(batch_id)
    for line in lines_of(chunks):
        if keep(line):
            yield line_index(line, prefix)
