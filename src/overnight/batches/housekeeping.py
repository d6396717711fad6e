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


class OrphanSightings:
    """Old objects no row named, as one pass saw them: the next pass deletes only those it finds
    unnamed again. An object's age alone cannot say that its writer is done: on AWS a multipart
    object's LastModified is the time its upload *started*, so one written over more than the orphan
    age looks old the moment it exists, before the commit that names it, and a pass in between would
    delete it. Seen unnamed by two passes a janitor interval apart, it is an orphan. Holds at most
    `bound` keys (the rest are seen again by a later pass)."""

    def __init__(self, bound: int = 100_000) -> None:
        self.bound = bound
        self.keys: set[str] = set()


def collect_garbage(catalog: StorageCatalog, files: FileStore, now: float,
                    orphan_age: float = ORPHAN_AGE_SECONDS, sightings: OrphanSightings | None = None) -> int:
    """Remove bytes nothing needs; returns how many objects. Orphans go when `sightings` saw them
    in the previous pass too; without it, at once (only while nothing writes: no server runs).
    Younger empty directories go too when `orphan_age` says no writer runs (0 while no server runs)."""
    removed = 0
    for key in catalog.collect_garbage(int(now)):
        files.delete(key)
        removed += 1
    unnamed: set[str] = set()
    for prefix in PREFIXES:
        # Checked and deleted 500 at a time as the listing streams (past the orphan age every
        # file is listed: held in one list, a store's every key was in memory each pass).
        old = files.list_keys(prefix, now - orphan_age)
        while chunk := list(islice(old, 500)):
            live = catalog.live_storage_keys(chunk)
            for key in chunk:
                if key in live or _belongs_to_active_batch(catalog, key):
                    continue
                if sightings is None or key in sightings.keys:
                    files.delete(key)
                    removed += 1
                elif len(unnamed) < sightings.bound:
                    unnamed.add(key)
    if sightings is not None:
        sightings.keys = unnamed
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
