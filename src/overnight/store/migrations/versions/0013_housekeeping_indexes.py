"""Indexes for housekeeping's lookups by storage key and by time of death.

Every janitor pass lists the stored objects past the orphan age and asks, 500 keys at a time,
which are still named by a file, a shard's results or an upload part: without an index on those
keys each question scanned the whole table (a store of a million files: 2,000 scans of a million
rows a pass, every minute). Gone files are found by deleted_at or expires_at, and the rows kept a
day as list cursors by their empty storage key, both scans of files before.

Revision ID: 0013
Revises: 0012
"""

from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_files_storage_key", "files", ["storage_key"])
    op.create_index("ix_files_deleted_at", "files", ["deleted_at"])
    op.create_index("ix_files_expires_at", "files", ["expires_at"])
    op.create_index("ix_shards_result_key", "shards", ["result_key"])
    op.create_index("ix_upload_parts_storage_key", "upload_parts", ["storage_key"])


def downgrade() -> None:
    op.drop_index("ix_upload_parts_storage_key", table_name="upload_parts")
    op.drop_index("ix_shards_result_key", table_name="shards")
    op.drop_index("ix_files_expires_at", table_name="files")
    op.drop_index("ix_files_deleted_at", table_name="files")
    op.drop_index("ix_files_storage_key", table_name="files")
