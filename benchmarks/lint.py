"""What the lint adds to an upgrade: the lint phase for ten pending revisions.

A copy of the sample project (six revisions) with four generated ones on top (an index, a
column, a foreign key, a type change), every one pending on an empty database (the embedded
local PostgreSQL unless DATABASE_URL is set). Measures the phase as a run executes it
(``phases.lint``: the server's version, each revision rendered offline on its own, one squawk
call), N times, and the upgrade of the same ten revisions for scale. Target (issue 11): the lint
adds under 1 s for ten revisions.

    python benchmarks/lint.py [--runs N]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TARGET_S = 1.0
GENERATED = (  # (upgrade, downgrade) bodies of revisions 0007..0010
    ("op.create_index('ix_accounts_name', 'accounts', ['name'])", "op.drop_index('ix_accounts_name', 'accounts')"),
    ("op.add_column('accounts', sa.Column('tier', sa.Text, nullable=False, server_default='free'))",
     "op.drop_column('accounts', 'tier')"),
    ("op.create_foreign_key('fk_rec_account', 'recommendations', 'accounts', ['resource_id'], ['id'])",
     "op.drop_constraint('fk_rec_account', 'recommendations')"),
    ("op.alter_column('accounts', 'tier', type_=sa.String(40))", "pass"),
)
REVISION = '''"""generated {number}"""
import sqlalchemy as sa
from alembic import op

revision = "{number}"
down_revision = "{down}"


def upgrade():
    {upgrade}


def downgrade():
    {downgrade}
'''


def ten_revisions(base: Path) -> Path:
    """The sample project copied under ``base``, with four generated revisions: its alembic.ini."""
    shutil.copy(REPO / "alembic.ini", base / "alembic.ini")
    shutil.copytree(REPO / "alembic", base / "alembic", ignore=shutil.ignore_patterns("__pycache__"))
    for index, (upgrade, downgrade) in enumerate(GENERATED, start=7):
        text = REVISION.format(number=f"{index:04d}", down=f"{index - 1:04d}", upgrade=upgrade, downgrade=downgrade)
        (base / "alembic" / "versions" / f"{index:04d}_generated.py").write_text(text)
    return base / "alembic.ini"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    from dbmigrate import local, phases
    from dbmigrate.settings import Settings
    from dbmigrate.target import parse_url

    work = Path(tempfile.mkdtemp(prefix="dbmigrate-bench-lint-"))
    url = os.environ.get("DATABASE_URL")
    target = parse_url(url) if url else local.target(work / "home")
    settings = Settings.from_env(home=work / "home", alembic_config=str(ten_revisions(work)), project_logging=False)
    try:
        project = settings.project(target)
        plan = phases.plan(target, project, settings, "head", True)
        assert len(plan.steps) == 10, f"{len(plan.steps)} pending revisions: lint an empty database"
        samples = []
        for _ in range(args.runs + 1):  # the first warms the page cache and imports
            started = time.perf_counter()
            result = phases.lint(target, project, settings, plan, "warning")
            samples.append(time.perf_counter() - started)
        started = time.perf_counter()
        phases.apply(target, project, settings, plan)
        upgrade_s = time.perf_counter() - started
    finally:
        if not url:
            local.stop(work / "home")
    lint_s = statistics.median(samples[1:])
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"PostgreSQL {result.pg_version}")
    print(f"lint of 10 revisions: median {lint_s * 1000:.0f} ms, max {max(samples[1:]) * 1000:.0f} ms "
          f"over {args.runs} runs ({len(result.findings())} findings)")
    print(f"the upgrade itself (empty tables): {upgrade_s * 1000:.0f} ms")
    print(f"target: under {TARGET_S:g} s -> {'met' if lint_s < TARGET_S else 'NOT met'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
