"""The rehearsal on a restored copy: `dbmigrate rehearse`, `upgrade --rehearse` and the db-migrate
flow, against a real PostgreSQL (and the Prefect test harness)."""

import json
import signal
import threading
import time

import pytest

from tests.support.helpers import (fingerprint_of, finish, last_report, one_line_error, scalar, scratch_databases, sql,
                                   start_cli)
from tests.support.projects import PSYCOPG2_FROM_CONFIG, PSYCOPG2_FROM_DATABASE_URL, ROWS, at_r1_with_rows

NOT_NULL = "op.add_column('t', sa.Column('c', sa.Integer, nullable=False))"
WIDEN = "op.alter_column('t', 'n', type_=sa.BigInteger)"  # a new type: the table is rewritten
BACKFILL = "op.execute('UPDATE t SET n = n + 1')"


def test_a_revision_that_fails_only_on_real_data_fails_the_rehearsal(cli, url, target, home, tmp_path):
    ini = at_r1_with_rows(tmp_path, cli, url, target, NOT_NULL)
    before = fingerprint_of(target)

    result = cli("upgrade", "--rehearse", "--yes", "--alembic-config", ini, env={"DATABASE_URL": url})
    assert result.returncode == 1, result.stderr
    error = one_line_error(result.stderr)
    assert "the rehearsal on a copy restored from backup" in error
    assert 'revision r2 failed: column "c" of relation "t" contains null values' in error
    assert error.endswith("the database was not touched")
    assert fingerprint_of(target) == before
    assert scratch_databases(target) == []

    report = last_report(home)
    assert report["error"]["phase"] == "rehearsal" and report["migrations_applied"] == []
    assert report["rehearsal"]["failed"].startswith("revision r2 failed: column \"c\"")
    assert report["backup"]["id"] == report["rehearsal"]["backup_id"], "the run's own backup was restored"
    assert report["approval"] is None, "nobody was asked to approve what failed on the copy"

    alone = cli("rehearse", "--alembic-config", ini, env={"DATABASE_URL": url})
    assert alone.returncode == 1 and "revision r2 failed" in one_line_error(alone.stderr)
    assert fingerprint_of(target) == before and scratch_databases(target) == []


def test_dbmigrate_rehearse_leaves_the_report_of_a_run(cli, url, target, home, tmp_path):
    """Issue 16 item 1: `dbmigrate rehearse` goes through the pipeline: its report has the backup and the
    rehearsal it printed, the database left at its revision; one failing on the copy, a failed report."""
    ini = at_r1_with_rows(tmp_path, cli, url, target, WIDEN, NOT_NULL)
    rehearsed = cli("rehearse", "--json", "-r", "r2", "--alembic-config", ini, env={"DATABASE_URL": url})
    assert rehearsed.returncode == 0, rehearsed.stderr
    report = last_report(home)
    assert (report["operation"], report["status"], report["revision_before"], report["revision_after"]) == \
        ("rehearse", "succeeded", "r1", "r1")
    assert report["rehearsal"] == json.loads(rehearsed.stdout)
    assert report["backup"]["id"] == report["rehearsal"]["backup_id"]
    assert [m["revision"] for m in report["migrations_planned"]] == ["r2"] and report["migrations_applied"] == []

    failed = cli("rehearse", "--alembic-config", ini, env={"DATABASE_URL": url})
    assert failed.returncode == 1 and "revision r3 failed" in one_line_error(failed.stderr)
    report = last_report(home)
    assert (report["operation"], report["status"], report["error"]["phase"]) == ("rehearse", "failed", "rehearsal")
    assert report["rehearsal"]["failed"].startswith("revision r3 failed") and report["revision_after"] == "r1"


def test_an_env_py_that_connects_elsewhere_is_refused_before_its_first_statement(cli, url, target, home, tmp_path):
    """An env.py with a URL of its own would migrate the real database in the name of the rehearsal."""
    ini = at_r1_with_rows(tmp_path, cli, url, target, WIDEN,
                          engine=f"create_engine({url!r}, poolclass=pool.NullPool)")
    before = fingerprint_of(target)
    result = cli("rehearse", "--alembic-config", ini, env={"DATABASE_URL": url})
    assert result.returncode == 1, result.stderr
    assert f"env.py connected to database '{target.database}', not the rehearsal's copy" in \
        one_line_error(result.stderr)
    assert fingerprint_of(target) == before and scratch_databases(target) == []


@pytest.mark.parametrize(("per_revision", "engine"), [(False, None), (True, None), (True, PSYCOPG2_FROM_CONFIG),
                                                     (False, PSYCOPG2_FROM_DATABASE_URL)],
                         ids=["one-transaction", "transaction-per-revision", "psycopg2-engine", "env-py-reads-DATABASE_URL"])
def test_a_rehearsal_reports_durations_locks_and_rewrites(cli, url, target, home, tmp_path, per_revision, engine):
    ini = at_r1_with_rows(tmp_path, cli, url, target, WIDEN, BACKFILL, transaction_per_migration=per_revision,
                          engine=engine)
    before = fingerprint_of(target)

    result = cli("rehearse", "--json", "--alembic-config", ini, env={"DATABASE_URL": url})
    assert result.returncode == 0, result.stderr
    rehearsal = json.loads(result.stdout)
    assert fingerprint_of(target) == before and scratch_databases(target) == []
    assert rehearsal["failed"] is None and rehearsal["restore_s"] > 0
    widen, backfill = rehearsal["steps"]
    assert [widen["revision"], backfill["revision"]] == ["r2", "r3"]
    assert all(step["duration_s"] > 0 for step in rehearsal["steps"])
    locks = {(lock["relation"], lock["mode"]): lock["held_s"] for lock in widen["locks"]}
    assert ("public.t", "AccessExclusiveLock") in locks
    held = locks["public.t", "AccessExclusiveLock"]
    # held until the transaction ended: in one transaction for all, through r3 as well
    assert held > 0 if per_revision else held >= backfill["duration_s"]
    assert widen["tables_rewritten"] == {"public.t": ROWS} and widen["rows_written"] == {}
    assert backfill["rows_written"] == {"public.t": ROWS} and backfill["tables_rewritten"] == {}
    if per_revision:  # its own transaction took its own lock; in one transaction r2's was held already
        assert ("public.t", "RowExclusiveLock") in {(lock["relation"], lock["mode"]) for lock in backfill["locks"]}

    upgraded = cli("upgrade", "--rehearse", "--yes", "--alembic-config", ini, env={"DATABASE_URL": url})
    assert upgraded.returncode == 0, upgraded.stderr
    report = last_report(home)
    assert [s["revision"] for s in report["rehearsal"]["steps"]] == ["r2", "r3"]
    assert [m["revision"] for m in report["migrations_applied"]] == ["r2", "r3"]
    assert scalar(target, "SELECT version_num FROM alembic_version") == "r3"
    assert scalar(target, "SELECT sum(n) FROM t") == sum(range(2, ROWS + 2))
    assert scratch_databases(target) == []


def test_sigterm_mid_rehearsal_drops_the_copy_and_touches_nothing(home, url, target, tmp_path, cli):
    ini = at_r1_with_rows(tmp_path, cli, url, target, "op.execute('SELECT pg_sleep(60)')", NOT_NULL)
    before = fingerprint_of(target)

    proc = start_cli(home, "upgrade", "--rehearse", "--yes", "--alembic-config", ini, env={"DATABASE_URL": url})
    deadline = time.monotonic() + 60
    while not sql(target, "SELECT 1 FROM pg_stat_activity WHERE query LIKE 'SELECT pg_sleep(60)%' "
                          "AND datname LIKE 'dbmigrate\\_rehearsal\\_%'"):
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    result = finish(proc, timeout=30)
    assert result.returncode == 128 + signal.SIGTERM, result.stderr
    assert "dbmigrate: terminated" in result.stderr
    assert scratch_databases(target) == []
    assert fingerprint_of(target) == before
    assert last_report(home)["error"]["phase"] == "rehearsal"


def test_a_copy_left_by_a_sigkilled_rehearsal_is_named_by_the_health_checks(home, url, target, tmp_path, cli):
    ini = at_r1_with_rows(tmp_path, cli, url, target, "op.execute('SELECT pg_sleep(60)')")
    proc = start_cli(home, "rehearse", "--alembic-config", ini, env={"DATABASE_URL": url})
    deadline = time.monotonic() + 60
    while not (sleeping := sql(target, "SELECT pid, datname FROM pg_stat_activity WHERE query LIKE "
                                       "'SELECT pg_sleep(60)%' AND datname LIKE 'dbmigrate\\_rehearsal\\_%'")):
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    [(pid, copy)] = sleeping
    proc.kill()
    proc.wait()
    sql(target, "SELECT pg_terminate_backend(%s)", pid)  # the server would sleep on for the dead client
    try:
        deadline = time.monotonic() + 30
        while sql(target, "SELECT 1 FROM pg_stat_activity WHERE pid = %s", pid):
            assert time.monotonic() < deadline
            time.sleep(0.2)
        result = cli("health", "--json", "--alembic-config", ini, env={"DATABASE_URL": url})
        assert result.returncode == 0, result.stderr
        check = {c["name"]: c for c in json.loads(result.stdout)["checks"]}["scratch_databases"]
        assert check["status"] == "warn" and copy in check["data"]["abandoned"], check
        assert "left by a run killed outright" in check["detail"]
    finally:
        sql(target, f'DROP DATABASE IF EXISTS "{copy}"')


def test_the_flow_rehearses_production_and_shows_it_on_the_approval_page(environment, target, home, tmp_path,
                                                                          cli, url):
    from prefect.flow_runs import resume_flow_run

    from flows import recovery
    from tests.support.flows import run_flow, wait_for_approval_form

    ini = at_r1_with_rows(tmp_path, cli, url, target, WIDEN)
    name = environment("production", lint_blocks=False)  # the lint would stop it first
    seen = {}

    def approve() -> None:
        wait_for_approval_form(seen)
        seen["journal"] = recovery.read(name)  # what the worker would say of this run, were it lost now
        resume_flow_run(seen["run"].id, run_input={"decision": "approve", "approver": "Ann"})

    approver = threading.Thread(target=approve)
    approver.start()
    state = run_flow(environment=name, alembic_config=ini)
    approver.join()
    assert state.is_completed(), state.message
    assert seen["journal"].phase == "planned", "waiting for approval after the rehearsal: the database untouched"

    page = seen["description"]
    assert "### Rehearsed on a copy restored from backup `" in page
    assert "- `r2` " in page and "lock AccessExclusiveLock on `public.t`, held " in page
    assert f"rewrote `public.t` ({ROWS} rows)" in page
    report = last_report(home)
    assert report["rehearsal"]["backup_id"] == report["backup"]["id"]
    [step] = report["rehearsal"]["steps"]
    assert step["revision"] == "r2" and step["tables_rewritten"] == {"public.t": ROWS}
    assert report["revision_after"] == "r2" and scratch_databases(target) == []


def test_a_production_run_whose_rehearsal_fails_asks_nobody_and_changes_nothing(environment, target, home,
                                                                                 tmp_path, cli, url):
    from tests.support.flows import artifact, run_flow

    ini = at_r1_with_rows(tmp_path, cli, url, target, NOT_NULL)
    before = fingerprint_of(target)
    state = run_flow(environment=environment("production", lint_blocks=False), alembic_config=ini)
    assert state.is_failed()
    assert state.message.startswith("rehearsal failed: the rehearsal on a copy restored from backup ")
    assert 'revision r2 failed: column "c" of relation "t" contains null values' in state.message
    assert fingerprint_of(target) == before and scratch_databases(target) == []
    report = last_report(home)
    assert report["error"]["phase"] == "rehearsal" and report["approval"] is None
    summary = artifact("db-migrate-production")
    assert f"**rehearsal** on a copy restored from `{report['backup']['id']}`: no revision ran; **failed**: " \
           "revision r2 failed" in summary
