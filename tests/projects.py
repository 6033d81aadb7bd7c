"""Another team's Alembic project, made with `alembic init` (the stock env.py that
reads sqlalchemy.url), with revisions written by the test."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

REVISION = '''"""{message}"""
from alembic import op
import sqlalchemy as sa

revision = {revision!r}
down_revision = {down!r}
branch_labels = None
depends_on = None


def upgrade():
    {upgrade}


def downgrade():
    {downgrade}
'''


def stock_project(base: Path, revisions: list[dict], transaction_per_migration: bool = False) -> Path:
    """Create ``base/alembic.ini`` + ``base/migrations`` and return the ini path.

    Each revision: {"revision", "down", "message", "upgrade", "downgrade"} with
    one-line Python bodies. ``transaction_per_migration`` commits each revision on
    its own, as many real projects do, so a failure leaves earlier revisions applied.
    """
    ini = base / "alembic.ini"
    command.init(Config(str(ini)), str(base / "migrations"), template="generic")
    if transaction_per_migration:
        env_py = base / "migrations" / "env.py"
        stock = "connection=connection, target_metadata=target_metadata"
        assert stock in env_py.read_text()
        env_py.write_text(env_py.read_text().replace(stock, stock + ", transaction_per_migration=True"))
    for rev in revisions:
        body = REVISION.format(**{"down": None, "downgrade": "pass", **rev})
        (base / "migrations" / "versions" / f"{rev['revision']}.py").write_text(body)
    return ini


def linear(*steps: str | tuple[str, str], prefix: str = "r") -> list[dict]:
    """r1 <- r2 <- ...; each step an upgrade body, or (upgrade, downgrade) bodies."""
    revisions = []
    for index, step in enumerate(steps, start=1):
        upgrade, downgrade = step if isinstance(step, tuple) else (step, "pass")
        revisions.append({
            "revision": f"{prefix}{index}",
            "down": f"{prefix}{index - 1}" if index > 1 else None,
            "message": f"step {index}",
            "upgrade": upgrade,
            "downgrade": downgrade,
        })
    return revisions
