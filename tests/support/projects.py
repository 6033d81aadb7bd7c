"""Another team's Alembic project, made with `alembic init` (the stock env.py that
reads sqlalchemy.url), with revisions written by the test."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

from tests.support.helpers import sql

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


# How the template's env.py builds its engine, and what projects that build a psycopg2 engine
# themselves write instead (SQLAlchemy 2.0 reads a plain postgresql:// URL as psycopg2).
TEMPLATE_ENGINE = """engine_from_config(
        config.get_section(config.config_ini_section, {}),
        prefix="sqlalchemy.",
        poolclass=pool.NullPool,
    )"""
PSYCOPG2_FROM_CONFIG = ('create_engine(config.get_main_option("sqlalchemy.url").replace("+psycopg", "+psycopg2"), '
                        "poolclass=pool.NullPool)")
PSYCOPG2_FROM_DATABASE_URL = 'create_engine(os.environ["DATABASE_URL"], poolclass=pool.NullPool)'

# Revision bodies: a table with a duplicate, and a revision that builds a unique index over it "best
# effort": the CREATE INDEX CONCURRENTLY fails, the revision goes on, and the index it leaves is invalid.
DUPLICATES = 'op.execute("CREATE TABLE t (n integer); INSERT INTO t VALUES (1), (1)")'
BEST_EFFORT_INDEX = ("with op.get_context().autocommit_block():\n"
                     "        try:\n"
                     "            op.execute('CREATE UNIQUE INDEX CONCURRENTLY ix_t_n ON t (n)')\n"
                     "        except Exception:\n"
                     "            pass")


def stock_project(base: Path, revisions: list[dict], transaction_per_migration: bool = False,
                  engine: str | None = None, models: str | None = None, version_locations: Path | None = None) -> Path:
    """Create ``base/alembic.ini`` + ``base/migrations`` and return the ini path.

    Each revision: {"revision", "down", "message", "upgrade", "downgrade"} with
    one-line Python bodies. ``transaction_per_migration`` commits each revision on
    its own, as many real projects do, so a failure leaves earlier revisions applied.
    ``engine`` replaces the template's ``engine_from_config(...)`` (e.g. PSYCOPG2_FROM_CONFIG).
    ``models``: Python that sets ``target_metadata`` (a MetaData), instead of the template's None.
    ``version_locations``: where the revisions are instead (e.g. another project's, as installed).
    """
    ini = base / "alembic.ini"
    command.init(Config(str(ini)), str(base / "migrations"), template="generic")
    env_py = base / "migrations" / "env.py"
    if transaction_per_migration:
        stock = "connection=connection, target_metadata=target_metadata"
        _edit(env_py, stock, stock + ", transaction_per_migration=True")
    if models:
        _edit(env_py, "target_metadata = None", models)
    if version_locations:
        _edit(ini, "[alembic]\n", f"[alembic]\nversion_locations = {version_locations}\n")
    if engine:
        _edit(env_py, TEMPLATE_ENGINE, engine)
        env_py.write_text("import os\nfrom sqlalchemy import create_engine\n" + env_py.read_text())
    for rev in revisions:
        body = REVISION.format(**{"down": None, "downgrade": "pass", **rev})
        (base / "migrations" / "versions" / f"{rev['revision']}.py").write_text(body)
    return ini


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{path} no longer holds {old!r}"
    path.write_text(text.replace(old, new))


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


# A real chain's noise: env.py prints, logs to stdout and starts a subprocess that writes to it;
# a revision prints online and, in its offline branch, a warning for `alembic upgrade --sql` users.
CHATTY_ENV = '''import logging, subprocess, sys
print("env.py: loading the application")
_app_log = logging.getLogger("the_application")
_app_log.disabled = False  # fileConfig(alembic.ini) below disables it for the next time env.py runs
_app_log.propagate = False  # its own handler only: not also through the root logger to stderr
if not _app_log.handlers:
    _app_log.addHandler(logging.StreamHandler(sys.stdout))
_app_log.warning("env.py: application log line")
subprocess.run(["echo", "env.py: a subprocess writes to stdout"], check=True)
'''
OFFLINE_WARNING = "All rows in the t table will be deleted"
CHATTY_UPGRADE = ("if op.get_context().as_sql:\n"
                  f"        print({OFFLINE_WARNING!r})\n"
                  "    else:\n"
                  "        print('revision: emptying t')\n"
                  "    op.execute('DELETE FROM t')")
CHATTY_NOISE = ("env.py: loading the application", "env.py: application log line",
                "env.py: a subprocess writes to stdout", "revision: emptying t", OFFLINE_WARNING)


def chatty_project(base: Path) -> Path:
    """r1 creates t; r2 empties it, printing (CHATTY_UPGRADE); env.py is CHATTY_ENV. The ini path."""
    ini = stock_project(base, linear("op.execute('CREATE TABLE t (n integer)')", CHATTY_UPGRADE))
    env_py = base / "migrations" / "env.py"
    env_py.write_text(CHATTY_ENV + env_py.read_text())
    return ini


# A table t with ROWS rows, its project at r1: where the rehearsal's and the isolation's tests start.
TABLE = "op.create_table('t', sa.Column('id', sa.Integer, primary_key=True), sa.Column('n', sa.Integer))"
ROWS = 500


def at_r1_with_rows(tmp_path, cli, url, target, *steps, transaction_per_migration=False, engine=None) -> str:
    """A stock project (TABLE, then ``steps``) whose database is at r1, the table t holding ROWS rows."""
    ini = str(stock_project(tmp_path, linear(TABLE, *steps), transaction_per_migration=transaction_per_migration,
                            engine=engine))
    assert cli("upgrade", "-r", "r1", "--yes", "--alembic-config", ini, env={"DATABASE_URL": url}).returncode == 0
    sql(target, "INSERT INTO t SELECT g, g FROM generate_series(1, %s) g", ROWS)
    return ini


# A table per revision, created up and dropped down: table_step("t1") is such a revision's pair of bodies.
CREATE = "op.create_table('{0}', sa.Column('id', sa.Integer, primary_key=True))"
DROP = "op.drop_table('{0}')"


def table_step(name: str) -> tuple[str, str]:
    return CREATE.format(name), DROP.format(name)
