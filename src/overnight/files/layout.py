"""Where objects live in the file store: the one place that knows the key layout.

    files/<file_id>                                   a file's bytes (uploads, output and error files;
                                                      the results of a batch's only shard are
                                                      written here, to be published as its output)
    results/<batch_id>/<shard_index>.<attempt>.jsonl  one attempt's results of one shard
    uploads/<upload_id>/<part_id>                     one part of an upload in progress
"""

from __future__ import annotations

FILES_PREFIX = "files/"
RESULTS_PREFIX = "results/"
UPLOADS_PREFIX = "uploads/"
# Everything housekeeping sweeps orphans from.
PREFIXES = (FILES_PREFIX, RESULTS_PREFIX, UPLOADS_PREFIX)


def file_key(file_id: str) -> str:
    return f"{FILES_PREFIX}{file_id}"


def upload_part_key(upload_id: str, part_id: str) -> str:
    return f"{UPLOADS_PREFIX}{upload_id}/{part_id}"


def results_key(batch_id: str, shard_index: int, attempt: int) -> str:
    """Each attempt writes its own object, so a stale attempt never overwrites a committed one."""
    return f"{RESULTS_PREFIX}{batch_id}/{shard_index:07d}.{attempt}.jsonl"


def batch_of_results_key(key: str) -> str | None:
    """The batch a results object belongs to; None for any other key."""
    if not key.startswith(RESULTS_PREFIX):
        return None
    return key[len(RESULTS_PREFIX) :].split("/", 1)[0] or None
