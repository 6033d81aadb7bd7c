"""The main job, through the command line, against a real PostgreSQL."""

import json
import subprocess
import time

import pytest

from dbmigrate import guard, pgtools
from tests.support.helpers import (
    SAMPLE_HEAD,
    fingerprint_of,
    last_report,
    libpq_url,
    one_line_error,
    reports_in,
    scalar,
    session,
    sql,
)
from tests.support.projects import PSYCOPG2_FROM_CONFIG, PSYCOPG2_FROM_DATABASE_URL, linear, stock_project

ALL = ["0001", "0002", "0003", "0004", "0005", "0006"]


def test_status_health_check_and_heads_on_a_fresh_database(cli, url):
    env = {"DATABASE_URL": url}
    status = cli("status", "--json", env=env)
    assert status.returncode == 0, status.stderr
    state = json.loads(status.stdout)
    assert state["current"] == [] and state["heads"] == [SAMPLE_HEAD]
    assert [p["revision"] for p in state["pending"]] == ALL
    assert state["database"]["port"] and "password" not in state["database"]

    health = cli("health", "--json", env=env)
    assert health.returncode == 0, health.stderr
    checks = {c["name"]: c for c in json.loads(health.stdout)["checks"]}
    assert set(checks) == {"connection", "disk_space", "alembic_version", "pending_revisions", "invalid_indexes",
                           "scratch_databases"}
    assert all(c["status"] == "ok" and c["duration_s"] >= 0 for c in checks.values())
    assert "first-time migration" in checks["alembic_version"]["detail"]
    assert checks["disk_space"]["data"]["writable"] and checks["disk_space"]["data"]["free_bytes"] > 0
    assert checks["connection"]["data"]["server_version"]

    check = cli("check", env=env)
    assert check.returncode == 1 and "6 revision(s) pending" in check.stdout

    heads = cli("heads")
    assert heads.returncode == 0 and heads.stdout.startswith(f"{SAMPLE_HEAD} (head)")


def test_upgrade_with_backup_migrates_reports_and_backs_up(cli, url, target, home, tmp_path):
    copy = tmp_path / "copy.json"
    result = cli("upgrade", "--backup", "--yes", "--json-report", str(copy), env={"DATABASE_URL": url})
    assert result.returncode == 0, result.stderr
    assert "succeeded: base -> 0006" in result.stdout

    tables = {name for (name,) in sql(target, "SELECT tablename FROM pg_tables WHERE schemaname='public'")}
    version = scalar(target, "SELECT version_num FROM alembic_version")
    assert {"accounts", "cloud_resources", "cost_records", "recommendations"} <= tables
    assert version == SAMPLE_HEAD

    [report_path] = reports_in(home)
    assert report_path.name.endswith("-head.json")
    report = json.loads(report_path.read_text())
    assert json.loads(copy.read_text()) == report
    assert report["status"] == "succeeded" and report["error"] is None
    assert report["revision_before"] is None and report["revision_after"] == SAMPLE_HEAD
    assert [m["revision"] for m in report["migrations_applied"]] == ALL
    assert all(m["duration_s"] >= 0 and m["message"] for m in report["migrations_applied"])
    assert report["database"]["name"] == target.database and report["environment"] == "url"
    assert report["duration_s"] >= 0 and report["started_at"] < report["finished_at"]
    assert {c["name"] for c in report["health_checks"]} >= {"connection", "disk_space"}
    assert {c["name"]: c["status"] for c in report["validation"]} == {"database_answers": "ok", "invalid_indexes": "ok",
                                                                      "revision": "ok"}

    backup = report["backup"]
    dump = home / "backups" / "url" / target.database
    [dump_file] = list(dump.glob("*-base.dump"))
    assert backup["location"] == str(dump_file) and backup["size_bytes"] == dump_file.stat().st_size
    import hashlib

    assert hashlib.sha256(dump_file.read_bytes()).hexdigest() == backup["sha256"]
    pg_restore = pgtools.find("pg_restore", 16)
    listing = subprocess.run([str(pg_restore), "--list", str(dump_file)], capture_output=True, text=True)
    assert listing.returncode == 0 and "Format: CUSTOM" in listing.stdout

    again = cli("upgrade", "--backup", "--yes", env={"DATABASE_URL": url})
    assert again.returncode == 0 and "nothing to do: database already at 0006" in again.stdout
    assert last_report(home)["status"] == "noop"
    assert len(list(dump.glob("*.dump"))) == 1, "a no-op run must not take a backup"


def test_data_migration_converts_costs_both_ways(cli, url, target):
    env = {"DATABASE_URL": url}
    assert cli("upgrade", "-r", "0004", "--yes", env=env).returncode == 0
    sql(target, "INSERT INTO accounts (id, name, provider, external_id) VALUES (1, 'prod', 'aws', '123'); "
                "INSERT INTO cloud_resources (id, account_id, resource_type, region, name) "
                "VALUES (1, 1, 'ec2', 'eu-west-1', 'web-1'); "
                "INSERT INTO cost_records (resource_id, usage_date, cost_usd) "
                "VALUES (1, '2026-11-01', 12.34), (1, '2026-11-02', 0.05)")

    assert cli("upgrade", "--yes", env=env).returncode == 0
    assert sql(target, "SELECT amount_cents FROM cost_records ORDER BY usage_date") == [(1234,), (5,)]

    down = cli("downgrade", "-r", "0004", "--yes", env=env)
    assert down.returncode == 0, down.stderr
    assert "succeeded: 0006 -> 0004" in down.stdout
    assert sql(target, "SELECT cost_usd::text FROM cost_records ORDER BY usage_date") == [("12.34",), ("0.05",)]


def test_dry_run_prints_sql_and_changes_nothing(cli, url, target, home):
    env = {"DATABASE_URL": url}
    assert cli("upgrade", "-r", "0002", "--yes", env=env).returncode == 0
    before = fingerprint_of(target)
    result = cli("upgrade", "--dry-run", env=env)
    assert result.returncode == 0, result.stderr
    assert "CREATE TABLE cost_records" in result.stdout
    assert "CREATE TABLE accounts" not in result.stdout, "the SQL must start at the current revision"
    assert "UPDATE alembic_version SET version_num='0006'" in result.stdout
    assert fingerprint_of(target) == before
    assert last_report(home)["status"] == "dry_run"

    down = cli("downgrade", "-r", "base", "--dry-run", env=env)
    assert down.returncode == 0 and "DROP TABLE accounts" in down.stdout
    assert fingerprint_of(target) == before


def test_without_yes_and_without_a_terminal_it_refuses(cli, url, target):
    before = fingerprint_of(target)
    result = cli("upgrade", env={"DATABASE_URL": url})
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "dbmigrate: error: refusing to upgrade without confirmation: no terminal to ask on (pass --yes)"
    )
    assert fingerprint_of(target) == before


def test_confirmation_on_a_terminal(url, target, home):
    """A real pseudo-terminal: 'n' changes nothing, 'y' migrates."""
    from tests.support.helpers import run_on_a_terminal
    from tests.support.pgcluster import environ_without_db

    def run_answering(answer: str) -> tuple[int, str]:
        env = {**environ_without_db(), "DATABASE_URL": url, "DBMIGRATE_HOME": str(home)}
        return run_on_a_terminal(["upgrade", "-r", "0001"], {b"[y/N]": answer}, env)

    before = fingerprint_of(target)
    code, output = run_answering("n")
    assert code == 2 and "0001  create accounts" in output and "not approved by" in output
    assert fingerprint_of(target) == before

    code, output = run_answering("y")
    assert code == 0 and "succeeded: base -> 0001" in output
    assert fingerprint_of(target).revisions == ("0001",)


def test_pg_dump_gets_the_password_through_its_environment_not_argv(cli, url, target, tmp_path):
    """A pass-through pg_dump on PG_BIN_DIR records what the real one received."""
    from tests.support.helpers import recording_pg_dump

    shim_dir, log = recording_pg_dump(target, tmp_path)
    result = cli("upgrade", "--backup", "--yes", env={"DATABASE_URL": url, "PG_BIN_DIR": str(shim_dir)})
    assert result.returncode == 0, result.stderr
    recorded = log.read_text()
    [dump_call] = [line for line in recorded.splitlines() if "--format=custom" in line]
    assert "--no-password" in dump_call
    assert "password: from environment" in recorded
    from tests.support.helpers import assert_no_canary

    assert_no_canary(recorded, "pg_dump's command line")


def test_generate_creates_a_revision_file(cli, tmp_path, url):
    from tests.support.projects import linear, stock_project

    ini = str(stock_project(tmp_path, linear("pass")))
    result = cli("generate", "-m", "add invoices", "--rev-id", "r2", "--alembic-config", ini)
    assert result.returncode == 0, result.stderr
    created = tmp_path / "migrations" / "versions" / "r2_add_invoices.py"
    assert f"Generating {created}" in result.stdout
    assert "down_revision: Union[str, Sequence[str], None] = 'r1'" in created.read_text()
    heads = cli("heads", "--alembic-config", ini)
    assert heads.stdout.startswith("r2 (head)  add invoices")


def fresh_python(probe: str, url: str, home) -> str:
    """``probe`` run by a fresh Python (what it imports is the question) against ``url``: its stdout."""
    import sys

    from tests.support.helpers import REPO
    from tests.support.pgcluster import environ_without_db

    env = {**environ_without_db(), "DATABASE_URL": url, "DBMIGRATE_HOME": str(home)}
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_plain_commands_do_not_import_prefect(url, home):
    """status/check/health/heads/lint/drift must stay fast: Prefect costs seconds to import."""
    probe = (
        "import sys; from dbmigrate.cli import main\n"
        "for command in (['status'], ['check'], ['health'], ['heads'], ['upgrade', '--dry-run'], ['lint'], "
        "['drift']):\n"
        "    main(command)\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('prefect', 'prefect_aws', 'blocks'))\n"
        "print('PREFECT-MODULES:', loaded)\n"
    )
    assert "PREFECT-MODULES: []" in fresh_python(probe, url, home)


def test_status_imports_and_builds_only_what_it_uses(url, home):
    """The read-only start stays near Alembic's (docs/BENCHMARKS.md): `status` neither imports the
    pipeline or the report nor builds another command's parser, and every command is still listed."""
    probe = (  # a command is built when its handler is set on its parser; listed, it only has a name and help
        "import argparse, sys; from dbmigrate.cli import build_parser, main\n"
        "every = sorted(build_parser()._subparsers._group_actions[0].choices)\n"
        "built, listed = [], []; add, defaults = argparse._SubParsersAction.add_parser, argparse.ArgumentParser.set_defaults\n"
        "def adding(self, name, **kw):\n"
        "    listed.append(name)\n"
        "    return add(self, name, **kw)\n"
        "def handled(self, **kw):\n"
        "    built.extend([self.prog] if 'handler' in kw else [])\n"
        "    return defaults(self, **kw)\n"
        "argparse._SubParsersAction.add_parser, argparse.ArgumentParser.set_defaults = adding, handled\n"
        "code = main(['status'])\n"
        "loaded = sorted(m for m in ('dbmigrate.pipeline', 'dbmigrate.report', 'dbmigrate.lint') if m in sys.modules)\n"
        "print('CODE', code, 'LOADED', loaded, 'BUILT', built)\n"
        "print('ALL LISTED', sorted(listed) == every, len(every))\n"
    )
    out = fresh_python(probe, url, home)
    assert "CODE 0 LOADED [] BUILT ['dbmigrate status']" in out, out
    assert "ALL LISTED True" in out, out  # `dbmigrate --help` and a mistyped command list them


# -- psycopg2: URLs naming it, and projects whose env.py builds a psycopg2 engine ---------------------

# r1 records, in the database, which driver the project's env.py migrates with and the lock_timeout its
# session got (dbmigrate's, through PGOPTIONS: env.py knows nothing of it).
RECORD_SESSION = ("op.execute(\"CREATE TABLE session AS SELECT '%s'::text AS driver, "
                  "current_setting('lock_timeout') AS lock_timeout\" % op.get_bind().dialect.driver)")


@pytest.mark.parametrize("scheme, driver", [
    ("postgresql", "psycopg"), ("postgresql+psycopg", "psycopg"), ("postgresql+psycopg2", "psycopg2"),
])
def test_every_command_takes_each_url_form_and_migrations_run_with_the_driver_it_names(scheme, driver, cli, target,
                                                                                   home, tmp_path):
    """A URL's driver is the one the project's migrations run with (dbmigrate's own sessions use psycopg 3
    whatever it names): postgresql+psycopg2:// runs them on psycopg2."""
    ini = str(stock_project(tmp_path, linear((RECORD_SESSION, "op.drop_table('session')"),
                                             ("op.create_table('t1', sa.Column('id', sa.Integer))",
                                              "op.drop_table('t1')"))))
    env = {"DATABASE_URL": libpq_url(target).replace("postgresql://", f"{scheme}://", 1), "ALEMBIC_CONFIG": ini}
    for args, code in ((["health"], 0), (["check"], 1), (["upgrade", "--backup", "--yes", "--lock-timeout", "3"], 0),
                       (["status"], 0), (["check"], 0), (["backups", "list"], 0)):
        result = cli(*args, env=env)
        assert result.returncode == code, (args, result.stdout, result.stderr)
    assert sql(target, "SELECT driver, lock_timeout FROM session") == [(driver, "3s")]
    assert last_report(home)["backup"]["verified"] is False

    assert cli("downgrade", "-r", "base", "--yes", env=env).returncode == 0
    assert fingerprint_of(target).revisions == () and scalar(target, "SELECT to_regclass('session')") is None


# A migration using psycopg2's own API: COPY, which psycopg2 refuses once a wait callback is set.
COPY_WITH_PSYCOPG2 = ("op.get_bind().connection.driver_connection.cursor().copy_expert("
                      "'COPY t1 (id) FROM STDIN', __import__('io').StringIO('1\\n2\\n'))")


@pytest.mark.parametrize("engine", [PSYCOPG2_FROM_CONFIG, PSYCOPG2_FROM_DATABASE_URL],
                         ids=["from-sqlalchemy.url", "from-DATABASE_URL"])
def test_an_env_py_that_builds_its_own_psycopg2_engine(engine, cli, url, target, home, tmp_path):
    """The upgrade (a revision using psycopg2's COPY included), the timeouts (lock_timeout reaches
    env.py's psycopg2 session through PGOPTIONS), the guard, a failed revision rolled back, the
    reports: as with psycopg 3. The canary password appears in no output or report (run_cli checks)."""
    ini = str(stock_project(tmp_path, linear(
        RECORD_SESSION,
        "op.create_table('t1', sa.Column('id', sa.Integer, primary_key=True)); " + COPY_WITH_PSYCOPG2,
        "op.add_column('t1', sa.Column('note', sa.Text))",
        "op.execute('SELECT 1/0')",
    ), engine=engine))
    env = {"DATABASE_URL": url, "ALEMBIC_CONFIG": ini}
    first = cli("upgrade", "-r", "r2", "--backup", "--yes", env=env)
    assert first.returncode == 0, first.stderr
    assert sql(target, "SELECT driver, lock_timeout FROM session") == [("psycopg2", "10s")]
    assert sql(target, "SELECT id FROM t1 ORDER BY id") == [(1,), (2,)]
    report = last_report(home)
    assert report["status"] == "succeeded" and [m["revision"] for m in report["migrations_applied"]] == ["r1", "r2"]
    before = fingerprint_of(target)

    with session(target) as blocker:  # r3 needs t1's ACCESS EXCLUSIVE lock: it waits 1 s, then gives up
        blocker.autocommit = False
        blocker.execute("LOCK TABLE t1 IN ACCESS EXCLUSIVE MODE")
        started = time.monotonic()
        locked = cli("upgrade", "-r", "r3", "--yes", "--lock-timeout", "1", env=env)
        elapsed = time.monotonic() - started
        blocker.rollback()
    assert locked.returncode == 1 and elapsed < 20
    assert "revision r3 failed: canceling statement due to lock timeout" in one_line_error(locked.stderr)
    assert fingerprint_of(target) == before

    with guard.hold(target, "upgrade", wait_s=0, timeout=5):
        guarded = cli("upgrade", "--yes", env=env)
    assert guarded.returncode == 2 and "another migration holds the guard" in one_line_error(guarded.stderr)
    assert fingerprint_of(target) == before

    failed = cli("upgrade", "--yes", env=env)  # r3 applies, r4 fails: the one transaction rolls both back
    assert failed.returncode == 1
    assert "revision r4 failed: division by zero" in one_line_error(failed.stderr)
    assert fingerprint_of(target) == before
    report = last_report(home)
    assert report["status"] == "failed" and report["error"]["phase"] == "migrate"
    assert report["migrations_applied"] == [] and report["revision_after"] == "r2"
