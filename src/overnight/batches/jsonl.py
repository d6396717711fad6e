"""Streaming JSONL: physical lines with their byte offsets, in bounded memory.

A UTF-8 BOM at the start of the file and a `\r` before `\n` are tolerated; lines holding only
whitespace are not requests (they keep their line number, so reported lines match an editor's).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

BOM = b"\xef\xbb\xbf"


@dataclass(slots=True)  # not frozen: a frozen dataclass's __init__ costs several times more per line
class Line:
    number: int  # 1-based physical line
    offset: int  # byte offset of the line's first byte in the file
    length: int  # bytes including the trailing newline, if any
    data: bytes | None  # None when the line is longer than the limit (its bytes were not kept)


def iter_lines(chunks: Iterable[bytes], max_line_bytes: int) -> Iterator[Line]:
    """Yield every non-blank line. Memory: one chunk plus at most `max_line_bytes` of one line."""
    splitter = LineSplitter(max_line_bytes)
    for chunk in chunks:
        yield from splitter.feed(chunk)
    yield from splitter.end()


class LineSplitter:
    """`iter_lines` for bytes that are pushed rather than pulled (an upload as it arrives): feed
    every chunk in order, then `end()`. Each call's lines must be consumed before the next call."""

    def __init__(self, max_line_bytes: int) -> None:
        self.max_line_bytes = max_line_bytes
        self.number = 0
        self.offset = 0  # file offset where the current line starts
        self.pending = bytearray()  # the current line's bytes so far, while it is within the limit
        self.seen = 0  # bytes of the current line so far, kept or not

    def feed(self, chunk: bytes) -> Iterator[Line]:
        # State in locals for the loop (the per-line cost matters), stored back at the end.
        max_line_bytes, number, offset, pending, seen = (
            self.max_line_bytes, self.number, self.offset, self.pending, self.seen
        )
        start = 0
        while True:
            end = chunk.find(b"\n", start)
            if end >= 0 and seen == 0:  # fast path: the whole line lies in this chunk
                number += 1
                line = chunk[start:end]
                length = end - start + 1
                if length - 1 > max_line_bytes:
                    yield Line(number, offset, length, None)
                elif not offset:
                    yield from _content(number, offset, length, line)
                elif line and not line.isspace():
                    yield Line(number, offset, length, line[:-1] if line.endswith(b"\r") else line)
                offset += length
                start = end + 1
                continue
            piece = chunk[start:] if end < 0 else chunk[start:end]
            seen += len(piece)
            if seen <= max_line_bytes:
                pending += piece
            else:
                pending.clear()
            if end < 0:
                break
            number += 1
            yield from _finish(number, offset, seen + 1, pending, max_line_bytes)
            offset += seen + 1
            pending.clear()
            seen = 0
            start = end + 1
        self.number, self.offset, self.seen = number, offset, seen

    def end(self) -> Iterator[Line]:
        """The last line, when the input does not end with a newline."""
        if self.seen:
            yield from _finish(self.number + 1, self.offset, self.seen, self.pending, self.max_line_bytes)


def _finish(number: int, offset: int, length: int, pending: bytearray, limit: int) -> Iterator[Line]:
    if len(pending) < length - 1 or len(pending) > limit:
        yield Line(number, offset, length, None)
        return
    yield from _content(number, offset, length, bytes(pending))


def _content(number: int, offset: int, length: int, data: bytes) -> Iterator[Line]:
    """The line, unless it is blank. A BOM starting the file is part of neither the first request
    nor the test for a blank line."""
    if offset == 0 and data.startswith(BOM):
        data, offset, length = data[len(BOM):], len(BOM), length - len(BOM)
    if data and not data.isspace():
        yield Line(number, offset, length, data[:-1] if data.endswith(b"\r") else data)


def split_requests(data: bytes) -> list[bytes]:
    """The non-blank lines of one shard's byte range (a shard never starts inside a line)."""
    return [line[:-1] if line.endswith(b"\r") else line for line in data.split(b"\n") if line.strip()]
