"""files.upload_check: what validation on upload found for a clean batch input (JSON, see
batches/upload_check.py); NULL for other files and for files uploaded before this revision.

Revision ID: 0011
Revises: 0010
"""

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("files", sa.Column("upload_check", sa.Text, nullable=True))


def downgrade() -> None:
    op.drop_column("files", "upload_check")
