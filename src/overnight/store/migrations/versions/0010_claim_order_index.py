"""The claim's order in its index: shards by (status, shard_index, id).

A claim takes the first pending shard in (shard_index, id) order. With the index on (status,
shard_index) alone the database still sorted every pending shard to break ties by id; with id in
the index it reads the first entries in order and stops (store/queue.py).

Revision ID: 0010
Revises: 0009
"""

from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_shards_claim_order", "shards", ["status", "shard_index", "id"])
    op.drop_index("ix_shards_status_index", table_name="shards")


def downgrade() -> None:
    op.create_index("ix_shards_status_index", "shards", ["status", "shard_index"])
    op.drop_index("ix_shards_claim_order", table_name="shards")
