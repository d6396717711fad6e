"""Initial schema: api_keys, files, batches, shards.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

AutoId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _counter(name: str) -> sa.Column[int]:
    return sa.Column(name, sa.BigInteger, nullable=False)


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("key_hash", sa.String(64), primary_key=True),
        sa.Column("owner", sa.String(64), nullable=False),
        sa.Column("is_admin", sa.Boolean, nullable=False),
        sa.Column("created_at", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "files",
        sa.Column("seq", AutoId, primary_key=True, autoincrement=True),
        sa.Column("id", sa.String(64), nullable=False, unique=True),
        sa.Column("owner", sa.String(64), nullable=False),
        sa.Column("purpose", sa.String(32), nullable=False),
        sa.Column("filename", sa.Text, nullable=False),
        sa.Column("bytes", sa.BigInteger, nullable=False),
        sa.Column("created_at", sa.BigInteger, nullable=False),
        sa.Column("expires_at", sa.BigInteger),
        sa.Column("storage_key", sa.Text, nullable=False),
        sa.Column("deleted_at", sa.BigInteger),
    )
    op.create_index("ix_files_owner_seq", "files", ["owner", "seq"])
    stamps = [
        "in_progress_at",
        "expires_at",
        "finalizing_at",
        "completed_at",
        "failed_at",
        "expired_at",
        "cancelling_at",
        "cancelled_at",
    ]
    counters = [
        "request_total",
        "request_completed",
        "request_failed",
        "input_tokens",
        "cached_tokens",
        "output_tokens",
        "reasoning_tokens",
    ]
    op.create_table(
        "batches",
        sa.Column("seq", AutoId, primary_key=True, autoincrement=True),
        sa.Column("id", sa.String(64), nullable=False, unique=True),
        sa.Column("owner", sa.String(64), nullable=False),
        sa.Column("endpoint", sa.String(64), nullable=False),
        sa.Column("input_file_id", sa.String(64), nullable=False),
        sa.Column("completion_window", sa.String(16), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("created_at", sa.BigInteger, nullable=False),
        *[sa.Column(name, sa.BigInteger) for name in stamps],
        sa.Column("output_file_id", sa.String(64)),
        sa.Column("error_file_id", sa.String(64)),
        sa.Column("errors_json", sa.Text),
        sa.Column("metadata_json", sa.Text),
        sa.Column("model", sa.Text),
        sa.Column("output_expires_after", sa.BigInteger),
        *[_counter(name) for name in counters],
        sa.Column("lease_token", sa.String(32)),
        sa.Column("lease_expires_at", sa.Float),
    )
    op.create_index("ix_batches_owner_seq", "batches", ["owner", "seq"])
    op.create_index("ix_batches_status", "batches", ["status"])
    op.create_table(
        "shards",
        sa.Column("id", AutoId, primary_key=True, autoincrement=True),
        sa.Column("batch_id", sa.String(64), nullable=False),
        sa.Column("shard_index", sa.Integer, nullable=False),
        sa.Column("first_request", sa.BigInteger, nullable=False),
        sa.Column("request_count", sa.Integer, nullable=False),
        sa.Column("byte_offset", sa.BigInteger, nullable=False),
        sa.Column("byte_length", sa.BigInteger, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("lease_token", sa.String(32)),
        sa.Column("lease_expires_at", sa.Float),
        sa.Column("result_key", sa.Text),
        sa.Column("completed", sa.Integer, nullable=False),
        sa.Column("failed", sa.Integer, nullable=False),
        *[_counter(name) for name in ["input_tokens", "cached_tokens", "output_tokens", "reasoning_tokens"]],
        sa.Column("model", sa.Text),
        sa.UniqueConstraint("batch_id", "shard_index", name="uq_shards_batch_index"),
    )
    op.create_index("ix_shards_status_index", "shards", ["status", "shard_index"])
    op.create_index("ix_shards_batch_status", "shards", ["batch_id", "status"])


def downgrade() -> None:
    for table in ("shards", "batches", "files", "api_keys"):
        op.drop_table(table)
