"""Uploads and their parts (their bytes live in the file store under `storage_key`).

Every change to an upload's parts happens in the transaction that checks the upload is still
pending and unexpired, so a part never joins an upload that was completed, cancelled or expired
meanwhile, and completing publishes the File, ends the upload and drops its part rows at once.
The caller removes the parts' bytes after the commit (housekeeping sweeps what a crash leaves)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection, bindparam, delete, func, insert, select, update

from overnight import constants as C
from overnight.store import schema as T
from overnight.store.database import Database
from overnight.store.records import FileRecord, UploadPartRecord, UploadRecord
from overnight.store.rows import INSERT_FILE, file_values, storable

_u, _p = T.uploads, T.upload_parts
_INSERT_UPLOAD = insert(_u)
_INSERT_PART = insert(_p)
_GET = select(_u).where(_u.c.id == bindparam("p_upload"), _u.c.owner == bindparam("p_owner"))
# FOR UPDATE: on PostgreSQL a part, a completion and a cancel of one upload take turns (SQLite's
# BEGIN IMMEDIATE already serializes writers).
_LOCK = _GET.with_for_update()
_RECEIVED = select(func.coalesce(func.sum(_p.c.bytes), 0)).where(_p.c.upload_id == bindparam("p_upload"))
_PARTS_IN = select(_p).where(
    _p.c.upload_id == bindparam("p_upload"), _p.c.id.in_(bindparam("p_ids", expanding=True))
)
_PART_KEYS_OF = select(_p.c.storage_key).where(_p.c.upload_id == bindparam("p_upload"))
_DELETE_PARTS_OF = delete(_p).where(_p.c.upload_id == bindparam("p_upload"))
_END = (
    update(_u)
    .where(_u.c.id == bindparam("p_upload"), _u.c.status == C.UPLOAD_PENDING)
    .values(status=bindparam("p_status"), file_id=bindparam("p_file_id"))
)
# Housekeeping: pending uploads past their hour, and the parts they (or a crash) left behind.
_EXPIRED = select(_u.c.id).where(_u.c.status == C.UPLOAD_PENDING, _u.c.expires_at <= bindparam("p_now")).limit(500)
_MARK_EXPIRED = (
    update(_u).where(_u.c.id.in_(bindparam("p_ids", expanding=True)), _u.c.status == C.UPLOAD_PENDING)
    .values(status=C.UPLOAD_EXPIRED)
)
_PARTS_OF_IDS = select(_p.c.id, _p.c.storage_key).where(_p.c.upload_id.in_(bindparam("p_ids", expanding=True)))
_DELETE_PARTS_IDS = delete(_p).where(_p.c.id.in_(bindparam("p_ids", expanding=True)))
# Ended uploads are forgotten a day after they expired (calls on them answer 404 from then on).
_FORGET = delete(_u).where(_u.c.expires_at <= bindparam("p_before"), _u.c.status != C.UPLOAD_PENDING)
PART_KEYS_IN = select(_p.c.storage_key).where(_p.c.storage_key.in_(bindparam("p_keys", expanding=True)))
FORGET_AFTER_SECONDS = 24 * 3600


def upload_record(row: Any) -> UploadRecord:
    m = row._mapping
    return UploadRecord(**{name: m[name] for name in UploadRecord.__slots__})


def part_record(row: Any) -> UploadPartRecord:
    m = row._mapping
    return UploadPartRecord(**{name: m[name] for name in UploadPartRecord.__slots__})


def _values(record: UploadRecord | UploadPartRecord) -> dict[str, Any]:
    return {name: getattr(record, name) for name in record.__slots__}


class SqlUploadStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    def insert_upload(self, record: UploadRecord) -> None:
        with self.db.write() as conn:
            conn.execute(_INSERT_UPLOAD, _values(record))

    def get_upload(self, owner: str, upload_id: str) -> UploadRecord | None:
        if not storable(upload_id):
            return None
        with self.db.read() as conn:
            row = conn.execute(_GET, {"p_upload": upload_id, "p_owner": owner}).first()
        return upload_record(row) if row else None

    def received_bytes(self, upload_id: str) -> int:
        with self.db.read() as conn:
            return int(conn.execute(_RECEIVED, {"p_upload": upload_id}).scalar() or 0)

    def add_part(self, owner: str, part: UploadPartRecord, now: int, max_bytes: int) -> tuple[UploadRecord | None, bool]:
        """Record `part` if its upload is pending and unexpired at `now` and its parts stay within
        `max_bytes`: the upload as it was (None: no such upload of `owner`), and whether the part
        was recorded. Under the upload's lock, so parts sent at once cannot all fit together."""
        with self.db.write() as conn:
            upload = _locked(conn, owner, part.upload_id)
            if upload is None or not _pending(upload, now):
                return upload, False
            received = int(conn.execute(_RECEIVED, {"p_upload": part.upload_id}).scalar() or 0)
            if received + part.bytes > max_bytes:
                return upload, False
            conn.execute(_INSERT_PART, _values(part))
            return upload, True

    def parts(self, upload_id: str, part_ids: Sequence[str]) -> list[UploadPartRecord]:
        """The parts of `upload_id` among `part_ids` (in no particular order)."""
        if not part_ids or not storable(*part_ids):
            return []
        with self.db.read() as conn:
            rows = conn.execute(_PARTS_IN, {"p_upload": upload_id, "p_ids": list(part_ids)}).all()
        return [part_record(r) for r in rows]

    def complete_upload(self, owner: str, upload_id: str, file: FileRecord, now: int) -> list[str] | None:
        """Publish `file`, mark the upload completed and drop its part rows, if it is still pending
        and unexpired; the parts' storage keys (None: it was not, and nothing was written)."""
        with self.db.write() as conn:
            upload = _locked(conn, owner, upload_id)
            if upload is None or not _pending(upload, now):
                return None
            conn.execute(INSERT_FILE, file_values(file))
            return _end(conn, upload_id, C.UPLOAD_COMPLETED, file.id)

    def cancel_upload(self, owner: str, upload_id: str, now: int) -> tuple[UploadRecord | None, list[str]]:
        """Cancel a pending, unexpired upload and drop its part rows: the upload as it was before,
        and the parts' storage keys (none if it was not cancelled)."""
        with self.db.write() as conn:
            upload = _locked(conn, owner, upload_id)
            if upload is None or not _pending(upload, now):
                return upload, []
            return upload, _end(conn, upload_id, C.UPLOAD_CANCELLED, None)

    def expire_uploads(self, now: int) -> list[str]:
        """Mark pending uploads past their expiry `expired`, drop their part rows and forget
        uploads that ended long ago; the storage keys of the dropped parts."""
        with self.db.write() as conn:
            ids = list(conn.execute(_EXPIRED, {"p_now": now}).scalars())
            keys: list[str] = []
            if ids:
                conn.execute(_MARK_EXPIRED, {"p_ids": ids})
                parts = conn.execute(_PARTS_OF_IDS, {"p_ids": ids}).all()
                if parts:
                    conn.execute(_DELETE_PARTS_IDS, {"p_ids": [p.id for p in parts]})
                keys = [p.storage_key for p in parts]
            conn.execute(_FORGET, {"p_before": now - FORGET_AFTER_SECONDS})
        return keys


def _locked(conn: Connection, owner: str, upload_id: str) -> UploadRecord | None:
    if not storable(upload_id):
        return None
    row = conn.execute(_LOCK, {"p_upload": upload_id, "p_owner": owner}).first()
    return upload_record(row) if row else None


def _pending(upload: UploadRecord, now: int) -> bool:
    return upload.status == C.UPLOAD_PENDING and now < upload.expires_at


def _end(conn: Connection, upload_id: str, status: str, file_id: str | None) -> list[str]:
    keys = list(conn.execute(_PART_KEYS_OF, {"p_upload": upload_id}).scalars())
    conn.execute(_END, {"p_upload": upload_id, "p_status": status, "p_file_id": file_id})
    conn.execute(_DELETE_PARTS_OF, {"p_upload": upload_id})
    return keys
