"""The rehearsal and drift's replay run the project's revisions on a scratch copy and only ever read
the real database: revisions that connect on their own, or change the cluster, as an adversary wrote
them, against a real PostgreSQL."""

import json

import pytest

from dbmigrate import drift
from dbmigrate.settings import Settings
from tests.support.helpers import (fingerprint_of, last_report, libpq_url, one_line_error, reports_in, scalar,
                                   scratch_databases, sql)
from tests.support.projects import ROWS, TABLE, at_r1_with_rows, linear, stock_project

# A data fix on a connection of its own, from the application's URL (docs/CLI.md's shape for DATABASE_URL);
# run twice, it shows: the three rows' n go down by 1000 each time.
OWN_CONNECTION = ('__import__("psycopg").connect(__import__("os").environ["APP_DB_URL"], autocommit=True)'
                  '.execute("UPDATE t SET n = n - 1000 WHERE id <= 3")')
ROLE_SETTING = "op.execute(\"ALTER ROLE CURRENT_USER SET statement_timeout = '1h'\")"
NEW_ROLE = 'op.execute("CREATE ROLE report_reader")'
NEW_DATABASE = ("with op.get_context().autocommit_block():\n"
                "        op.execute('CREATE DATABASE report_copy')")
FIXED = "SELECT count(*) FROM t WHERE n < 0"
FIXED_ONCE = [(1, -999), (2, -998), (3, -997)]


@pytest.fixture
def cluster_restored(pg_cluster):
    """What the revisions below leave on the session's cluster is undone, whatever the test found."""
    yield
    cluster_restored_now(pg_cluster)


def test_a_revision_connecting_from_the_environment_reaches_only_the_copy(cli, url, target, home, tmp_path):
    # Each revision committed on its own: drift's replay has made table t when the fix connects.
    ini = at_r1_with_rows(tmp_path, cli, url, target, OWN_CONNECTION, transaction_per_migration=True)
    env = {"DATABASE_URL": url, "APP_DB_URL": url}

    rehearsed = cli("rehearse", "--alembic-config", ini, env=env)
    assert rehearsed.returncode == 0, rehearsed.stderr
    assert scalar(target, FIXED) == 0 and scratch_databases(target) == []
    # The lint renders the revision offline, which runs its upgrade(): read-only there.
    linted = cli("lint", "--json", "--alembic-config", ini, env=env)
    assert linted.returncode == 1, linted.stderr  # unrendered is unlinted: a finding at the blocking level
    [revision] = json.loads(linted.stdout)["revisions"]
    assert "read-only transaction" in revision["not_linted"]
    assert [finding["rule"] for finding in revision["findings"]] == ["unrenderable"]
    dry_run = cli("upgrade", "--dry-run", "--alembic-config", ini, env=env)
    assert dry_run.returncode == 2 and one_line_error(dry_run.stderr) == (
        "dbmigrate: error: the SQL cannot be rendered offline: cannot execute UPDATE in a read-only transaction")
    assert scalar(target, FIXED) == 0

    done = cli("upgrade", "--rehearse", "--yes", "--alembic-config", ini, env=env)
    assert done.returncode == 0, done.stderr
    assert sql(target, "SELECT id, n FROM t WHERE n < 0 ORDER BY id") == FIXED_ONCE, "the real run fixed them, once"

    clean = cli("drift", "--alembic-config", ini, env=env)
    assert clean.returncode == 0, clean.stderr
    assert clean.stdout.startswith("no drift: the schema matches the migrations at r2")
    assert sql(target, "SELECT id, n FROM t WHERE n < 0 ORDER BY id") == FIXED_ONCE
    assert scratch_databases(target) == []


def test_a_run_nobody_can_approve_is_refused_before_its_backup_and_rehearsal(cli, url, target, home, tmp_path):
    ini = at_r1_with_rows(tmp_path, cli, url, target, OWN_CONNECTION)
    before, reports = fingerprint_of(target), reports_in(home)

    refused = cli("upgrade", "--rehearse", "--alembic-config", ini, env={"DATABASE_URL": url, "APP_DB_URL": url})
    assert refused.returncode == 2, refused.stderr
    assert one_line_error(refused.stderr) == (
        "dbmigrate: error: refusing to upgrade without confirmation: no terminal to ask on (pass --yes)")
    report = last_report(home)
    assert len(reports_in(home)) == len(reports) + 1 and report["error"]["phase"] == "approval"
    assert report["backup"] is None and report["rehearsal"] is None
    assert not list((home / "backups").rglob("*.dump*")), "no backup was taken"
    assert fingerprint_of(target) == before and scalar(target, FIXED) == 0


@pytest.mark.parametrize(("revision", "changed"), [
    (ROLE_SETTING, "the settings of role postgres: none -> statement_timeout=1h"),
    (NEW_ROLE, "role report_reader created"),
    (NEW_DATABASE, "database report_copy created"),
], ids=["role-setting", "new-role", "new-database"])
def test_a_revision_changing_the_cluster_fails_the_rehearsal_before_approval(cli, url, target, home, tmp_path,
                                                                           pg_cluster, cluster_restored, revision,
                                                                           changed):
    ini = at_r1_with_rows(tmp_path, cli, url, target, revision)
    before = fingerprint_of(target)
    env = {"DATABASE_URL": url}
    for args in (("rehearse",), ("upgrade", "--rehearse", "--yes")):
        failed = cli(*args, "--alembic-config", ini, env=env)
        assert failed.returncode == 1, failed.stderr
        error = one_line_error(failed.stderr)
        assert error.startswith(f"dbmigrate: error: a revision reaches outside the rehearsal's copy: while it ran "
                                f"on the copy, {target.where} and its server changed: {changed} (what it changed "
                                "stays changed: undo it by hand"), error
        assert fingerprint_of(target) == before and scratch_databases(target) == []
        cluster_restored_now(pg_cluster)
    report = last_report(home)
    assert report["error"]["phase"] == "rehearsal" and report["approval"] is None
    assert report["migrations_applied"] == []


def test_drift_whose_replay_changes_the_cluster_says_so_not_no_drift(cli, url, target, tmp_path, pg_cluster,
                                                                     cluster_restored):
    ini = str(stock_project(tmp_path, linear(TABLE, ROLE_SETTING)))
    env = {"DATABASE_URL": url}
    assert cli("upgrade", "--yes", "--alembic-config", ini, env=env).returncode == 0
    cluster_restored_now(pg_cluster)  # the real run's setting: what drift's replay must not set again

    found = cli("drift", "--alembic-config", ini, env=env)
    assert found.returncode == 1, found.stderr
    assert "no drift" not in found.stdout
    escaped = (f"a revision reaches outside drift's scratch database: while it ran on the copy, {target.where} and "
               "its server changed: the settings of role postgres: none -> statement_timeout=1h")
    assert one_line_error(found.stderr).startswith(f"dbmigrate: error: {escaped}")
    cluster_restored_now(pg_cluster)

    check = drift.check(target, Settings(tmp_path / "home", alembic_config=ini, project_logging=False))
    assert (check.name, check.status) == ("drift", "fail") and check.detail.startswith(escaped), "db-health's check"


def test_a_write_to_the_real_database_by_a_url_of_its_own_fails_the_rehearsal_naming_the_table(
        cli, url, target, home, tmp_path):
    """What no environment variable names cannot be pointed at the copy: the fingerprint sees it."""
    inserts = (f'__import__("psycopg").connect({libpq_url(target)!r}, autocommit=True)'
               '.execute("INSERT INTO t SELECT g, g FROM generate_series(-3, -1) g")')
    ini = at_r1_with_rows(tmp_path, cli, url, target, inserts)
    failed = cli("rehearse", "--alembic-config", ini, env={"DATABASE_URL": url})
    assert failed.returncode == 1, failed.stderr
    assert f"changed: the rows of public.t ({ROWS} -> {ROWS + 3})" in one_line_error(failed.stderr)
    assert scalar(target, "SELECT version_num FROM alembic_version") == "r1" and scratch_databases(target) == []


def cluster_restored_now(pg_cluster) -> None:
    with pg_cluster.admin() as conn:
        conn.autocommit = True
        conn.execute("ALTER ROLE postgres RESET statement_timeout")
        conn.execute("DROP ROLE IF EXISTS report_reader")
        conn.execute("DROP DATABASE IF EXISTS report_copy")


def test_production_without_an_approver_by_name_is_refused_before_its_backup_and_rehearsal(
        cli, url, target, home, tmp_path, environment, prefect_api):
    ini = at_r1_with_rows(tmp_path, cli, url, target, OWN_CONNECTION)
    environment("production", cli_changes_allowed=True, lint_blocks=False)
    before = fingerprint_of(target)

    refused = cli("upgrade", "--env", "production", "--backup", "--yes", "--alembic-config", ini,
                  env={"PREFECT_API_URL": prefect_api, "APP_DB_URL": url})
    assert refused.returncode == 2, refused.stderr
    assert one_line_error(refused.stderr) == (
        "dbmigrate: error: the policy of production requires an approval by name: pass --approver NAME "
        "(--yes is not enough) or run on a terminal")
    report = last_report(home)
    assert report["error"]["phase"] == "approval" and report["backup"] is None and report["rehearsal"] is None
    assert not list((home / "backups").rglob("*.dump*")), "no backup was taken"
    assert fingerprint_of(target) == before and scalar(target, FIXED) == 0


def test_the_flow_rehearses_a_data_fix_on_the_copy_and_shows_why_it_has_no_sql(
        environment, target, home, tmp_path, cli, url, monkeypatch):
    """Production through db-migrate: the approver sees the rehearsal and, instead of SQL, why there is
    none; until the approval the real rows are as they were, and the real run fixes them once."""
    import threading

    from prefect.flow_runs import resume_flow_run

    from flows.artifacts import readable_sql
    from tests.support.flows import run_flow, wait_for_approval_form

    ini = at_r1_with_rows(tmp_path, cli, url, target, OWN_CONNECTION)
    monkeypatch.setenv("APP_DB_URL", url)
    name = environment("production", lint_blocks=False)
    seen = {}

    def approve() -> None:
        wait_for_approval_form(seen)
        seen["fixed_before_approval"] = scalar(target, FIXED)
        resume_flow_run(seen["run"].id, run_input={"decision": "approve", "approver": "Ann"})

    approver = threading.Thread(target=approve)
    approver.start()
    state = run_flow(environment=name, alembic_config=ini)
    approver.join()
    assert state.is_completed(), state.message
    assert seen["fixed_before_approval"] == 0, "the lint, the rehearsal and the approval page only read"
    page = seen["description"]
    no_sql = "-- the SQL cannot be rendered offline: cannot execute UPDATE in a read-only transaction"
    assert f"```sql\n{readable_sql(no_sql)}\n```" in page  # wrapped to the form's width
    assert "not linted: cannot be rendered offline: cannot execute UPDATE in a read-only transaction" in page
    assert "### Rehearsed on a copy restored from backup `" in page
    assert sql(target, "SELECT id, n FROM t WHERE n < 0 ORDER BY id") == FIXED_ONCE
