"""The joined results of a batch and its retries, on doubles of the catalogs and the in-memory
file store: input order, the newest attempt that ran a line, and what a missing error file means."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from overnight import constants as C
from overnight.batches.errors import InvalidRequest
from overnight.batches.retry import BatchRetries
from overnight.files.memory import MemoryFileStore
from overnight.ids import line_id
from overnight.store.records import BatchRecord, FileRecord

NOW = 1_800_000_000


class Batches:
    def __init__(self, batches: list[BatchRecord]) -> None:
        self.by_id = {b.id: b for b in batches}

    def get(self, owner: str | None, batch_id: str) -> BatchRecord:
        return self.by_id[batch_id]

    def clock(self) -> float:
        return NOW


class Results:
    def __init__(self, retries: dict[str, list[tuple[int, BatchRecord]]]) -> None:
        self.retries = retries

    def retries_of(self, owner: str, batch_id: str) -> list[tuple[int, BatchRecord]]:
        return self.retries.get(batch_id, [])


class Files:
    def __init__(self) -> None:
        self.records: dict[str, FileRecord] = {}

    def get_file(self, owner: str | None, file_id: str, now: int) -> FileRecord | None:
        return self.records.get(file_id)


def _answer(batch: str, index: int, custom_id: str, status: int) -> bytes:
    return orjson.dumps({"id": line_id(batch, index), "custom_id": custom_id,
                         "response": {"status_code": status, "body": {}}, "error": None})


def _error(batch: str, index: int, custom_id: str, code: str) -> bytes:
    return orjson.dumps({"id": line_id(batch, index), "custom_id": custom_id, "response": None,
                         "error": {"code": code, "message": code}})


def _batch(files: Files, store: MemoryFileStore, batch_id: str, out: list[bytes], err: list[bytes],
           status: str = C.COMPLETED) -> BatchRecord:
    ids = []
    for kind, lines in (("out", out), ("err", err)):
        if not lines:
            ids.append(None)
            continue
        file_id = f"file-{batch_id}-{kind}"
        with store.writer(f"files/{file_id}") as writer:
            writer.write(b"".join(line + b"\n" for line in lines))
        files.records[file_id] = FileRecord(file_id, "o", "batch_output", "x", 1, NOW, None, f"files/{file_id}")
        ids.append(file_id)
    return BatchRecord(batch_id, "o", C.CHAT_COMPLETIONS, "file-in", "24h", status, NOW, None,
                       output_file_id=ids[0], error_file_id=ids[1])


def _joined(batches: list[BatchRecord], retries: dict[str, list[tuple[int, BatchRecord]]],
            store: MemoryFileStore, files: Files) -> tuple[int, list[dict[str, Any]]]:
    service = BatchRetries(Batches(batches), Results(retries), files, store)  # type: ignore[arg-type]
    attempts, lines = service.joined("o", batches[0].id)
    return attempts, [orjson.loads(line) for line in lines]


def test_joined_is_in_input_order_and_takes_the_newest_attempt_that_ran_each_line() -> None:
    """Lines 1 and 3 failed; retry A answered both; retry B of the same lines was cancelled before
    it ran them. Joined gave B's 'batch_cancelled' (the newest attempt, though it never ran), and
    each attempt's output then its errors (0, 2, 4, 1, 3) instead of input order."""
    store, files = MemoryFileStore(), Files()
    root = _batch(files, store, "batch_root", [_answer("batch_root", i, f"c{i}", 200) for i in (0, 2, 4)],
                  [_error("batch_root", i, f"c{i}", "invalid_value") for i in (1, 3)])
    retry_a = _batch(files, store, "batch_a", [_answer("batch_a", i, c, 200) for i, c in ((0, "c1"), (1, "c3"))], [])
    retry_b = _batch(files, store, "batch_b", [], [_error("batch_b", i, c, C.BATCH_CANCELLED)
                                                   for i, c in ((0, "c1"), (1, "c3"))], C.CANCELLED)
    attempts, rows = _joined([root, retry_a, retry_b], {"batch_root": [(3, retry_b), (2, retry_a)]}, store, files)
    assert attempts == 3
    assert [r["custom_id"] for r in rows] == ["c0", "c1", "c2", "c3", "c4"]
    assert [r["id"] for r in rows] == [line_id("batch_root", 0), line_id("batch_a", 0), line_id("batch_root", 2),
                                       line_id("batch_a", 1), line_id("batch_root", 4)]


def test_a_retry_of_a_retry_and_a_line_no_attempt_ran() -> None:
    store, files = MemoryFileStore(), Files()
    root = _batch(files, store, "batch_root", [_answer("batch_root", 0, "c0", 200)],
                  [_error("batch_root", 1, "c1", C.BATCH_EXPIRED), _error("batch_root", 2, "c2", "invalid_value")])
    first = _batch(files, store, "batch_first", [], [_error("batch_first", 0, "c1", C.BATCH_CANCELLED),
                                                     _error("batch_first", 1, "c2", "invalid_value")], C.CANCELLED)
    second = _batch(files, store, "batch_second", [_answer("batch_second", 0, "c2", 200)], [])
    attempts, rows = _joined([root, first, second], {"batch_root": [(2, first)], "batch_first": [(3, second)]},
                             store, files)
    assert attempts == 3
    assert [(r["custom_id"], r["id"]) for r in rows] == [
        ("c0", line_id("batch_root", 0)),
        ("c1", line_id("batch_first", 0)),  # no attempt ran it: the newest says why
        ("c2", line_id("batch_second", 0)),
    ]


def test_a_retry_whose_error_file_is_gone_says_so() -> None:
    """It said 'no failed requests to retry' (the expired error file read as an empty one)."""
    store, files = MemoryFileStore(), Files()
    root = _batch(files, store, "batch_root", [_answer("batch_root", 0, "c0", 200)],
                  [_error("batch_root", 1, "c1", "invalid_value")])
    files.records["file-in"] = FileRecord("file-in", "o", "batch", "in", 1, NOW, None, "files/file-in")
    del files.records["file-batch_root-err"]  # expired
    service = BatchRetries(Batches([root]), Results({}), files, store)  # type: ignore[arg-type]
    with pytest.raises(InvalidRequest, match="error file file-batch_root-err of batch batch_root no longer exists"):
        service.retry("o", "batch_root", ["failed"])
