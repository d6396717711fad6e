"""Shards that fail and lines that expire.

- shards.last_error: why the last attempt at a shard failed. A shard that fails twice in the same
  way is settled as `failed` (its lines reported with that error) instead of being retried forever.
- shards.expired: how many of the shard's lines were not run because the batch's completion window
  closed; a batch with any such line ends `expired`, as on OpenAI, not `completed`.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("shards", sa.Column("last_error", sa.Text, nullable=True))
    op.add_column("shards", sa.Column("expired", sa.Integer, nullable=False, server_default="0"))


def downgrade() -> None:
    op.drop_column("shards", "expired")
    op.drop_column("shards", "last_error")
