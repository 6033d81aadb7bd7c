"""The Cloud Optimizer schema at head, for `alembic revision --autogenerate`.
Keep it equal to what the revisions build (pytest-alembic checks that)."""

from sqlalchemy import (
    BigInteger, Column, Date, DateTime, ForeignKey, Index, MetaData, Numeric, String, Table,
    UniqueConstraint, func, text,
)
from sqlalchemy.dialects.postgresql import JSONB

metadata = MetaData()

accounts = Table(
    "accounts", metadata,
    Column("id", BigInteger, primary_key=True),
    Column("name", String(200), nullable=False),
    Column("provider", String(20), nullable=False),
    Column("external_id", String(64), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    UniqueConstraint("provider", "external_id", name="uq_accounts_provider_external_id"),
)

cloud_resources = Table(
    "cloud_resources", metadata,
    Column("id", BigInteger, primary_key=True),
    Column("account_id", BigInteger, ForeignKey("accounts.id", ondelete="CASCADE"), nullable=False),
    Column("resource_type", String(64), nullable=False),
    Column("region", String(32), nullable=False),
    Column("name", String(255), nullable=False),
    Column("tags", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)

cost_records = Table(
    "cost_records", metadata,
    Column("id", BigInteger, primary_key=True),
    Column("resource_id", BigInteger, ForeignKey("cloud_resources.id", ondelete="CASCADE"), nullable=False),
    Column("usage_date", Date, nullable=False),
    Column("amount_cents", BigInteger, nullable=False),
    Index("ix_cost_records_resource_date", "resource_id", "usage_date"),
)

recommendations = Table(
    "recommendations", metadata,
    Column("id", BigInteger, primary_key=True),
    Column("resource_id", BigInteger, ForeignKey("cloud_resources.id", ondelete="CASCADE"), nullable=False),
    Column("kind", String(40), nullable=False),
    Column("estimated_monthly_savings", Numeric(12, 2), nullable=False),
    Column("status", String(20), nullable=False, server_default="open"),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Index("ix_recommendations_open", "resource_id", postgresql_where=text("status = 'open'")),
)
