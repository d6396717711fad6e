"""What a batch came to, in one honest line and one exit code.

A batch whose every line failed still ends `completed` on OpenAI; the summary always says how many
lines succeeded and how many failed, and why, so "completed" never hides failures."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

from openai import OpenAI
from openai.types import Batch

from overnight.client.answers import error_code_of
from overnight.client.transfer import iter_file_lines

# Exit codes of `overnight batch ...`, for scripts.
EXIT_OK = 0  # every line succeeded (or, for commands that do not wait, the call succeeded)
EXIT_LINES_FAILED = 1  # the batch completed, but some lines failed
EXIT_USAGE = 2  # bad arguments, or input files that cannot make a batch
EXIT_BATCH_FAILED = 3  # the batch failed (validation), expired or was cancelled
EXIT_API_ERROR = 4  # the API refused a call or could not be reached
EXIT_NOT_FINISHED = 5  # the batch has not finished (wait --timeout ran out; download of a running batch)

TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})
SHOWN_VALIDATION_ERRORS = 20


@dataclass(frozen=True, slots=True)
class Outcome:
    """A batch's counts, with the failed lines counted by error code when the error file was read."""

    batch_id: str
    status: str
    total: int
    succeeded: int
    failed: int
    error_codes: Mapping[str, int] = field(default_factory=dict)
    validation_errors: tuple[str, ...] = ()

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL

    @property
    def exit_code(self) -> int:
        if not self.finished:
            return EXIT_NOT_FINISHED
        if self.status != "completed":
            return EXIT_BATCH_FAILED
        return EXIT_LINES_FAILED if self.failed or self.succeeded < self.total else EXIT_OK

    def summary(self) -> str:
        """E.g. "completed: 970 of 1,000 succeeded, 30 failed (upstream_error: 30)"."""
        if self.status == "failed" and self.validation_errors:
            head = f"failed: the batch was rejected with {len(self.validation_errors):,} error(s), nothing ran"
            return "\n".join([head, *(f"  {e}" for e in self.validation_errors)])
        so_far = "" if self.finished else " so far"
        text = f"{self.status}: {self.succeeded:,} of {self.total:,} succeeded{so_far}, {self.failed:,} failed"
        if self.error_codes:
            text += " (" + ", ".join(f"{code}: {n:,}" for code, n in self.error_codes.items()) + ")"
        missing = self.total - self.succeeded - self.failed
        if self.finished and missing > 0:
            text += f", {missing:,} not reported"
        return text


def outcome_of(batch: Batch, error_codes: Mapping[str, int] | None = None) -> Outcome:
    counts = batch.request_counts
    total, succeeded, failed = (counts.total, counts.completed, counts.failed) if counts else (0, 0, 0)
    codes = dict(error_codes or {})
    # The error file is the truth when it holds more lines than the count (an expired line, say).
    failed = max(failed, sum(codes.values()))
    errors = tuple(
        (f"line {e.line}: " if e.line else "") + f"{e.code}: {e.message}"
        for e in ((batch.errors.data if batch.errors else None) or [])[:SHOWN_VALIDATION_ERRORS]
    )
    return Outcome(batch.id, batch.status, total, succeeded, failed, codes, errors)


def count_error_codes(client: OpenAI, batch: Batch) -> dict[str, int]:
    """The batch's failed lines counted by error code, most frequent first (streams the error file)."""
    if not batch.error_file_id:
        return {}
    counts = Counter(error_code_of(line) for line in iter_file_lines(client, batch.error_file_id))
    return dict(counts.most_common())


def settle(client: OpenAI, batch: Batch) -> Outcome:
    """The outcome, with failures broken down by code once the batch has finished."""
    return outcome_of(batch, count_error_codes(client, batch) if batch.status in TERMINAL else None)
