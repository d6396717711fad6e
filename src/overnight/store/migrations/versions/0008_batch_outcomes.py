"""Outcomes, retries and results while running.

- shards.error_codes: JSON `{code: count}` of the shard's error lines, written at commit (the
  shard runner knows each failed line's code), so finalize sums codes without reading lines.
- batches.outcome_json: the finished batch's `{"completed", "failed", "errors_by_code"}`.
- batches.retry_of: the batch whose failed lines this batch re-runs (POST /v1/batches/{id}/retry);
  indexed, so the joined results of a batch and its retries follow the chain without a scan.

Revision ID: 0008
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("shards", sa.Column("error_codes", sa.Text, nullable=True))
    op.add_column("batches", sa.Column("outcome_json", sa.Text, nullable=True))
    op.add_column("batches", sa.Column("retry_of", sa.String(64), nullable=True))
    op.create_index("ix_batches_retry_of", "batches", ["retry_of"])


def downgrade() -> None:
    op.drop_index("ix_batches_retry_of", table_name="batches")
    op.drop_column("batches", "retry_of")
    op.drop_column("batches", "outcome_json")
    op.drop_column("shards", "error_codes")
