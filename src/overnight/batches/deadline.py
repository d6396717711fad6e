"""Whether a running batch will make its deadline: projected from its own pace so far."""

from __future__ import annotations

from overnight import constants as C
from overnight.store.records import BatchRecord

# Too early to judge a pace before this long (or this many finished lines).
_MIN_ELAPSED_SECONDS = 5.0
_MIN_LINES = 1


def deadline_warning(record: BatchRecord, now: float) -> str | None:
    """A plain sentence when, at the pace the batch has kept since it started running, its
    remaining lines will not finish before `expires_at` (those lines would end `batch_expired`);
    None when it is on track, not running, or too young to judge."""
    if record.status != C.IN_PROGRESS or record.in_progress_at is None or record.expires_at is None:
        return None
    done = record.request_completed + record.request_failed
    remaining = record.request_total - done
    elapsed = now - record.in_progress_at
    if remaining <= 0 or elapsed < _MIN_ELAPSED_SECONDS:
        return None
    left = record.expires_at - now
    if done < _MIN_LINES:
        if elapsed < left:
            return None
        return (f"No request has finished in {int(elapsed)} s; the {remaining} remaining requests are unlikely "
                f"to finish before the completion window closes in {max(int(left), 0)} s.")
    needed = remaining * elapsed / done
    if needed <= left:
        return None
    return (f"At the current pace ({done / elapsed:.2f} requests/s) the {remaining} remaining requests need "
            f"about {int(needed)} s, but the completion window closes in {max(int(left), 0)} s: requests "
            "not run by then end with 'batch_expired'.")
