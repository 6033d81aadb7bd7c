"""Faults that must end cleanly: a version table with several rows, the server killed
mid-run, SIGTERM and SIGKILL mid-run, a lock held on alembic_version, ?password= URLs.
Each test injects the fault for real (pg_ctl stop -m immediate, signals, a locking session)."""

from __future__ import annotations

import dataclasses
import json
import signal
import subprocess
import time
from urllib.parse import quote

import pytest
from sqlalchemy import text

from dbmigrate import auto_rollback, backup, db
from dbmigrate.errors import DumpFailed
from dbmigrate.report import KEPT_UNKNOWN
from dbmigrate.settings import Settings
from tests.support import pgcluster
from tests.support.helpers import (SAMPLE_CONFIG, assert_no_canary, fingerprint_of, finish, last_report, libpq_url,
                                   one_line_error, recording_pg_dump, sample_at, session, sql, start_cli,
                                   wait_until)
from tests.support.pgcluster import CANARY_PASSWORD
from tests.support.projects import linear, stock_project

SLEEP = "op.execute('SELECT pg_sleep(30)')"


def backends(cluster, database: str, query_like: str) -> list[tuple]:
    """Active backends of ``database`` running a statement like ``query_like``."""
    return sql(cluster.target("postgres"), "SELECT pid, application_name FROM pg_stat_activity WHERE datname = %s "
               "AND query LIKE %s AND state = 'active' AND pid <> pg_backend_pid()", database, query_like)


def sleeping_project(tmp_path, first_revision_locks: bool = False, transaction_per_migration: bool = False):
    """r1 creates t1; r2 creates t2; r3 (optionally locking t1 first) sleeps 30 s."""
    slow = ("op.execute('LOCK TABLE t1 IN ACCESS EXCLUSIVE MODE'); " if first_revision_locks else "") + SLEEP
    return str(stock_project(tmp_path, linear(
        "op.create_table('t1', sa.Column('id', sa.Integer, primary_key=True))",
        "op.create_table('t2', sa.Column('id', sa.Integer, primary_key=True))",
        slow,
    ), transaction_per_migration=transaction_per_migration))


# -- item 2: several rows in alembic_version ------------------------------------------------------


SEVERAL_ROWS = ("alembic_version holds 2 rows: 0003, 0005 (0003 is an ancestor of 0005): "
                "fix the table by hand; dbmigrate will not guess")


@pytest.fixture
def two_rows(pg_cluster, target):
    """The sample project at 0005 with a second row, 0003, in alembic_version: the state then."""
    sample_at(pg_cluster, "0005", target.database)
    sql(target, "INSERT INTO alembic_version VALUES ('0003')")
    return fingerprint_of(target)


def test_several_rows_in_the_version_table_fail_the_health_check(cli, url, two_rows):
    health = cli("health", "--json", env={"DATABASE_URL": url})
    assert health.returncode == 1
    version = {c["name"]: c for c in json.loads(health.stdout)["checks"]}["alembic_version"]
    assert version["status"] == "fail" and version["detail"] == SEVERAL_ROWS


@pytest.mark.parametrize("args", [["status"], ["check"]], ids=" ".join)
def test_several_rows_in_the_version_table_are_named_by_the_read_only_commands(args, cli, url, two_rows):
    result = cli(*args, env={"DATABASE_URL": url})  # they change nothing, but say the same
    assert result.returncode == 2 and one_line_error(result.stderr) == f"dbmigrate: error: {SEVERAL_ROWS}"


@pytest.mark.parametrize("args", [["downgrade", "-r", "-1"], ["downgrade", "-r", "0004"], ["upgrade"],
                                  ["upgrade", "--skip-health-checks"],
                                  ["downgrade", "-r", "base", "--skip-health-checks"]], ids=" ".join)
def test_several_rows_in_the_version_table_are_refused(args, cli, url, target, home, two_rows):
    result = cli(*args, "--yes", env={"DATABASE_URL": url})
    assert result.returncode == 2, result.stderr
    assert one_line_error(result.stderr) == f"dbmigrate: error: {SEVERAL_ROWS}"
    assert fingerprint_of(target) == two_rows
    report = last_report(home)
    assert report["error"]["message"] == SEVERAL_ROWS and report["migrations_applied"] == []


def test_separate_branches_in_the_version_table_are_refused_too(cli, url, target, tmp_path):
    scripts = linear("op.create_table('t1', sa.Column('id', sa.Integer, primary_key=True))")
    scripts += [{"revision": "b1", "down": "r1", "message": "branch b", "upgrade": "pass"},
                   {"revision": "c1", "down": "r1", "message": "branch c", "upgrade": "pass"}]
    ini = str(stock_project(tmp_path, scripts))
    env = {"DATABASE_URL": url}
    assert cli("upgrade", "-r", "b1", "--yes", "--alembic-config", ini, env=env).returncode == 0
    sql(target, "INSERT INTO alembic_version VALUES ('c1')")
    before = fingerprint_of(target)
    result = cli("downgrade", "-r", "r1", "--yes", "--alembic-config", ini, env=env)
    assert result.returncode == 2
    assert "alembic_version holds 2 rows: b1, c1 (separate branches)" in one_line_error(result.stderr)
    assert fingerprint_of(target) == before


# -- item 3: the automatic rollback never goes to base ---------------------------------------------


def test_rollback_refuses_a_start_at_several_revisions(cli, url, target, home):
    assert cli("upgrade", "-r", "0003", "--yes", env={"DATABASE_URL": url}).returncode == 0
    # As if the run had started with rows 0002 and 0003 and then migrated to 0005.
    started = dataclasses.replace(fingerprint_of(target), revisions=("0002", "0003"))
    assert cli("upgrade", "-r", "0005", "--yes", env={"DATABASE_URL": url}).returncode == 0
    now = fingerprint_of(target)
    settings = Settings(home=home, alembic_config=str(SAMPLE_CONFIG))

    result = auto_rollback.restore_starting_state(target, settings.project(target), settings, started, None, None)

    assert fingerprint_of(target) == now, "nothing may be downgraded"
    assert not result.performed and not result.succeeded and result.revision_after == "0005"
    assert result.detail.startswith("not rolled back: the database started at several revisions (alembic_version "
                                    "holds 2 rows: 0002, 0003 (0002 is an ancestor of 0003)")
    assert result.detail.endswith("nothing was downgraded")


# -- item 9: the server killed mid-run --------------------------------------------------------------


@pytest.fixture(scope="module")
def own_cluster(tmp_path_factory):
    """A cluster of this module's own: these tests kill it."""
    with pgcluster.running(tmp_path_factory.mktemp("killed-pg")) as cluster:
        yield cluster


@pytest.fixture
def own_target(own_cluster):
    name = own_cluster.create_database()
    yield own_cluster.target(name)
    own_cluster.drop_database(name)


def _kill_and_restart(cluster, proc) -> subprocess.CompletedProcess:
    cluster._pg_ctl("-m", "immediate", "stop")
    try:
        return finish(proc)
    finally:
        cluster.start()


def test_server_killed_mid_migration(own_cluster, own_target, home, tmp_path):
    ini = sleeping_project(tmp_path)
    env = {"DATABASE_URL": libpq_url(own_target)}
    assert finish(start_cli(home, "upgrade", "-r", "r1", "--yes", "--alembic-config", ini, env=env)).returncode == 0
    proc = start_cli(home, "upgrade", "--yes", "--alembic-config", ini, env=env)
    wait_until(lambda: backends(own_cluster, own_target.database, "SELECT pg_sleep%"), 30, "r3 to run", 0.1)

    result = _kill_and_restart(own_cluster, proc)

    assert result.returncode == 1
    error = one_line_error(result.stderr)
    assert error == (f"dbmigrate: error: revision r3 failed: lost the connection to {own_target.where}: server closed "
                     f"the connection; {KEPT_UNKNOWN}")
    assert "database at an unknown revision" in result.stdout
    report = last_report(home)
    assert report["migrations_applied"] == [], "r2 ran but was never committed: it may not be reported as applied"
    assert report["revision_after"] is None
    assert any(w.startswith(KEPT_UNKNOWN) for w in report["warnings"])
    assert fingerprint_of(own_target).revisions == ("r1",)


def test_server_killed_after_a_revision_committed(own_cluster, own_target, home, tmp_path):
    """Issue 15 item 25: one transaction per revision; r2's COMMIT returned before the server died in r3."""
    ini = sleeping_project(tmp_path, transaction_per_migration=True)
    env = {"DATABASE_URL": libpq_url(own_target)}
    assert finish(start_cli(home, "upgrade", "-r", "r1", "--yes", "--alembic-config", ini, env=env)).returncode == 0
    proc = start_cli(home, "upgrade", "--yes", "--alembic-config", ini, env=env)
    wait_until(lambda: backends(own_cluster, own_target.database, "SELECT pg_sleep%"), 30, "r3 to run", 0.1)

    result = _kill_and_restart(own_cluster, proc)

    assert result.returncode == 1
    error = one_line_error(result.stderr)
    assert error == (f"dbmigrate: error: revision r3 failed: lost the connection to {own_target.where}: server closed "
                     f"the connection; revisions committed before: r2; {KEPT_UNKNOWN}")
    assert "applied:  r2  step 2" in result.stdout
    report = last_report(home)
    assert [step["revision"] for step in report["migrations_applied"]] == ["r2"], "its COMMIT returned"
    assert report["revision_after"] is None
    assert fingerprint_of(own_target).revisions == ("r2",)


def test_server_killed_mid_backup(own_cluster, own_target, home, tmp_path):
    ini = sleeping_project(tmp_path)
    env = {"DATABASE_URL": libpq_url(own_target)}
    assert finish(start_cli(home, "upgrade", "-r", "r1", "--yes", "--alembic-config", ini, env=env)).returncode == 0
    blocker = own_cluster.admin(own_target.database)  # dies with the server: no commit on the way out
    blocker.execute("BEGIN")
    blocker.execute("LOCK TABLE t1 IN ACCESS EXCLUSIVE MODE")  # pg_dump waits here, mid-backup
    proc = start_cli(home, "upgrade", "--backup", "--yes", "--alembic-config", ini, env=env)
    wait_until(lambda: backends(own_cluster, own_target.database, "LOCK TABLE %"), 30, "pg_dump to run", 0.1)
    result = _kill_and_restart(own_cluster, proc)
    blocker.close()

    assert result.returncode != 0
    error = one_line_error(result.stderr)
    assert str(own_target.where) in error or "pg_dump failed" in error, error
    assert not [p for p in (home / "backups").rglob("*") if p.is_file()], "no partial dump, no manifest"
    report = last_report(home)
    assert report["error"]["phase"] == "backup" and report["migrations_applied"] == []
    assert fingerprint_of(own_target).revisions == ("r1",)


def test_a_session_the_server_dropped_ends_with_the_error_that_ended_it(pg_cluster, target):
    """Closing a session rolls back what is open; on a connection the server dropped that fails,
    and must not hide the error that ended the session (the server killed mid-backup once ended
    in a traceback of that rollback)."""
    with pytest.raises(DumpFailed, match="server closed the connection"):
        with db.connect(target) as conn:
            pid = conn.execute(text("SELECT pg_backend_pid()")).scalar()  # a transaction is open
            with pg_cluster.admin() as admin:
                admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
            raise DumpFailed("server closed the connection unexpectedly")


def test_a_failed_backup_stops_its_row_count_quietly_when_the_server_is_gone(own_cluster, own_target):
    """The row count beside a backup is cancelled when the backup fails; with the server gone (why it
    failed) the cancel cannot connect, which must not replace the backup's error (it once did, as a
    traceback)."""
    with db.connect(own_target) as conn:
        conn.execute(text("SELECT 1"))
        own_cluster._pg_ctl("-m", "immediate", "stop")
        try:
            backup._stop_counting(conn)
        finally:
            own_cluster.start()


def test_server_killed_mid_restore(own_cluster, own_target, home, tmp_path):
    ini = sleeping_project(tmp_path)
    env = {"DATABASE_URL": libpq_url(own_target)}
    assert finish(start_cli(home, "upgrade", "-r", "r1", "--yes", "--alembic-config", ini, env=env)).returncode == 0
    taken = finish(start_cli(home, "backup", "--json", env=env))
    backup_id = json.loads(taken.stdout)["id"]
    reader = own_cluster.admin(own_target.database)  # dies with the server: no commit on the way out
    reader.execute("BEGIN")
    reader.execute("SELECT * FROM t1")  # the restore's DROP SCHEMA waits behind this, mid-restore
    proc = start_cli(home, "restore", backup_id, "--yes", "--no-safety-backup", env=env)
    wait_until(lambda: backends(own_cluster, own_target.database, "DROP SCHEMA%"), 30, "the restore to run", 0.1)
    result = _kill_and_restart(own_cluster, proc)
    reader.close()

    assert result.returncode != 0
    one_line_error(result.stderr)
    assert fingerprint_of(own_target).revisions == ("r1",)


# -- item 10: SIGTERM and SIGKILL mid-run ---------------------------------------------------------


def test_sigterm_mid_revision_cancels_the_statement_and_writes_the_report(cli, url, target, pg_cluster, home,
                                                                         tmp_path):
    ini = sleeping_project(tmp_path, first_revision_locks=True)
    env = {"DATABASE_URL": url}
    assert cli("upgrade", "-r", "r1", "--yes", "--alembic-config", ini, env=env).returncode == 0
    before = fingerprint_of(target)
    proc = start_cli(home, "upgrade", "--yes", "--alembic-config", ini, env=env)
    wait_until(lambda: backends(pg_cluster, target.database, "SELECT pg_sleep%"), 30, "r3 to run", 0.1)

    proc.send_signal(signal.SIGTERM)
    result = finish(proc, timeout=10)

    assert result.returncode == 143
    lines = [line for line in result.stderr.splitlines() if not line.startswith("INFO  [alembic")]
    assert lines == ["dbmigrate: terminated"]
    assert not backends(pg_cluster, target.database, "%pg_sleep%"), "the statement was cancelled"
    sql(target, "SET lock_timeout = 1000; BEGIN; LOCK TABLE t1 IN ACCESS EXCLUSIVE MODE; ROLLBACK")  # the lock is free
    report = last_report(home)
    assert report["status"] == "failed" and report["error"]["phase"] == "migrate"
    assert report["error"]["message"] == "terminated by SIGTERM"
    assert report["migrations_applied"] == [] and report["revision_after"] == "r1"
    assert fingerprint_of(target) == before


def test_sigterm_mid_backup_leaves_no_partial_dump(cli, url, target, pg_cluster, home, tmp_path):
    ini = sleeping_project(tmp_path)
    assert cli("upgrade", "-r", "r1", "--yes", "--alembic-config", ini, env={"DATABASE_URL": url}).returncode == 0
    with session(target) as blocker:
        blocker.execute("BEGIN")
        blocker.execute("LOCK TABLE t1 IN ACCESS EXCLUSIVE MODE")  # pg_dump waits here, its file open
        proc = start_cli(home, "backup", env={"DATABASE_URL": url})
        wait_until(lambda: list((home / "backups").rglob("*.dump")), 30, "the dump file to be created", 0.1)
        wait_until(lambda: backends(pg_cluster, target.database, "LOCK TABLE %"), 30, "pg_dump to run", 0.1)
        proc.send_signal(signal.SIGTERM)
        result = finish(proc, timeout=10)
    assert result.returncode == 143 and result.stderr.strip() == "dbmigrate: terminated"
    assert not [p for p in (home / "backups").rglob("*") if p.is_file()], "no partial dump, no manifest"
    wait_until(lambda: not backends(pg_cluster, target.database, "%"), 5, "pg_dump and the row count to end", 0.1)


def test_sigkill_mid_revision_the_orphaned_statement_ends_soon(cli, url, target, pg_cluster, home, tmp_path):
    ini = sleeping_project(tmp_path, first_revision_locks=True)
    env = {"DATABASE_URL": url}
    assert cli("upgrade", "-r", "r1", "--yes", "--alembic-config", ini, env=env).returncode == 0
    proc = start_cli(home, "upgrade", "--yes", "--alembic-config", ini, env=env)
    wait_until(lambda: backends(pg_cluster, target.database, "SELECT pg_sleep%"), 30, "r3 to run", 0.1)

    proc.kill()
    proc.wait()
    killed = time.monotonic()
    wait_until(lambda: not backends(pg_cluster, target.database, "%pg_sleep%"), 5, "the orphaned statement to end",
               0.1)
    assert time.monotonic() - killed < 4
    assert fingerprint_of(target).revisions == ("r1",)


# -- item 12: a lock held on alembic_version -----------------------------------------------------------


@pytest.mark.parametrize("args", [["status"], ["upgrade", "--yes", "--lock-timeout", "1"]])
def test_a_lock_on_the_version_table_is_waited_for_a_bounded_time(args, cli, url, target, home, pg_cluster):
    sample_at(pg_cluster, "0001", target.database)
    before = fingerprint_of(target)
    with session(target) as blocker:
        blocker.execute("SET application_name = 'the-blocker'")
        blocker.execute("BEGIN")
        blocker.execute("LOCK TABLE alembic_version IN ACCESS EXCLUSIVE MODE")
        pid = blocker.info.backend_pid
        started = time.monotonic()
        result = finish(start_cli(home, *args, "--timeout", "2", env={"DATABASE_URL": url}), timeout=60)
        elapsed = time.monotonic() - started
    assert result.returncode == 2, result.stderr
    assert one_line_error(result.stderr) == (
        f"dbmigrate: error: timed out after 2s waiting for a lock on alembic_version: AccessExclusiveLock held by "
        f"backend pid {pid} ('the-blocker'); raise --timeout to wait longer")
    assert elapsed < 15
    assert fingerprint_of(target) == before


# -- item 19: ?password= in the URL -------------------------------------------------------------------


def test_a_password_given_as_a_url_parameter_reaches_pg_dump_and_is_redacted(cli, target, home, tmp_path):
    from dbmigrate.target import parse_url

    url = (f"postgresql://postgres@127.0.0.1:{target.port}/{target.database}"
           f"?password={quote(CANARY_PASSWORD, safe='')}")
    shim_dir, argv_log = recording_pg_dump(target, tmp_path)

    result = cli("backup", env={"DATABASE_URL": url, "PG_BIN_DIR": str(shim_dir)})

    assert result.returncode == 0, result.stderr
    assert "--format=custom" in argv_log.read_text()
    assert_no_canary(argv_log.read_text(), "pg_dump's command line")
    parsed = parse_url(url)
    assert parsed.redact(f"said {CANARY_PASSWORD}") == "said ***" and "password" not in parsed.url.query
