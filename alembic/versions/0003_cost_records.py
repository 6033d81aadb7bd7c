"""create cost_records (daily cost per resource, in dollars)

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-24
"""

import sqlalchemy as sa

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "cost_records",
        sa.Column("id", sa.BigInteger, primary_key=True),
        sa.Column(
            "resource_id", sa.BigInteger, sa.ForeignKey("cloud_resources.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("usage_date", sa.Date, nullable=False),
        sa.Column("cost_usd", sa.Numeric(12, 2), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("cost_records")
