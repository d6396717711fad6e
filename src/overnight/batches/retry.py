"""Retrying a finished batch: a new batch of its failed lines, without re-uploading.

The new input file is built by streaming the parent's error file and its input file side by
side: an error line's `id` names the input line it answers (ids.py), and both files are in input
order, so this is a merge of two streams in bounded memory. The joined results of a batch and
its retries take, for each custom_id, the line of the latest attempt."""

from __future__ import annotations

from collections.abc import Iterator

import orjson

from overnight import constants as C
from overnight.batches.errors import Conflict, InvalidRequest
from overnight.batches.jsonl import iter_lines
from overnight.batches.line_index import indexes_where, lines_of
from overnight.batches.ports import FileCatalog, ResultsCatalog
from overnight.batches.service import BatchService
from overnight.files.layout import file_key
from overnight.files.port import FileStore
from overnight.ids import new_file_id
from overnight.store.records import BatchRecord, FileRecord

RETRYABLE_STATUSES = (C.COMPLETED, C.CANCELLED, C.EXPIRED)
_KIND_OF_CODE = {C.BATCH_CANCELLED: "cancelled", C.BATCH_EXPIRED: "expired"}
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
        """How many finished attempts are joined, and for each custom_id the latest attempt's
        result line. The attempts are the batch and every finished retry of it, of its retries and
        so on (a batch may be retried more than once, e.g. its failed lines and its cancelled ones
        apart); newest first, each attempt gives the lines whose custom_id no newer one has
        (memory: the custom_ids seen, at most the batch's lines)."""
        root = self.batches.get(owner, batch_id)
        attempts: list[tuple[int, BatchRecord]] = []
        parents = [root]
        while parents and len(attempts) < MAX_RETRY_CHAIN:
            parent = parents.pop()
            for seq, child in self.results.retries_of(parent.owner, parent.id):
                if child.status in (*RETRYABLE_STATUSES, C.FAILED):  # finished; a running one is skipped
                    attempts.append((seq, child))
                    parents.append(child)
        newest_first = [batch for _, batch in sorted(attempts[:MAX_RETRY_CHAIN], key=lambda a: -a[0])]
        return len(newest_first) + 1, self._join([*newest_first, root])

    def _join(self, newest_first: list[BatchRecord]) -> Iterator[bytes]:
        seen: set[str] = set()
        now = int(self.batches.clock())
        for batch in newest_first:
            ids: list[str] = []
            for file_id in (batch.output_file_id, batch.error_file_id):
                record = self._file(file_id, now)
                if record is None:
                    continue
                for line in lines_of(self.files.iter_chunks(record.storage_key)):
                    custom_id = orjson.loads(line)["custom_id"]
                    if custom_id not in seen:
                        ids.append(custom_id)
                        yield line + b"\n"
            seen.update(ids)  # after the batch: a custom_id repeated within one attempt is kept

    def _file(self, file_id: str | None, now: int) -> FileRecord | None:
        return self.file_catalog.get_file(None, file_id, now) if file_id else None


def _kind(error_line: bytes) -> str:
    """failed, cancelled or expired: what an error-file line counts as for a retry."""
    error = orjson.loads(error_line).get("error")
    code = error.get("code") if isinstance(error, dict) else None
    return _KIND_OF_CODE.get(code, "failed") if isinstance(code, str) else "failed"


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
