"""Seeing batches run.

- batches.request_id: the x-request-id of the API call that created the batch, so every worker
  event of the batch is logged with it (observability/logs.py): one id ties a client's call to
  what happened to its batch on whatever machine. The user's metadata is theirs and is not touched.
- shards.started_at / shards.finished_at: when the current attempt was claimed and committed (the
  database's clock), so a batch's throughput over the last minute and its ETA come from the store
  (batches/progress.py), the same on every API replica, with no per-line work.

Revision ID: 0009
Revises: 0008
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("batches", sa.Column("request_id", sa.String(64), nullable=True))
    op.add_column("shards", sa.Column("started_at", sa.Float, nullable=True))
    op.add_column("shards", sa.Column("finished_at", sa.Float, nullable=True))


def downgrade() -> None:
    op.drop_column("shards", "finished_at")
    op.drop_column("shards", "started_at")
    op.drop_column("batches", "request_id")
