"""The file catalog: file records (their bytes live in the file store under `storage_key`).

A deleted file is hidden at once (`deleted_at`); its bytes go when housekeeping finds that no active
batch reads it, its row a day later (a list cursor meanwhile: store/housekeeping.py)."""

from __future__ import annotations

from sqlalchemy import bindparam, select, update

from overnight.store import schema as T
from overnight.store.database import Database
from overnight.store.records import FileRecord
from overnight.store.rows import INSERT_FILE, VISIBLE_FILE, file_record, file_values, owned, storable

_f = T.files
# A page of files leaves out what validation on upload stored (up to tens of KB a file).
_LISTED = [c for c in _f.c if c.name != "upload_check"]
# Scoped to an owner, and the admin view of every owner.
_GET_FILE = {
    True: select(_f).where(_f.c.id == bindparam("p_file"), _f.c.owner == bindparam("p_owner"), VISIBLE_FILE),
    False: select(_f).where(_f.c.id == bindparam("p_file"), VISIBLE_FILE),
}


class SqlFileCatalog:
    def __init__(self, db: Database) -> None:
        self.db = db

    def insert_file(self, record: FileRecord) -> None:
        with self.db.write() as conn:
            conn.execute(INSERT_FILE, file_values(record))

    def get_file(self, owner: str | None, file_id: str, now: int) -> FileRecord | None:
        if not storable(file_id):
            return None
        with self.db.read() as conn:
            row = conn.execute(
                _GET_FILE[owner is not None], {"p_file": file_id, "p_owner": owner, "p_now": now}
            ).first()
        return file_record(row) if row else None

    def list_files(
        self, owner: str | None, purpose: str | None, after: str | None, limit: int, order: str, now: int
    ) -> tuple[list[FileRecord], bool] | None:
        """A page of files and whether more follow; None when the `after` cursor is unknown."""
        if not storable(after):
            return None
        if not storable(purpose):
            return [], False
        descending = order == "desc"
        query = select(*_LISTED).where(owned(_f, owner), VISIBLE_FILE)
        if purpose:
            query = query.where(_f.c.purpose == purpose)
        with self.db.read() as conn:
            if after:
                cursor = conn.execute(select(_f.c.seq).where(_f.c.id == after, owned(_f, owner))).scalar()
                if cursor is None:
                    return None
                query = query.where(_f.c.seq < cursor if descending else _f.c.seq > cursor)
            query = query.order_by(_f.c.seq.desc() if descending else _f.c.seq.asc())
            rows = conn.execute(query.limit(limit + 1), {"p_now": now}).all()
        return [file_record(r) for r in rows[:limit]], len(rows) > limit

    def delete_file(self, owner: str | None, file_id: str, now: int) -> bool:
        """Hide the file at once; housekeeping removes its bytes once nothing reads them (its row later)."""
        if not storable(file_id):
            return False
        with self.db.write() as conn:
            result = conn.execute(
                update(_f).where(_f.c.id == file_id, owned(_f, owner), VISIBLE_FILE).values(deleted_at=now),
                {"p_now": now},
            )
            return result.rowcount > 0
