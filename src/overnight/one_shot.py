"""`overnight run`: one JSONL file through the same machinery as the server (validation, shards,
the worker, finalize), without one; the `vllm run-batch` use case.

What a run owes its user beyond the batch itself: it finds out before the work starts whether it
can write its results (a run of hours must not end in "no such directory"), it replaces the output
files only when every result is in them (a crash or Ctrl-C leaves none half-written), it has no
deadline (the 24-hour window is the server's promise, not a one-shot's), and its exit status says
whether every line ran."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from overnight import constants as C
from overnight.batches.errors import OvernightError
from overnight.settings import Settings

if TYPE_CHECKING:
    from overnight.store.records import BatchRecord
    from overnight.wiring import Components

# A run's batch has no deadline unless one is configured: this long is none in practice.
NO_DEADLINE_SECONDS = 100 * 365 * 24 * 3600
# The first line is read for its `url`; a file that is one huge line (a JSON array) is not JSONL.
_FIRST_LINE_BYTES = 1024 * 1024
_OWNER = "local"


@dataclass
class _Target:
    final: Path
    partial: Path
    fh: BinaryIO


class ResultFiles:
    """The output (and errors) file, written beside their final names and renamed onto them only
    when complete. Opened before the batch runs, so a path that cannot be written is refused
    before any work is done; `-o x --errors x` (or the same file by two names) is one file."""

    def __init__(self, output: Path, errors: Path | None) -> None:
        self._targets: dict[Path, _Target] = {}
        self._by_role: dict[str, _Target] = {}
        umask = os.umask(0)
        os.umask(umask)
        self._mode = 0o666 & ~umask  # what the files would have if opened in place
        try:
            for role, path in (("output", output), ("errors", errors or output)):
                self._by_role[role] = self._open(path)
        except BaseException:
            self.discard()
            raise

    def _open(self, path: Path) -> _Target:
        key = path.resolve()
        if key in self._targets:
            return self._targets[key]
        if path.is_dir():
            raise IsADirectoryError(21, "it is a directory", str(path))
        parent = path.parent
        if not parent.is_dir():
            raise FileNotFoundError(2, f"no directory {parent}", str(path))
        fd, partial = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=parent)
        target = self._targets[key] = _Target(path, Path(partial), os.fdopen(fd, "wb"))
        return target

    def writer(self, role: str) -> BinaryIO:
        return self._by_role[role].fh

    def commit(self) -> None:
        """Every result is written: the files take their final names."""
        for target in self._targets.values():
            target.fh.flush()
            os.fsync(target.fh.fileno())
            target.fh.close()
            os.chmod(target.partial, self._mode)
            os.replace(target.partial, target.final)
        self._targets.clear()

    def discard(self) -> None:
        for target in self._targets.values():
            target.fh.close()
            with contextlib.suppress(FileNotFoundError):
                target.partial.unlink()
        self._targets.clear()


async def run_file(
    settings: Settings,
    input_path: Path,
    output_path: Path,
    errors_path: Path | None,
    endpoint: str | None,
    scratch: bool = False,
) -> int:
    """Run one JSONL file as a batch and write its results. 0: every line ran (some may have
    failed upstream, as error lines); 1: the batch failed validation or did not finish; 2: the
    input or the result files cannot be used."""
    from tqdm import tqdm

    from overnight.wiring import build

    if not input_path.is_file():
        print(f"error: no such input file: {input_path}", file=sys.stderr)
        return 2
    if settings.database_url is not None:
        print("error: `overnight run` keeps its batch in its own SQLite database; to run a file on a shared "
              "database, submit it to a server on it (`overnight batch submit`)", file=sys.stderr)
        return 2
    try:
        results = ResultFiles(output_path, errors_path)
    except OSError as exc:
        print(f"error: cannot write {exc.filename}: {exc.strerror}", file=sys.stderr)
        return 2
    scratch_dir = tempfile.mkdtemp(prefix="overnight-run-") if scratch else None
    if scratch_dir is not None:
        settings = replace(settings, data_dir=Path(scratch_dir), models_dir=settings.models_dir or user_models_dir())
    settings = replace(settings, worker=replace(settings.worker, poll_seconds=0.05), api_keys=("local",))
    settings = slots_for_file(settings, input_path)
    _stop_on_signals(asyncio.current_task())
    parts: Components | None = None
    batch: BatchRecord | None = None
    try:
        parts = build(settings, announce=None)
        try:
            batch = _submit(parts, input_path, endpoint)
        except OvernightError as exc:
            print(f"error: {input_path}: {exc.message}", file=sys.stderr)
            return 2
        await parts.start_engines()
        stop = asyncio.Event()
        worker_task = asyncio.create_task(parts.worker.run(stop))
        try:
            record = await _watch(parts, batch.id, tqdm)
        finally:
            stop.set()
            await worker_task
        batch = record
        return _write_results(parts, record, results, output_path)
    finally:
        results.discard()  # nothing, once committed
        if parts is not None:
            if batch is not None and scratch_dir is None and batch.status not in C.TERMINAL_STATES:
                # Kept in a chosen data dir, an interrupted batch would otherwise run on in the
                # background of the next run there.
                with contextlib.suppress(OvernightError):
                    parts.services.batches.cancel(None, batch.id)
            await parts.close()
        if scratch_dir is not None:
            # Work the stopped worker left on threads (a lease extension, a commit: cancelling the
            # awaiting task does not stop the thread) may still write into the directory: removed
            # meanwhile, it was left behind now and then with the files written during the removal.
            await asyncio.get_running_loop().shutdown_default_executor()
            shutil.rmtree(scratch_dir, ignore_errors=True)


def slots_for_file(settings: Settings, path: Path) -> Settings:
    """At most one embedded sequence slot per line of the file (nobody else can send this run a
    request). llama.cpp allocates and clears every slot's KV cells at start: the default 64 slots of
    2,048 cells are ~3 GB, which took ~6 s of page faults on a VM for a file of 6 lines. Each slot
    keeps its cells, so the longest line that fits is the same."""
    cfg = settings.embedded
    lines, last = 0, b"\n"
    try:
        with path.open("rb") as fh:
            while lines < cfg.n_seq_max and (chunk := fh.read(1 << 20)):  # a big file: its first chunks
                lines, last = lines + chunk.count(b"\n"), chunk[-1:]
    except OSError:  # the upload reports it
        return settings
    lines += last != b"\n"  # a last line without its newline
    slots = max(1, min(cfg.n_seq_max, lines))
    if slots == cfg.n_seq_max:
        return settings
    return replace(settings, embedded=replace(cfg, n_seq_max=slots, n_ctx=cfg.n_ctx // cfg.n_seq_max * slots))


def user_models_dir() -> Path | None:
    """Where scratch runs keep the model files made from the packaged ones (requantizing SmolLM2
    took ~0.9 s of every run, assembling Gemma rewrote 253 MB): `$XDG_CACHE_HOME/overnight/models`,
    `~/.cache` by default, made when a model is. None when it cannot be written (the scratch
    directory holds them then)."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path("~/.cache").expanduser())
    if not base.is_absolute():  # no home directory: "~" stayed as it was
        return None
    path = base / "overnight" / "models"
    existing = next(p for p in (path, *path.parents) if p.exists())
    return path if existing.is_dir() and os.access(existing, os.W_OK | os.X_OK) else None


def _stop_on_signals(task: asyncio.Task[int] | None) -> None:
    """SIGTERM and SIGHUP (a scheduler's timeout, a closed terminal) stop the run as Ctrl-C does:
    cancelled, so the scratch directory and the unfinished result files are removed."""
    if task is None:
        return
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGHUP):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):  # not on this platform
            loop.add_signal_handler(sig, task.cancel)


def _submit(parts: Components, input_path: Path, endpoint: str | None) -> BatchRecord:
    """The input stored as a batch file and a batch created on it (as `files.create` and
    `batches.create` would)."""
    endpoint = endpoint or _first_url(input_path) or C.CHAT_COMPLETIONS
    file_id = parts.services.files.new_upload_id()
    key = parts.services.files.storage_key(file_id)
    with parts.core.files.writer(key) as out, input_path.open("rb") as src:
        head = src.read(1024 * 1024)
        out.write(head)
        while chunk := src.read(1024 * 1024):
            out.write(chunk)
    parts.services.files.register_upload(_OWNER, file_id, input_path.name, "batch", input_path.stat().st_size,
                                         head, None)
    return parts.services.batches.create(_OWNER, file_id, endpoint, "24h")


async def _watch(parts: Components, batch_id: str, tqdm: type) -> BatchRecord:
    bar = tqdm(total=0, unit="req", file=sys.stderr, desc="validating", disable=None)  # None: off unless a TTY
    try:
        while True:
            record = parts.services.batches.get(None, batch_id)
            if record.request_total and bar.total != record.request_total:
                bar.total = record.request_total
                bar.set_description(record.status)
            bar.n = record.request_completed + record.request_failed
            bar.refresh()
            if record.status in C.TERMINAL_STATES:
                return record
            await asyncio.sleep(0.2)
    finally:
        bar.close()


def _write_results(parts: Components, record: BatchRecord, results: ResultFiles, output_path: Path) -> int:
    if record.status == C.FAILED:
        for error in record.errors or []:
            where = f"line {error['line']}: " if error.get("line") else ""
            print(f"error: {where}{error['code']}: {error['message']}", file=sys.stderr)
        return 1
    for file_id, role in ((record.output_file_id, "output"), (record.error_file_id, "errors")):
        if file_id:
            stored = parts.services.files.get(None, file_id)
            fh = results.writer(role)
            for chunk in parts.core.files.iter_chunks(stored.storage_key):
                fh.write(chunk)
    results.commit()
    counts = f"{record.request_completed} completed, {record.request_failed} failed"
    print(f"{record.status}: {counts} -> {output_path}", file=sys.stderr)
    if record.status != C.COMPLETED:  # expired or cancelled: some lines never ran
        print(f"error: the batch was {record.status} before every line ran (they are error lines)", file=sys.stderr)
        return 1
    return 0


def _first_url(path: Path) -> str | None:
    import orjson

    with path.open("rb") as fh:
        while raw := fh.readline(_FIRST_LINE_BYTES):
            if not raw.endswith(b"\n") and len(raw) == _FIRST_LINE_BYTES:
                return None  # not a line of JSONL: validation says so
            if raw.strip():
                try:
                    url = orjson.loads(raw.removeprefix(b"\xef\xbb\xbf")).get("url")
                except (orjson.JSONDecodeError, AttributeError):
                    return None
                return url if isinstance(url, str) else None
    return None
