"""Every failure the core promises: a one-line error, a non-zero exit, and proof
that the database is unchanged."""

import json
import socket
import threading
import time

import pytest

from dbmigrate import guard
from tests.support.helpers import Untouched, fingerprint_of, last_report, one_line_error, reports_in, session, sql
from tests.support.pgcluster import CANARY_PASSWORD, free_port
from tests.support.projects import linear, stock_project


@pytest.fixture(scope="module")
def untouched(pg_cluster, tmp_path_factory):
    with Untouched.at("0003", pg_cluster, tmp_path_factory.mktemp("untouched-home")) as shared:
        yield shared


@pytest.fixture
def blackhole():
    """A loopback port that accepts TCP connections and never answers."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        yield server.getsockname()[1]


def elsewhere(untouched: Untouched, host_port: str, password: str = CANARY_PASSWORD) -> str:
    """The shared database's URL with another host:port or password."""
    return f"postgresql://postgres:{password}@{host_port}/{untouched.target.database}".replace("%", "%25")


# Longer than DNS allows: the resolver fails it locally, so no DNS packet leaves the machine.
UNRESOLVABLE = ".".join(["a" * 60] * 5) + ".invalid"

# id: (args, the DATABASE_URL given the shared database, the blackhole port and tmp_path; what the error says)
BAD_INPUT = {
    "unknown revision": (["upgrade", "-r", "deadbeef", "--yes"], None, "unknown revision 'deadbeef'"),
    "downgrade upwards": (["downgrade", "-r", "0005", "--yes"], None,
                          "cannot downgrade to 0005: it is not below the current revision 0003"),
    "not a url": (["upgrade", "--yes"], lambda db, hole: "not a url at all", "malformed database URL"),
    "mysql url": (["upgrade", "--yes"], lambda db, hole: "mysql://u:p@127.0.0.1/x",
                  "unsupported database URL scheme 'mysql'"),
    "upgrade, port closed": (["upgrade", "--yes"], lambda db, hole: elsewhere(db, f"127.0.0.1:{free_port()}"),
                             "connection refused"),
    "status, port closed": (["status"], lambda db, hole: elsewhere(db, f"127.0.0.1:{free_port()}"),
                            "connection refused"),
    "wrong password": (["status"], lambda db, hole: elsewhere(db, f"127.0.0.1:{db.target.port}", "wrong-password"),
                       "authentication failed"),
    "unresolvable host": (["status"], lambda db, hole: elsewhere(db, f"{UNRESOLVABLE}:5432"), "DNS lookup failed"),
    "invalid host name": (["status"], lambda db, hole: elsewhere(db, f"{'b' * 64}.invalid:5432"),
                          "invalid host name"),
    "server never answers": (["status", "--timeout", "2"], lambda db, hole: elsewhere(db, f"127.0.0.1:{hole}"),
                             "timed out after 2s"),
    "alembic.ini missing": (["upgrade", "--yes", "--alembic-config", "{tmp_path}/missing.ini"], None,
                            "alembic config not found"),
    "alembic.ini broken": (["upgrade", "--yes", "--alembic-config", "{tmp_path}/broken.ini"], None, "does-not-exist"),
}


@pytest.mark.parametrize("args, database_url, expected", list(BAD_INPUT.values()), ids=list(BAD_INPUT))
def test_bad_input_changes_nothing(args, database_url, expected, untouched, tmp_path, blackhole):
    (tmp_path / "broken.ini").write_text("[alembic]\nscript_location = %(here)s/does-not-exist\n")
    args = [arg.format(tmp_path=tmp_path) for arg in args]
    url = database_url(untouched, blackhole) if database_url else None
    assert expected in untouched.refuse(*args, url=url)


def test_health_names_the_failure_reason(cli, target, blackhole):
    url = f"postgresql://postgres:x@127.0.0.1:{blackhole}/{target.database}"
    started = time.monotonic()
    result = cli("health", "--json", "--timeout", "2", env={"DATABASE_URL": url})
    assert result.returncode == 1
    checks = {c["name"]: c for c in json.loads(result.stdout)["checks"]}
    assert checks["connection"]["status"] == "fail"
    assert checks["connection"]["detail"].endswith("timed out after 2s")
    assert checks["disk_space"]["status"] == "ok", "disk space is still reported when the database is down"
    assert time.monotonic() - started < 15


def test_several_heads(cli, url, target, tmp_path):
    revisions = linear("op.create_table('t1', sa.Column('id', sa.Integer, primary_key=True))")
    revisions.append({"revision": "b1", "down": "r1", "message": "branch b", "upgrade": "pass"})
    revisions.append({"revision": "c1", "down": "r1", "message": "branch c", "upgrade": "pass"})
    ini = str(stock_project(tmp_path, revisions))
    env = {"DATABASE_URL": url}
    assert cli("upgrade", "-r", "r1", "--yes", "--alembic-config", ini, env=env).returncode == 0
    before = fingerprint_of(target)

    result = cli("upgrade", "--yes", "--alembic-config", ini, env=env)
    assert result.returncode == 2
    assert "'head' is ambiguous: the scripts have 2 heads" in one_line_error(result.stderr)
    assert fingerprint_of(target) == before

    health = json.loads(cli("health", "--json", "--alembic-config", ini, env=env).stdout)
    version = {c["name"]: c for c in health["checks"]}["alembic_version"]
    assert version["status"] == "warn" and "2 heads" in version["detail"]

    named = cli("upgrade", "-r", "b1", "--yes", "--alembic-config", ini, env=env)
    assert named.returncode == 0, named.stderr
    assert fingerprint_of(target).revisions == ("b1",)


def test_unknown_revision_in_the_database(cli, url, target):
    sql(target, "CREATE TABLE alembic_version (version_num varchar(32) PRIMARY KEY); "
                "INSERT INTO alembic_version VALUES ('f00dface')")
    before = fingerprint_of(target)
    env = {"DATABASE_URL": url}
    health = cli("health", env=env)
    assert health.returncode == 1
    assert "the database is at revision f00dface, which the migration scripts do not know" in health.stdout
    # The same refusal (bad input, exit 2, nothing changed) whether or not the health checks run first.
    for skip in ((), ("--skip-health-checks",)):
        upgrade = cli("upgrade", "--yes", *skip, env=env)
        assert upgrade.returncode == 2, (skip, upgrade.stderr)
        assert one_line_error(upgrade.stderr) == ("dbmigrate: error: the database is at revision f00dface, "
                                                  "which the migration scripts do not know"), skip
    status = cli("status", env=env)
    assert status.returncode == 2 and "f00dface" in one_line_error(status.stderr)
    assert fingerprint_of(target) == before


def test_failed_revision_rolls_back_and_is_reported(cli, url, target, home, tmp_path):
    ini = str(stock_project(tmp_path, linear(
        "op.create_table('t1', sa.Column('id', sa.Integer, primary_key=True))",
        "op.create_table('t2', sa.Column('id', sa.Integer, primary_key=True))",
        "op.execute('SELECT 1/0')",
    )))
    before = fingerprint_of(target)
    result = cli("upgrade", "--yes", "--alembic-config", ini, env={"DATABASE_URL": url})
    assert result.returncode == 1
    assert "revision r3 failed: division by zero" in one_line_error(result.stderr)
    assert fingerprint_of(target) == before, "the stock env.py runs all revisions in one transaction"

    report = last_report(home)
    assert report["status"] == "failed"
    assert report["error"]["phase"] == "migrate" and "division by zero" in report["error"]["message"]
    assert report["migrations_applied"] == [], "nothing the database did not keep may be reported as applied"
    assert report["revision_before"] is None and report["revision_after"] is None


def test_lock_timeout_reaches_a_stock_env_py(cli, url, target, tmp_path):
    ini = str(stock_project(tmp_path, linear(
        "op.create_table('t1', sa.Column('id', sa.Integer, primary_key=True))",
        "op.add_column('t1', sa.Column('note', sa.Text))",
    )))
    env = {"DATABASE_URL": url}
    assert cli("upgrade", "-r", "r1", "--yes", "--alembic-config", ini, env=env).returncode == 0
    before = fingerprint_of(target)
    with session(target) as blocker:
        blocker.autocommit = False
        blocker.execute("LOCK TABLE t1 IN ACCESS EXCLUSIVE MODE")
        started = time.monotonic()
        result = cli("upgrade", "--yes", "--lock-timeout", "1", "--alembic-config", ini, env=env)
        elapsed = time.monotonic() - started
        blocker.rollback()
    assert result.returncode == 1
    assert "revision r2 failed: canceling statement due to lock timeout" in one_line_error(result.stderr)
    assert elapsed < 20
    assert fingerprint_of(target) == before


def test_statement_timeout_reaches_a_stock_env_py(cli, url, target, tmp_path):
    ini = str(stock_project(tmp_path, linear("op.execute('SELECT pg_sleep(30)')")))
    before = fingerprint_of(target)
    result = cli("upgrade", "--yes", "--statement-timeout", "1", "--alembic-config", ini,
                 env={"DATABASE_URL": url})
    assert result.returncode == 1
    assert "canceling statement due to statement timeout" in one_line_error(result.stderr)
    assert fingerprint_of(target) == before


def test_backup_failure_stops_before_migrating(cli, url, target, home):
    (home / "backups").write_text("a file where the backup directory should be")
    before = fingerprint_of(target)
    result = cli("upgrade", "--yes", "--backup", "--skip-health-checks", env={"DATABASE_URL": url})
    assert result.returncode == 1
    assert "storage: cannot create" in one_line_error(result.stderr)
    report = last_report(home)
    assert report["error"]["phase"] == "backup" and report["backup"] is None
    assert fingerprint_of(target) == before

    with_checks = cli("upgrade", "--yes", "--backup", env={"DATABASE_URL": url})
    assert with_checks.returncode == 1 and "disk_space: backup directory" in one_line_error(with_checks.stderr)
    assert fingerprint_of(target) == before


def test_guard_held_by_another_migration(cli, url, target):
    before = fingerprint_of(target)
    with guard.hold(target, "upgrade", wait_s=0, timeout=5):
        result = cli("upgrade", "--yes", "--guard-wait", "1", env={"DATABASE_URL": url})
    assert result.returncode == 2
    error = one_line_error(result.stderr)
    assert "another migration holds the guard" in error and "'dbmigrate upgrade by " in error
    assert "waited 1s (raise --guard-wait to wait longer)" in error
    assert fingerprint_of(target) == before


def test_guard_is_waited_for(cli, url, target):
    held = threading.Event()

    def hold_briefly():
        with guard.hold(target, "downgrade", wait_s=0, timeout=5):
            held.set()
            time.sleep(2)

    holder = threading.Thread(target=hold_briefly)
    holder.start()
    held.wait(10)
    # --lock-wait, the old name of --guard-wait, still works: without it the run would fail at once
    result = cli("upgrade", "-r", "0001", "--yes", "--lock-wait", "30", env={"DATABASE_URL": url})
    holder.join()
    assert result.returncode == 0, result.stderr
    assert fingerprint_of(target).revisions == ("0001",)


def test_two_concurrent_upgrades_exactly_one_migrates(url, target, home, tmp_path):
    import subprocess
    import sys

    from tests.support.helpers import REPO
    from tests.support.pgcluster import environ_without_db

    ini = str(stock_project(tmp_path, linear(
        "op.execute('SELECT pg_sleep(3)'); op.create_table('t1', sa.Column('id', sa.Integer, primary_key=True))",
    )))
    env = {**environ_without_db(), "DATABASE_URL": url, "DBMIGRATE_HOME": str(home)}
    command = [sys.executable, "-m", "dbmigrate", "upgrade", "--yes", "--alembic-config", ini]
    runs = [subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]
    results = [(run.wait(60), *run.communicate()) for run in runs]
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 2], results
    loser = next(err for code, _, err in results if code == 2)
    assert "another migration holds the guard" in loser
    reports = [json.loads(p.read_text()) for p in reports_in(home)]
    assert [r["status"] for r in reports].count("succeeded") == 1
    assert fingerprint_of(target).revisions == ("r1",)


def test_a_database_no_longer_where_the_approved_plan_started_fails_as_such(untouched):
    """Issue 16 item 7: the report names this failure by its own type (DatabaseMoved), not MigrationFailed."""
    error = untouched.refuse("upgrade", "--yes", "--expect-current", "0001", code=1)
    assert error == ("dbmigrate: error: the database is at 0003, not at 0001 where the approved plan started: "
                     "nothing was changed")
    report = json.loads(reports_in(untouched.home)[-1].read_text())
    assert (report["error"]["type"], report["error"]["phase"]) == ("DatabaseMoved", "plan")
