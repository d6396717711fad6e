"""Finalizing: stream the committed shard results, in input order, into the output file and the
error file; lines of shards that never ran become `batch_cancelled` / `batch_expired` error lines,
and lines of shards that were given up (`failed`) `shard_failed` ones.
Publishing the files and the terminal state is one transaction fenced by the batch lease.

Each results object is an output section then an error section, so this is a copy of byte
ranges in large chunks, not a loop over lines. Most small batches never get here: a batch of one
shard without error lines is completed by that shard's commit, its results object (written where
the output file's bytes live) published as it is (`publish_with_commit`); one that does (cancelled
as its shard committed) has that object copied by the store (a hard link on a local directory)."""

from __future__ import annotations

from collections import Counter
from contextlib import ExitStack

import orjson

from overnight import constants as C
from overnight.batches.jsonl import iter_lines, split_requests
from overnight.batches.ports import BatchPhases
from overnight.batches.request_line import loads_line
from overnight.batches.results import error_line
from overnight.batches.webhooks import WebhookRoutes
from overnight.files.layout import file_key
from overnight.files.port import BlobWriter, FileStore
from overnight.ids import line_id, new_file_id
from overnight.store.records import (
    BatchTask,
    ClaimedShard,
    DeliveryLease,
    FileRecord,
    SettledShard,
    ShardResult,
    WholeOutput,
)

_UNLIMITED = 1 << 62
_SKIPPED_CODE = {C.CANCELLED: C.BATCH_CANCELLED, C.EXPIRED: C.BATCH_EXPIRED}


def finalize_batch(
    task: BatchTask, files: FileStore, phases: BatchPhases, now: int, webhooks: WebhookRoutes | None = None,
    deliveries: DeliveryLease | None = None,
) -> bool:
    """Write the output and error files and publish them, with the webhook events the terminal
    state causes (leased to this process's sender with `deliveries`). False if the lease was
    lost meanwhile."""
    batch = task.batch
    assert task.final_status is not None
    out_record = _new_output_record(batch.id, batch.owner, "output", batch.output_expires_after, now)
    err_record = _new_output_record(batch.id, batch.owner, "error", batch.output_expires_after, now)
    completed = failed = 0
    codes: Counter[str] = Counter()
    with ExitStack() as stack:
        out = _OpenedOnFirstWrite(files, out_record.storage_key, stack)
        err = _OpenedOnFirstWrite(files, err_record.storage_key, stack)
        linked = 0  # bytes of a results object published whole as the output file
        for shard in task.shards:
            if shard.status == C.SHARD_DONE and shard.result_key:
                if _whole_output(task, shard):
                    files.copy(shard.result_key, out_record.storage_key)
                    done, bad, linked = shard.completed, 0, shard.result_output_bytes or 0
                elif shard.result_output_bytes is None:
                    done, bad = _copy_tagged_lines(files, shard.result_key, out, err)
                else:
                    done, bad = _copy_sections(files, shard.result_key, shard.result_output_bytes, out, err)
                completed += done
                failed += bad
                _count_codes(codes, shard.error_codes, bad)
            else:
                if shard.status == C.SHARD_FAILED:
                    code = C.SHARD_FAILED_CODE
                    message = f"overnight could not run this request's shard ({shard.last_error})."
                else:
                    code, message = _SKIPPED_CODE.get(task.final_status, C.BATCH_CANCELLED), None
                raw = files.read_range(task.input_storage_key or "", shard.byte_offset, shard.byte_length)
                for i, request in enumerate(split_requests(raw)):
                    custom_id = loads_line(request)["custom_id"]  # a line may hold 1e400
                    ident = line_id(batch.id, shard.first_request + i)
                    err.write(error_line(ident, custom_id, code, message) + b"\n")
                    failed += 1
                    codes[code] += 1
        out_size, err_size = out.bytes_written + linked, err.bytes_written
    output, error = _sized(out_record, out_size), _sized(err_record, err_size)
    for record, writer in ((out_record, out), (err_record, err)):
        if writer.opened and not writer.bytes_written:
            files.delete(record.storage_key)  # OpenAI leaves the id null rather than an empty file
    outcome = {"completed": completed, "failed": failed, "errors_by_code": dict(codes.most_common())}
    events = webhooks.events_for(batch.owner, batch.id, task.final_status, now) if webhooks else []
    published = phases.finish_batch(
        batch.id, task.lease_token, task.final_status, output, error, completed, failed, now, outcome, events,
        deliveries,
    )
    if not published:
        for unpublished in (output, error):
            if unpublished is not None:
                files.delete(unpublished.storage_key)
        return False
    for shard in task.shards:
        if shard.result_key:
            files.delete(shard.result_key)
    return True


def publish_with_commit(
    shard: ClaimedShard, result: ShardResult, output_file_id: str, now: int, webhooks: WebhookRoutes | None,
    deliveries: DeliveryLease | None,
) -> WholeOutput | None:
    """For a shard that holds all of its batch's lines and wrote only output lines, its results
    object written at `file_key(output_file_id)`: that object is the output file byte for byte,
    published as it is (no copy, on any store) by the commit itself (see
    `WorkQueue.commit_shard`). None when the batch needs a finalize step."""
    if not (shard.whole_batch and result.completed == shard.request_count and result.output_bytes
            and result.result_key == file_key(output_file_id)):
        return None
    record = _new_output_record(shard.batch_id, shard.owner, "output", shard.output_expires_after, now,
                                output_file_id)
    events = webhooks.events_for(shard.owner, shard.batch_id, C.COMPLETED, now) if webhooks else []
    output = _sized(record, result.output_bytes)
    assert output is not None
    return WholeOutput(output, result.completed, events, deliveries)


class _OpenedOnFirstWrite:
    """A blob writer that opens its blob at the first write. Most batches have no error lines
    (and some no output lines): an empty blob would be created, fsynced, published and deleted
    again, several file-system round trips per batch for nothing."""

    def __init__(self, files: FileStore, key: str, stack: ExitStack) -> None:
        self._files, self._key, self._stack = files, key, stack
        self._writer: BlobWriter | None = None

    @property
    def opened(self) -> bool:
        return self._writer is not None

    @property
    def bytes_written(self) -> int:
        return self._writer.bytes_written if self._writer is not None else 0

    def write(self, data: bytes | memoryview) -> None:
        if self._writer is None:
            self._writer = self._stack.enter_context(self._files.writer(self._key))
        self._writer.write(data)


def _whole_output(task: BatchTask, shard: SettledShard) -> bool:
    """Whether the batch's one shard wrote only output lines: then its results object is the
    output file byte for byte, and the store copies it (a link on a local directory) instead of
    this process reading and rewriting it. Most small batches are one shard without errors."""
    return len(task.shards) == 1 and shard.failed == 0 and bool(shard.result_output_bytes)


def _count_codes(codes: Counter[str], shard_codes: str | None, error_lines: int) -> None:
    """Add a committed shard's error codes; lines of shards committed before codes were counted
    (schema revision 0008) are `unknown`."""
    counted = 0
    for code, count in (orjson.loads(shard_codes) if shard_codes else {}).items():
        codes[code] += count
        counted += count
    if error_lines > counted:
        codes["unknown"] += error_lines - counted


def _copy_sections(
    files: FileStore, key: str, output_bytes: int, out: BlobWriter, err: BlobWriter
) -> tuple[int, int]:
    """Bytes [0, output_bytes) to the output file, the rest to the error file; lines counted."""
    left = output_bytes
    lines_out = lines_err = 0
    for chunk in files.iter_chunks(key):
        view = memoryview(chunk)
        head, tail = view[:left], view[left:]
        left -= len(head)
        if head:
            out.write(head)
            lines_out += chunk.count(b"\n", 0, len(head))
        if tail:
            err.write(tail)
            lines_err += chunk.count(b"\n", len(head))
    return lines_out, lines_err


def _copy_tagged_lines(files: FileStore, key: str, out: BlobWriter, err: BlobWriter) -> tuple[int, int]:
    """Results written before they had sections (schema revision 0001): each line is prefixed by
    `O` (output file) or `E` (error file)."""
    lines_out = lines_err = 0
    for line in iter_lines(files.iter_chunks(key), _UNLIMITED):
        data = line.data or b""
        if data[:1] == b"O":
            out.write(data[1:] + b"\n")
            lines_out += 1
        elif data[:1] == b"E":
            err.write(data[1:] + b"\n")
            lines_err += 1
    return lines_out, lines_err


def _new_output_record(
    batch_id: str, owner: str, kind: str, ttl: int | None, now: int, file_id: str | None = None
) -> FileRecord:
    file_id = file_id or new_file_id()
    return FileRecord(
        id=file_id,
        owner=owner,
        purpose=C.BATCH_OUTPUT_PURPOSE,
        filename=f"{batch_id}_{kind}.jsonl",
        bytes=0,
        created_at=now,
        expires_at=now + (ttl or C.BATCH_FILE_DEFAULT_TTL),
        storage_key=file_key(file_id),
    )


def _sized(record: FileRecord, size: int) -> FileRecord | None:
    if not size:
        return None
    return FileRecord(
        record.id, record.owner, record.purpose, record.filename, size, record.created_at,
        record.expires_at, record.storage_key,
    )
