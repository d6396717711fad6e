"""The metadata store: SQLAlchemy Core over SQLite (default) or PostgreSQL. All SQL lives here, one
module per concern (keys, files, batches, the work queue, housekeeping); `SqlStore` holds them."""

from overnight.store.records import BatchRecord, ClaimedShard, FileRecord, ShardPlan, ShardResult
from overnight.store.sql import SqlStore

__all__ = ["BatchRecord", "ClaimedShard", "FileRecord", "ShardPlan", "ShardResult", "SqlStore"]
