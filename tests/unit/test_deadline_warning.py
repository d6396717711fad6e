"""The deadline warning: a running batch's pace so far, projected against its window."""

from __future__ import annotations

from dataclasses import replace

from overnight.batches.deadline import deadline_warning
from overnight.store.records import BatchRecord

RUNNING = BatchRecord(
    id="batch_x", owner="o", endpoint="/v1/chat/completions", input_file_id="file-x", completion_window="1h",
    status="in_progress", created_at=1000, expires_at=1000 + 3600, in_progress_at=1000, request_total=1000,
)


def test_on_pace_batch_has_no_warning() -> None:
    # 500 of 1000 in 600 s: 600 s more, 3000 s left.
    assert deadline_warning(replace(RUNNING, request_completed=400, request_failed=100), 1600) is None


def test_late_batch_is_warned_with_its_numbers() -> None:
    # 100 of 1000 in 600 s: 5400 s more, 3000 s left.
    warning = deadline_warning(replace(RUNNING, request_completed=100), 1600)
    assert warning is not None
    assert "900 remaining requests need about 5400 s" in warning and "closes in 3000 s" in warning


def test_no_judgement_too_early_when_done_or_not_running() -> None:
    assert deadline_warning(RUNNING, 1002) is None  # too young
    assert deadline_warning(replace(RUNNING, request_completed=1000), 1600) is None
    assert deadline_warning(replace(RUNNING, status="completed", request_completed=1), 1600) is None


def test_nothing_finished_for_longer_than_what_is_left() -> None:
    assert deadline_warning(RUNNING, 1600) is None  # 600 s without a line, 3000 s left: too early to say
    warning = deadline_warning(RUNNING, 3000)  # 2000 s without a line, 1600 s left
    assert warning is not None and "No request has finished in 2000 s" in warning
