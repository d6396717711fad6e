"""Results objects in two sections: shards.result_output_bytes is the length of the output section.

Shards committed before this revision have NULL there and tagged lines in their results object;
finalize still reads those.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("shards", sa.Column("result_output_bytes", sa.BigInteger, nullable=True))


def downgrade() -> None:
    op.drop_column("shards", "result_output_bytes")
