"""A finished batch's results joined to its inputs by custom_id, in input order.

OpenAI writes output lines in no particular order, and a batch may hold a million lines, so the
join does not hold either side in memory: the output and error lines go into a temporary SQLite
index keyed by custom_id (stdlib `sqlite3`, on disk), and the input file is streamed once against
it. Results that match no input line (none should) come last."""

from __future__ import annotations

import csv
import json
import sqlite3
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import openai
from openai import OpenAI
from openai.types import Batch

from overnight.client.answers import CSV_FIELDS, ResultRecord, input_of, result_of
from overnight.client.errors import NotFinished
from overnight.client.outcome import TERMINAL
from overnight.client.transfer import download_file, iter_local_lines, replaced_on_success

OUTPUT_NAME = "output.jsonl"
ERRORS_NAME = "errors.jsonl"
RESULTS_JSONL_NAME = "results.jsonl"
RESULTS_CSV_NAME = "results.csv"

Warn = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class Downloaded:
    """Where `download` put a batch's files, and how many joined records of each status it wrote."""

    directory: Path
    output: Path
    errors: Path
    results_jsonl: Path
    results_csv: Path
    statuses: Counter[str]


def iter_results(
    client: OpenAI, batch: Batch | str, *, input_path: str | Path | None = None, warn: Warn | None = None
) -> Iterator[ResultRecord]:
    """Each input line of a finished batch joined to its result. The input is read from
    `input_path` when given, else downloaded (input_file_id); if it cannot be read, records come
    in result order with `input` None and `warn` is told why."""
    batch = _finished(client, batch)
    with tempfile.TemporaryDirectory(prefix="overnight-results-") as tmp:
        scratch = Path(tmp)
        output, errors = scratch / OUTPUT_NAME, scratch / ERRORS_NAME
        _fetch_results(client, batch, output, errors)
        yield from _joined(client, batch, output, errors, scratch, input_path, warn)


def download(
    client: OpenAI,
    batch: Batch | str,
    directory: str | Path,
    *,
    input_path: str | Path | None = None,
    warn: Warn | None = None,
) -> Downloaded:
    """Write output.jsonl and errors.jsonl (as the server has them; empty when the batch has none)
    and the joined results.jsonl and results.csv into `directory`."""
    batch = _finished(client, batch)
    target = Path(directory)
    target.mkdir(parents=True, exist_ok=True)
    output, errors = target / OUTPUT_NAME, target / ERRORS_NAME
    results_jsonl, results_csv = target / RESULTS_JSONL_NAME, target / RESULTS_CSV_NAME
    _fetch_results(client, batch, output, errors)
    statuses: Counter[str] = Counter()
    with (
        replaced_on_success(results_jsonl) as jsonl_part,
        replaced_on_success(results_csv) as csv_part,
        tempfile.TemporaryDirectory(prefix="overnight-results-") as tmp,
        jsonl_part.open("w", encoding="utf-8", newline="\n") as jsonl,
        csv_part.open("w", encoding="utf-8", newline="") as table,
    ):
        writer = csv.DictWriter(table, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for record in _joined(client, batch, output, errors, Path(tmp), input_path, warn):
            jsonl.write(json.dumps(record.as_dict(), ensure_ascii=False) + "\n")
            writer.writerow(record.as_row())
            statuses[record.status] += 1
    return Downloaded(target, output, errors, results_jsonl, results_csv, statuses)


def _finished(client: OpenAI, batch: Batch | str) -> Batch:
    if isinstance(batch, str) or batch.status not in TERMINAL:
        batch = client.batches.retrieve(batch if isinstance(batch, str) else batch.id)
    if batch.status not in TERMINAL:
        raise NotFinished(f"batch {batch.id} is {batch.status}: its results are not ready (wait for it first)")
    return batch


def _fetch_results(client: OpenAI, batch: Batch, output: Path, errors: Path) -> None:
    for file_id, path in ((batch.output_file_id, output), (batch.error_file_id, errors)):
        if file_id:
            download_file(client, file_id, path)
        else:
            path.write_bytes(b"")  # none on the server: nothing succeeded, or nothing failed


def _joined(
    client: OpenAI, batch: Batch, output: Path, errors: Path, scratch: Path,
    input_path: str | Path | None, warn: Warn | None,
) -> Iterator[ResultRecord]:
    index = sqlite3.connect(scratch / "index.sqlite")
    try:
        index.execute("PRAGMA journal_mode = OFF")  # a scratch index: nothing to recover
        index.execute("PRAGMA synchronous = OFF")
        index.execute("CREATE TABLE result (custom_id TEXT PRIMARY KEY, line TEXT NOT NULL)")
        # A custom_id reported twice (a server that runs requests at least once) keeps its first
        # result, and the output file goes in first: a success is not hidden by a later failure.
        for path in (output, errors):
            index.executemany(
                "INSERT OR IGNORE INTO result VALUES (?, ?)",
                ((str(line.get("custom_id")), json.dumps(line)) for line in iter_local_lines(path)),
            )
        inputs = _input_file(client, batch, scratch, input_path, warn)
        if inputs is not None:
            take = "DELETE FROM result WHERE custom_id = ? RETURNING line"
            for line in iter_local_lines(inputs):
                custom_id = str(line.get("custom_id"))
                row = index.execute(take, (custom_id,)).fetchone()
                yield result_of(custom_id, json.loads(row[0]) if row else None, input_of(line.get("body")))
        for custom_id, text in index.execute("SELECT custom_id, line FROM result ORDER BY rowid"):
            yield result_of(custom_id, json.loads(text), None)
    finally:
        index.close()


def _input_file(
    client: OpenAI, batch: Batch, scratch: Path, input_path: str | Path | None, warn: Warn | None
) -> Path | None:
    if input_path is not None:
        return Path(input_path)
    path = scratch / "input.jsonl"
    try:
        download_file(client, batch.input_file_id, path)
    except openai.APIStatusError as exc:  # deleted, or a server that keeps batch inputs to itself
        if warn is not None:
            warn(f"could not read the input file {batch.input_file_id} ({exc.status_code}); "
                 "results have no input (give the batch file with --input)")
        return None
    return path
