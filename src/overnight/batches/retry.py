"""Retrying a finished batch: a new batch of its failed lines, without re-uploading.

The new input file is built by streaming the parent's error file and its input file side by
side: an error line's `id` names the input line it answers (ids.py), and both files are in input
order, so this is a merge of two streams in bounded memory. The joined results of a batch and
its retries take, for each input line, the newest attempt that ran it (see `joined`)."""

from __future__ import annotations

import heapq
from collections.abc import Iterator
from dataclasses import dataclass

from overnight import constants as C
from overnight.batches.errors import Conflict, InvalidRequest
from overnight.batches.jsonl import iter_lines
from overnight.batches.line_index import index_of, indexes_where, lines_of
from overnight.batches.ports import FileCatalog, ResultsCatalog
from overnight.batches.request_line import loads_line
from overnight.batches.service import BatchService
from overnight.files.layout import file_key
from overnight.files.port import FileStore
from overnight.ids import line_id_prefix, new_file_id
from overnight.store.records import BatchRecord, FileRecord

RETRYABLE_STATUSES = (C.COMPLETED, C.CANCELLED, C.EXPIRED)
_KIND_OF_CODE = {C.BATCH_CANCELLED: "cancelled", C.BATCH_EXPIRED: "expired"}
_NEVER_RAN = frozenset({C.BATCH_CANCELLED, C.BATCH_EXPIRED, C.SHARD_FAILED_CODE})
_UNLIMITED = 1 << 62  # input lines were validated (each within the shard byte limit)
MAX_RETRY_CHAIN = 100  # joined results take at most this many retries


class BatchRetries:
    def __init__(self, batches: BatchService, results: ResultsCatalog, file_catalog: FileCatalog,
                 files: FileStore) -> None:
        self.batches = batches
        self.results = results
        self.file_catalog = file_catalog
        self.files = files

    def retry(self, owner: str, batch_id: str, include: list[str]) -> BatchRecord:
        """A new batch of `owner`'s batch's error lines of the kinds in `include` (failed,
        cancelled, expired), with metadata {"overnight_retry_of": parent}. The owner's own batches
        only, admins' too: a retry creates a batch, and batches are created from one's own files."""
        parent = self.batches.get(owner, batch_id)
        if parent.status not in RETRYABLE_STATUSES:
            raise Conflict(f"Cannot retry a batch with status '{parent.status}'; only a finished batch "
                           "(completed, cancelled or expired) can be retried.")
        now = int(self.batches.clock())
        error_file = self._file(parent.error_file_id, now)
        input_file = self._file(parent.input_file_id, now)
        if input_file is None:
            raise InvalidRequest(f"The input file {parent.input_file_id} of batch {batch_id} no longer exists.",
                                 param="batch_id", code="invalid_value")
        if parent.error_file_id is not None and error_file is None:  # not "no failed requests": unknown
            raise InvalidRequest(f"The error file {parent.error_file_id} of batch {batch_id} no longer exists (it "
                                 "expired or was deleted), so which requests failed is not known.",
                                 param="batch_id", code="invalid_value")
        kinds = frozenset(include)
        wanted = iter(()) if error_file is None else indexes_where(
            parent.id, self.files.iter_chunks(error_file.storage_key), lambda line: _kind(line) in kinds
        )
        file_id = new_file_id()
        key = file_key(file_id)
        with self.files.writer(key) as out:
            for line in _select_lines(self.files.iter_chunks(input_file.storage_key), wanted):
                out.write(line)
            size = out.bytes_written
        if not size:
            self.files.delete(key)
            raise InvalidRequest(f"Batch {batch_id} has no {' or '.join(sorted(kinds))} requests to retry.",
                                 param="include", code="invalid_value")
        self.file_catalog.insert_file(FileRecord(
            file_id, parent.owner, "batch", f"{parent.id}_retry.jsonl", size, now, input_file.expires_at, key,
        ))
        window = parent.completion_window if parent.completion_window in self.batches.windows else "24h"
        ttl = parent.output_expires_after
        return self.batches.create(
            parent.owner, file_id, parent.endpoint, window, {"overnight_retry_of": parent.id},
            {"anchor": "created_at", "seconds": ttl} if ttl is not None else None, retry_of=parent.id,
        )

    def joined(self, owner: str | None, batch_id: str) -> tuple[int, Iterator[bytes]]:
        """How many finished attempts are joined, and the batch's result lines in input order, each
        the best answer among the batch and every finished retry of it (of its retries and so on: a
        batch may be retried more than once, e.g. its failed lines and its cancelled ones apart):
        the newest attempt that ran the line, else the newest (a retry cancelled or expired before
        it ran a line does not hide an older answer). A retry's input is an ordered subsequence of
        its parent's, so each attempt's lines overlay its parent's as streams: memory is a line per
        attempt, whatever the batch's size."""
        root = self.batches.get(owner, batch_id)
        children: dict[str, list[tuple[int, BatchRecord]]] = {}
        parents, count = [root], 0
        while parents and count < MAX_RETRY_CHAIN:
            parent = parents.pop()
            for seq, child in self.results.retries_of(parent.owner, parent.id):
                # finished only: a running retry is skipped
                if child.status in (*RETRYABLE_STATUSES, C.FAILED) and count < MAX_RETRY_CHAIN:
                    children.setdefault(parent.id, []).append((seq, child))
                    parents.append(child)
                    count += 1
        now = int(self.batches.clock())
        return count + 1, (answer.line + b"\n" for answer in self._resolved(root, children, now))

    def _resolved(self, batch: BatchRecord, children: dict[str, list[tuple[int, BatchRecord]]],
                  now: int) -> Iterator[_Answer]:
        """`batch`'s answers in its input order, each resolved against its retries' (newest first)."""
        retries = [_Ahead(self._resolved(child, children, now))
                   for _, child in sorted(children.get(batch.id, []), key=lambda c: -c[0])]
        for own in self._answers(batch, now):
            newer = [retry.take() for retry in retries if retry.head is not None and retry.head.custom_id == own.custom_id]
            candidates = [*newer, own]
            yield next((answer for answer in candidates if answer.ran), candidates[0])

    def _answers(self, batch: BatchRecord, now: int) -> Iterator[_Answer]:
        """The lines of `batch`'s output and error files merged into input order (each file is in
        input order; a line's id carries its input index)."""
        prefix = line_id_prefix(batch.id)
        streams = []
        for file_id in (batch.output_file_id, batch.error_file_id):
            record = self._file(file_id, now)
            if record is not None:
                streams.append(_Answer.parse(line, prefix) for line in lines_of(self.files.iter_chunks(record.storage_key)))
        return heapq.merge(*streams, key=lambda answer: answer.index)

    def _file(self, file_id: str | None, now: int) -> FileRecord | None:
        return self.file_catalog.get_file(None, file_id, now) if file_id else None


@dataclass(frozen=True, slots=True)
class _Answer:
    index: int  # the input line's index in its batch
    custom_id: str
    ran: bool  # False: the line was never sent (its batch was cancelled or expired first, its shard failed)
    line: bytes

    @classmethod
    def parse(cls, line: bytes, prefix: str) -> _Answer:
        obj = loads_line(line)  # an answer may hold numbers beyond a double, as the upstream sent them
        return cls(index_of(obj["id"], prefix), obj["custom_id"], _error_code(obj) not in _NEVER_RAN, line)


class _Ahead:
    """An iterator with its next item in view."""

    def __init__(self, items: Iterator[_Answer]) -> None:
        self._items = items
        self.head = next(items, None)

    def take(self) -> _Answer:
        assert self.head is not None
        taken, self.head = self.head, next(self._items, None)
        return taken


def _kind(error_line: bytes) -> str:
    """failed, cancelled or expired: what an error-file line counts as for a retry."""
    code = _error_code(loads_line(error_line))
    return _KIND_OF_CODE.get(code, "failed") if code is not None else "failed"


def _error_code(result: dict[str, object]) -> str | None:
    """A result line's `error.code` (None: no error, or one without a string code)."""
    error = result.get("error")
    code = error.get("code") if isinstance(error, dict) else None
    return code if isinstance(code, str) else None


def _select_lines(chunks: Iterator[bytes], wanted: Iterator[int]) -> Iterator[bytes]:
    """The input lines (newline-terminated) at the ascending indexes `wanted`; the index of an
    input line counts non-blank lines, as shards do."""
    target = next(wanted, None)
    for index, line in enumerate(iter_lines(chunks, _UNLIMITED)):
        if target is None:
            return
        if index == target:
            yield (line.data or b"") + b"\n"
            following = next(wanted, None)
            if following is not None and following <= target:
                raise RuntimeError("error-file lines are out of input order")
            target = following
