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


# Reviewed lint exception (dbmigrate lint): the sample's tables hold at most a few thousand rows, so a plain
# CREATE INDEX blocks their writes for milliseconds; CONCURRENTLY would need an autocommit block, outside the
# revision's transaction, and a failed build would leave an invalid index behind.
# dbmigrate: allow require-concurrent-index-creation -- small tables: the build blocks writes for milliseconds
def upgrade() -> None:
    op.create_index("ix_cost_records_resource_date", "cost_records", ["resource_id", "usage_date"])
    op.create_index(
        "ix_recommendations_open", "recommendations", ["resource_id"], postgresql_where=sa.text("status = 'open'")
    )


def downgrade() -> None:
    op.drop_index("ix_recommendations_open", table_name="recommendations")
    op.drop_index("ix_cost_records_resource_date", table_name="cost_records")
