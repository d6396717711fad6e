"""Housekeeping of stored bytes: remove what no row needs any more.

- bytes of deleted or expired files, once no active batch reads them;
- orphans: objects no row names (a writer that crashed before its commit, a results object of a
  lost lease), once they are `orphan_age` old: a running shard's results object is named by no
  row until its commit, so objects of active batches are kept whatever their age;
- unfinished uploads (temp files, multipart uploads) whose writer died;
- empty directories that earlier versions left behind (one per batch).
"""

from __future__ import annotations

import logging
from itertools import islice

from overnight import constants as C
from overnight.batches.ports import StorageCatalog
from overnight.files.layout import PREFIXES, batch_of_results_key
from overnight.files.port import FileStore

log = logging.getLogger("overnight.housekeeping")

# Orphans (a crashed writer's objects that no row names) are removed once this old.
ORPHAN_AGE_SECONDS = 3600.0
# Empty directories are removed once this old, so a writer that just made one is never raced.
EMPTY_DIR_AGE_SECONDS = 60.0


def collect_garbage(catalog: StorageCatalog, files: FileStore, now: float,
                    orphan_age: float = ORPHAN_AGE_SECONDS) -> int:
    """Remove bytes nothing needs; returns how many objects. Younger empty directories go too when
    `orphan_age` says no writer runs (0 while no server runs)."""
    removed = 0
    for key in catalog.collect_garbage(int(now)):
        files.delete(key)
        removed += 1
    for prefix in PREFIXES:
        # Checked and deleted 500 at a time as the listing streams (past the orphan age every
        # file is listed: held in one list, a store's every key was in memory each pass).
        old = files.list_keys(prefix, now - orphan_age)
        while chunk := list(islice(old, 500)):
            live = catalog.live_storage_keys(chunk)
            for key in chunk:
                if key not in live and not _belongs_to_active_batch(catalog, key):
                    files.delete(key)
                    removed += 1
    stale = files.abort_stale_uploads(now - orphan_age)
    if stale:
        log.info("discarded %d unfinished uploads", stale)
    dirs = files.remove_empty_dirs(now - min(orphan_age, EMPTY_DIR_AGE_SECONDS))
    if dirs:
        log.info("removed %d empty directories", dirs)
    return removed


def _belongs_to_active_batch(catalog: StorageCatalog, key: str) -> bool:
    """A results object of a running shard is named by no row until its commit."""
    batch_id = batch_of_results_key(key)
    return batch_id is not None and catalog.batch_status(batch_id) in C.ACTIVE_STATES
