"""store costs as integer cents (data migration)

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-24

Numeric dollars become exact integer cents; every existing row is converted, and
the downgrade converts back, so no cost is lost either way.
"""

import sqlalchemy as sa

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


# Reviewed lint exceptions (dbmigrate lint): this data migration replaces cost_usd by amount_cents.
# dbmigrate: allow adding-not-nullable-field -- the same transaction's UPDATE already rewrites every row
# dbmigrate: allow ban-drop-column -- amount_cents replaces cost_usd; the downgrade restores it from amount_cents
def upgrade() -> None:
    op.add_column("cost_records", sa.Column("amount_cents", sa.BigInteger, nullable=True))
    op.execute("UPDATE cost_records SET amount_cents = round(cost_usd * 100)::bigint")
    op.alter_column("cost_records", "amount_cents", nullable=False)
    op.drop_column("cost_records", "cost_usd")


def downgrade() -> None:
    op.add_column("cost_records", sa.Column("cost_usd", sa.Numeric(12, 2), nullable=True))
    op.execute("UPDATE cost_records SET cost_usd = amount_cents / 100.0")
    op.alter_column("cost_records", "cost_usd", nullable=False)
    op.drop_column("cost_records", "amount_cents")
