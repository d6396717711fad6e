"""Metadata port and its SQLAlchemy adapter (SQLite by default, PostgreSQL by URL). All SQL lives here."""

from overnight.store.metadata import MetadataStore
from overnight.store.records import BatchRecord, ClaimedShard, FileRecord, ShardPlan, ShardResult

__all__ = ["BatchRecord", "ClaimedShard", "FileRecord", "MetadataStore", "ShardPlan", "ShardResult"]
