"""Results while a batch runs: the committed prefix of its output (or error) file, streamed.

Shards commit out of order; the prefix is shard 0 up to the first shard not yet committed, so
what is served is final: these lines appear with these bytes in the final file. A cursor is an
input line index (`complete_through`): `after=<cursor>` resumes with the next line. Once the batch
has finished, its final files are served instead, from the cursor on."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from overnight import constants as C
from overnight.batches.errors import InvalidRequest
from overnight.batches.line_index import lines_in_range
from overnight.batches.ports import FileCatalog, ResultsCatalog
from overnight.batches.service import BatchService
from overnight.files.port import FileStore
from overnight.store.records import BatchRecord, SettledShard

OUTPUT, ERROR = "output", "errors"
FINISHED = frozenset({C.COMPLETED, C.FAILED, C.CANCELLED, C.EXPIRED})


@dataclass(frozen=True, slots=True)
class LiveSection:
    complete_through: int  # input lines [0, complete_through) are covered; also the next cursor
    finished: bool  # the batch has finished: nothing more will come
    chunks: Iterator[bytes]


class LiveResults:
    def __init__(self, batches: BatchService, results: ResultsCatalog, file_catalog: FileCatalog,
                 files: FileStore) -> None:
        self.batches = batches
        self.results = results
        self.file_catalog = file_catalog
        self.files = files

    def section(self, owner: str | None, batch_id: str, kind: str, after: int) -> LiveSection:
        """What of `kind` (output or errors) is committed from input line `after` on."""
        if after < 0:
            raise InvalidRequest("after must be a line index of 0 or more.", param="after", code="invalid_value")
        batch = self.batches.get(owner, batch_id)
        if batch.status in FINISHED:
            return LiveSection(max(batch.request_total, after), True, self._final(batch, kind, after, None))
        if batch.status == C.VALIDATING:
            return LiveSection(after, False, iter(()))
        after = min(after, batch.request_total)  # past its last line (beyond a 64-bit integer: a 500 in SQL)
        committed: list[SettledShard] = []
        for shard in self.results.shards_after(batch.id, after):
            if shard.status != C.SHARD_DONE or not shard.result_key or shard.result_output_bytes is None:
                break
            committed.append(shard)
        through = committed[-1].first_request + committed[-1].request_count if committed else after
        return LiveSection(through, False, self._committed(batch, kind, committed, after, through))

    def _committed(
        self, batch: BatchRecord, kind: str, shards: list[SettledShard], after: int, through: int
    ) -> Iterator[bytes]:
        for shard in shards:
            try:
                yield from self._shard_section(batch.id, shard, kind, after)
            except FileNotFoundError:
                # Finalize published the files and removed the shard objects meanwhile: the rest
                # of the promised range comes from the final file (the same bytes).
                finished = self.batches.get(None, batch.id)
                yield from self._final(finished, kind, max(after, shard.first_request), through)
                return

    def _shard_section(self, batch_id: str, shard: SettledShard, kind: str, after: int) -> Iterator[bytes]:
        assert shard.result_key is not None and shard.result_output_bytes is not None
        chunks = _section(self.files.iter_chunks(shard.result_key), shard.result_output_bytes, kind == OUTPUT)
        if shard.first_request < after:  # a cursor inside this shard: drop the lines before it
            chunks = lines_in_range(batch_id, chunks, after, None)
        yield from chunks

    def _final(self, batch: BatchRecord, kind: str, after: int, stop: int | None) -> Iterator[bytes]:
        file_id = batch.output_file_id if kind == OUTPUT else batch.error_file_id
        record = self.file_catalog.get_file(None, file_id, int(self.batches.clock())) if file_id else None
        if record is None:
            return iter(())
        chunks = self.files.iter_chunks(record.storage_key)
        if after == 0 and stop is None:
            return chunks
        return lines_in_range(batch.id, chunks, after, stop)


def _section(chunks: Iterator[bytes], output_bytes: int, output: bool) -> Iterator[bytes]:
    """Bytes [0, output_bytes) of a results object (its output section), or the rest."""
    left = output_bytes
    for chunk in chunks:
        head, tail = chunk[:left], chunk[left:]
        left -= len(head)
        piece = head if output else tail
        if piece:
            yield piece
        if output and left == 0:
            return
