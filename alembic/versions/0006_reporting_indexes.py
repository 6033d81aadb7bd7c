"""indexes for cost reports and the open-recommendations view

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-24
"""

import sqlalchemy as sa

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_cost_records_resource_date", "cost_records", ["resource_id", "usage_date"])
    op.create_index(
        "ix_recommendations_open", "recommendations", ["resource_id"], postgresql_where=sa.text("status = 'open'")
    )


def downgrade() -> None:
    op.drop_index("ix_recommendations_open", table_name="recommendations")
    op.drop_index("ix_cost_records_resource_date", table_name="cost_records")
