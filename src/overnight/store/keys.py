"""API key hashes (only sha256 digests are kept), and the owner each one stands for."""

from __future__ import annotations

from sqlalchemy import bindparam, insert, select

from overnight.store import schema as T
from overnight.store.database import Database

_k = T.api_keys
_ALL_KEYS = select(_k.c.key_hash, _k.c.owner, _k.c.is_admin)
_ADD_KEY = insert(_k).values(
    key_hash=bindparam("p_hash"), owner=bindparam("p_owner"), is_admin=bindparam("p_admin"),
    created_at=bindparam("p_now"),
)


class SqlKeyStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    def stored_key_hashes(self) -> dict[str, tuple[str, bool]]:
        """sha256 hex digest -> (owner, is_admin)."""
        with self.db.read() as conn:
            return {r.key_hash: (r.owner, bool(r.is_admin)) for r in conn.execute(_ALL_KEYS)}

    def add_key_hash(self, key_hash: str, owner: str, is_admin: bool, now: int) -> None:
        with self.db.write() as conn:
            conn.execute(_ADD_KEY, {"p_hash": key_hash, "p_owner": owner, "p_admin": is_admin, "p_now": now})
