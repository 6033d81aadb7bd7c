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


def stock_project(base: Path, revisions: list[dict]) -> Path:
    """Create ``base/alembic.ini`` + ``base/migrations`` and return the ini path.

    Each revision: {"revision", "down", "message", "upgrade", "downgrade"} with
    one-line Python bodies.
    """
    ini = base / "alembic.ini"
    command.init(Config(str(ini)), str(base / "migrations"), template="generic")
    for rev in revisions:
        body = REVISION.format(**{"down": None, "downgrade": "pass", **rev})
        (base / "migrations" / "versions" / f"{rev['revision']}.py").write_text(body)
    return ini


def linear(*upgrades: str, prefix: str = "r") -> list[dict]:
    """r1 <- r2 <- ...; each upgrade body given, each downgrade a no-op unless a table is created."""
    revisions = []
    for index, upgrade in enumerate(upgrades, start=1):
        revisions.append({
            "revision": f"{prefix}{index}",
            "down": f"{prefix}{index - 1}" if index > 1 else None,
            "message": f"step {index}",
            "upgrade": upgrade,
            "downgrade": "pass",
        })
    return revisions
