"""shards.handed_back: claims handed back unfinished (a storage or database outage, a graceful
stop), which do not count against max_shard_attempts as claims that died do.

Revision ID: 0012
Revises: 0011
"""

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("shards", sa.Column("handed_back", sa.Integer, nullable=False, server_default="0"))


def downgrade() -> None:
    op.drop_column("shards", "handed_back")
