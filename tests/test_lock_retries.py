"""Lock-safe execution (--lock-retries): short, growing lock_timeouts, each failed attempt rolled
back and tried again, against a real PostgreSQL with a real session holding the table."""

from __future__ import annotations

import time

import psycopg
import pytest

from tests.support.helpers import (
    application,
    finish,
    fingerprint_of,
    held,
    last_report,
    libpq_url,
    one_line_error,
    scalar,
    sql,
    start_cli,
)
from tests.support.projects import PSYCOPG2_FROM_CONFIG, linear, stock_project

SCHEDULE = ["--lock-retries", "0.1,0.2,0.5", "--lock-retry-pause", "0.3"]
LARGEST_LOCK_TIMEOUT = 0.5
MARGIN = 0.5  # a loaded test machine's scheduling, connection and query time
CREATE_T1 = "op.create_table('t1', sa.Column('id', sa.Integer, primary_key=True))"
ALTER_T1 = "op.add_column('t1', sa.Column('note', sa.Text))"


def project(tmp_path, per_revision: bool, *steps: str, engine: str | None = None) -> str:
    return str(stock_project(tmp_path, linear(CREATE_T1, *steps), transaction_per_migration=per_revision,
                             engine=engine))


MODES = pytest.mark.parametrize("per_revision", [False, True], ids=["one-transaction", "transaction-per-revision"])


@MODES
def test_a_lock_held_for_3s_is_waited_out_in_short_attempts(cli, url, target, tmp_path, home, per_revision):
    ini = project(tmp_path, per_revision, "op.create_table('t2', sa.Column('id', sa.Integer))", ALTER_T1)
    env = {"DATABASE_URL": url}
    assert cli("upgrade", "-r", "r1", "--yes", "--alembic-config", ini, env=env).returncode == 0
    with held(target, hold_s=3) as holder:
        result = cli("upgrade", "--yes", *SCHEDULE, "--alembic-config", ini, env=env)
    assert result.returncode == 0, result.stderr
    assert scalar(target, "SELECT version_num FROM alembic_version") == "r3"
    assert sql(target, "SELECT column_name FROM information_schema.columns WHERE table_name = 't1' "
                       "ORDER BY ordinal_position") == [("id",), ("note",)]
    report = last_report(home)
    attempts = report["lock_attempts"]
    failed, last = attempts[:-1], attempts[-1]
    assert len(failed) >= 3 and {a["outcome"] for a in failed} == {"lock_timeout"}
    assert last["outcome"] == "succeeded"
    assert [a["lock_timeout_s"] for a in attempts[:3]] == [0.1, 0.2, 0.5]
    assert all(a["waited_s"] < LARGEST_LOCK_TIMEOUT + MARGIN for a in failed)
    seen = [b for a in failed for b in a["blockers"]]
    assert seen and {(b["pid"], b["application_name"], b["relation"], b["mode"]) for b in seen} == {
        (holder.pid, "the-holder", "t1", "AccessExclusiveLock")}
    assert [m["revision"] for m in report["migrations_applied"]] == ["r2", "r3"]
    print(f"{len(failed)} failed attempts, waits {[a['waited_s'] for a in attempts]}")


def test_the_applications_queries_never_queue_longer_than_the_largest_lock_timeout(cli, url, target, tmp_path):
    """A long transaction that read t1 (ACCESS SHARE) blocks the ALTER; while the migration waits
    for it, every query of the application on t1 queues behind the migration's lock request.
    With the schedule that queue lasts one short lock_timeout at most; with one long
    lock_timeout (the control) it lasts as long as the transaction."""
    ini = project(tmp_path, False, ALTER_T1)
    env = {"DATABASE_URL": url}
    assert cli("upgrade", "-r", "r1", "--yes", "--alembic-config", ini, env=env).returncode == 0
    worst = {}
    for name, options in (("schedule", SCHEDULE), ("control", ["--lock-timeout", "10"])):
        sql(target, "ALTER TABLE t1 DROP COLUMN IF EXISTS note; UPDATE alembic_version SET version_num = 'r1'")
        with held(target, "ACCESS SHARE", hold_s=3), application(target) as durations:
            result = cli("upgrade", "--yes", *options, "--alembic-config", ini, env=env)
            time.sleep(0.2)
        assert result.returncode == 0, result.stderr
        worst[name] = max(durations)
    print(f"worst wait of the application's queries: {worst}")
    assert worst["schedule"] < LARGEST_LOCK_TIMEOUT + MARGIN
    assert worst["control"] > 2, "the control must show the queue the schedule avoids"


@MODES
def test_a_lock_held_past_the_total_fails_naming_the_holder(cli, url, target, tmp_path, home, per_revision):
    ini = project(tmp_path, per_revision, ALTER_T1)
    env = {"DATABASE_URL": url}
    assert cli("upgrade", "-r", "r1", "--yes", "--alembic-config", ini, env=env).returncode == 0
    before = fingerprint_of(target)
    with held(target) as holder:
        started = time.monotonic()
        result = cli("upgrade", "--yes", *SCHEDULE, "--lock-retry-total", "3", "--alembic-config", ini, env=env)
        elapsed = time.monotonic() - started
    assert result.returncode == 1
    line = one_line_error(result.stderr)
    assert "revision r2 failed: could not get its lock in " in line
    assert (f"it wanted AccessExclusiveLock on t1, blocked by pid {holder.pid} ('the-holder', idle in transaction, "
            "query since ") in line
    assert line.endswith("): LOCK TABLE t1 IN ACCESS EXCLUSIVE MODE; nothing was changed")
    assert fingerprint_of(target) == before
    assert elapsed < 3 + 15  # the total, the pause, and the command's own start
    attempts = last_report(home)["lock_attempts"]
    assert len(attempts) >= 4 and {a["outcome"] for a in attempts} == {"lock_timeout"}


@pytest.mark.parametrize("failing, engine", [("r2", None), ("r3", None), ("r2", PSYCOPG2_FROM_CONFIG)],
                         ids=["in-the-revision", "in-the-next-revision", "psycopg2-env-py"])
def test_a_revision_that_changed_something_outside_a_transaction_is_not_retried(cli, url, target, tmp_path, home,
                                                                                 failing, engine):
    """r2 creates a table in an autocommit block, then r2 itself or r3 (one transaction for the run:
    r2's stamp rolls back with it) times out on t1's lock: what r2 committed stays, so nothing is retried."""
    side = "with op.get_context().autocommit_block():\n        op.execute('CREATE TABLE side (id int)')"
    alter = "op.execute('ALTER TABLE t1 ADD COLUMN note text')"
    steps = [side + "\n        " + alter] if failing == "r2" else [side, alter]
    ini = project(tmp_path, False, *steps, engine=engine)
    env = {"DATABASE_URL": url}
    assert cli("upgrade", "-r", "r1", "--yes", "--alembic-config", ini, env=env).returncode == 0
    with held(target):
        result = cli("upgrade", "--yes", *SCHEDULE, "--alembic-config", ini, env=env)
    assert result.returncode == 1
    line = one_line_error(result.stderr)
    assert line.endswith(f"revision {failing} failed: canceling statement due to lock timeout; not retried: "
                         "revision r2 ran outside a transaction (autocommit: CREATE TABLE side (id int)) and may "
                         "have changed the database before the attempt failed, which no rollback undoes: check what "
                         "it left (an INVALID index, a half-done change) before running it again")
    attempts = last_report(home)["lock_attempts"]
    assert [a["outcome"] for a in attempts] == ["lock_timeout"]
    assert scalar(target, "SELECT to_regclass('side') IS NOT NULL"), "what it changed stays, and it says so"
    assert scalar(target, "SELECT version_num FROM alembic_version") == "r1"


def test_a_concurrent_index_that_times_out_after_creating_its_entry_is_not_retried(cli, url, target, tmp_path,
                                                                                   home):
    """CREATE INDEX CONCURRENTLY commits the index's entry, then waits for every transaction writing to the
    table: timing out there leaves an INVALID index, which running it again would trip over."""
    concurrently = ("with op.get_context().autocommit_block():\n"
                    "        op.create_index('ix_t1_id', 't1', ['id'], postgresql_concurrently=True)")
    ini = project(tmp_path, False, concurrently)
    env = {"DATABASE_URL": url}
    assert cli("upgrade", "-r", "r1", "--yes", "--alembic-config", ini, env=env).returncode == 0
    with psycopg.connect(libpq_url(target), application_name="the-writer") as writer:
        writer.execute("INSERT INTO t1 VALUES (1)")  # a write, its transaction left open
        result = cli("upgrade", "--yes", *SCHEDULE, "--alembic-config", ini, env=env)
        writer.rollback()
    assert result.returncode == 1
    line = one_line_error(result.stderr)
    assert line.startswith("dbmigrate: error: revision r2 failed: canceling statement due to lock timeout; "
                           "not retried: revision r2 ran outside a transaction (autocommit: CREATE INDEX CONCURRENTLY "
                           "ix_t1_id ON t1 (id)) and may have changed the database before the attempt failed")
    assert [a["outcome"] for a in last_report(home)["lock_attempts"]] == ["lock_timeout"]
    assert sql(target, "SELECT indisvalid FROM pg_index WHERE indexrelid = 'ix_t1_id'::regclass") == [(False,)]
    assert scalar(target, "SELECT version_num FROM alembic_version") == "r1"


BATCHES = ("op.execute('CREATE TABLE batches (id serial); CREATE FUNCTION backfill_batch() RETURNS void "
           "LANGUAGE sql AS $$ INSERT INTO batches DEFAULT VALUES $$')")


@pytest.mark.parametrize("outside, seen", [
    ("with op.get_context().autocommit_block():\n        op.execute('SELECT backfill_batch()')",
     "autocommit: SELECT backfill_batch()"),
    ("with op.get_bind().engine.connect() as own:\n"
     "        own.execute(sa.text('SELECT backfill_batch()'))\n        own.commit()", "a connection of its own"),
], ids=["select-in-autocommit", "own-connection"])
def test_a_function_that_writes_outside_the_transaction_runs_once(cli, url, target, tmp_path, home, outside, seen):
    """r2 runs one batch of a backfill (a function that inserts a row) outside the run's transaction, then waits
    for t1's lock: the batch stays whatever the attempt does, so the revision is not run again."""
    ini = str(stock_project(tmp_path, linear(f"{CREATE_T1}\n    {BATCHES}", f"{outside}\n    {ALTER_T1}")))
    env = {"DATABASE_URL": url}
    assert cli("upgrade", "-r", "r1", "--yes", "--alembic-config", ini, env=env).returncode == 0
    with held(target):
        result = cli("upgrade", "--yes", *SCHEDULE, "--lock-retry-total", "3", "--alembic-config", ini, env=env)
    assert scalar(target, "SELECT count(*) FROM batches") == 1
    assert result.returncode == 1
    assert one_line_error(result.stderr).endswith(
        f"revision r2 failed: canceling statement due to lock timeout; not retried: revision r2 ran outside a "
        f"transaction ({seen}) and may have changed the database before the attempt failed, which no rollback undoes: "
        "check what it left (an INVALID index, a half-done change) before running it again")
    assert [a["outcome"] for a in last_report(home)["lock_attempts"]] == ["lock_timeout"]
    assert scalar(target, "SELECT version_num FROM alembic_version") == "r1"


def test_a_deadlock_is_rolled_back_and_tried_again(home, url, target, tmp_path):
    """r2 alters t1, then t2; a session of the application that read t2 then reads t1 closes the cycle.
    PostgreSQL cancels the migration (its deadlock check runs first: the application's waits 10 s): the
    attempt rolled back, it is tried again once the application's transaction has ended."""
    create = "op.create_table('t2', sa.Column('id', sa.Integer))"
    ini = str(stock_project(tmp_path, linear(f"{CREATE_T1}\n    {create}",
                                             f"{ALTER_T1}\n    op.add_column('t2', sa.Column('note', sa.Text))")))
    env = {"DATABASE_URL": url}
    assert start_cli(home, "upgrade", "-r", "r1", "--yes", "--alembic-config", ini, env=env).wait(120) == 0
    with psycopg.connect(libpq_url(target), application_name="the-application") as app:
        app.execute("SET deadlock_timeout = '10s'")
        app.execute("SELECT * FROM t2")  # its transaction holds ACCESS SHARE on t2
        migration = start_cli(home, "upgrade", "--yes", "--lock-retries", "5", "--lock-retry-pause", "0.3",
                              "--alembic-config", ini, env=env)
        deadline = time.monotonic() + 60
        while not scalar(target, "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'dbmigrate-%%' "
                                 "AND wait_event_type = 'Lock'"):
            assert time.monotonic() < deadline and migration.poll() is None, "the migration never waited for t2"
            time.sleep(0.02)
        app.execute("SELECT * FROM t1")  # waits for the migration's lock on t1: a deadlock
        app.rollback()
    result = finish(migration)
    assert result.returncode == 0, result.stderr
    attempts = last_report(home)["lock_attempts"]
    print(f"attempts {[(a['outcome'], a['waited_s']) for a in attempts]}")
    assert [a["outcome"] for a in attempts] == ["deadlock", "succeeded"]
    assert scalar(target, "SELECT version_num FROM alembic_version") == "r2"
    assert sql(target, "SELECT table_name FROM information_schema.columns WHERE column_name = 'note' "
                       "ORDER BY table_name") == [("t1",), ("t2",)]


def test_a_statement_timeout_shorter_than_the_schedule_is_refused(cli, url, target, tmp_path):
    """statement_timeout counts the lock wait: 1 s would cancel the 2 s and 5 s waits (and that is not retried)."""
    ini = project(tmp_path, False, ALTER_T1)
    result = cli("upgrade", "--yes", "--statement-timeout", "1", "--lock-retries", "2,5", "--alembic-config", ini,
                 env={"DATABASE_URL": url})
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == (
        "dbmigrate: error: a statement_timeout of 1s would cancel a statement waiting for its lock before the "
        "lock-retry schedule's lock_timeout of 5s ends, and that is not retried: give a statement_timeout above 5s, "
        "or 0 (none)\n")
    assert fingerprint_of(target).revisions == ()


def test_one_transaction_per_revision_gives_up_keeping_what_it_committed(cli, url, target, tmp_path, home):
    ini = project(tmp_path, True, "op.create_table('t2', sa.Column('id', sa.Integer))", ALTER_T1)
    env = {"DATABASE_URL": url}
    assert cli("upgrade", "-r", "r1", "--yes", "--alembic-config", ini, env=env).returncode == 0
    with held(target):
        result = cli("upgrade", "--yes", *SCHEDULE, "--lock-retry-total", "2", "--alembic-config", ini, env=env)
    assert result.returncode == 1
    line = one_line_error(result.stderr)
    assert "revision r3 failed: could not get its lock in " in line and line.endswith("; revisions kept: r2")
    assert scalar(target, "SELECT version_num FROM alembic_version") == "r2"
    report = last_report(home)
    assert [m["revision"] for m in report["migrations_applied"]] == ["r2"] and report["revision_after"] == "r2"


def test_with_env_the_environments_policy_sets_the_schedule(cli, environment, prefect_api, target, tmp_path, home):
    ini = project(tmp_path, False, ALTER_T1)
    name = environment("staging", lock_retry_timeouts_s=[0.1, 0.2], lock_retry_pause_s=0.3, lock_retry_total_s=30)
    env = {"PREFECT_API_URL": prefect_api}
    assert cli("upgrade", "-r", "r1", "--env", name, "--yes", "--alembic-config", ini, env=env).returncode == 0
    with held(target, hold_s=1.5):
        result = cli("upgrade", "--env", name, "--yes", "--alembic-config", ini, env=env)
    assert result.returncode == 0, result.stderr
    attempts = last_report(home)["lock_attempts"]
    assert [a["lock_timeout_s"] for a in attempts[:2]] == [0.1, 0.2] and attempts[-1]["outcome"] == "succeeded"
    assert {a["outcome"] for a in attempts[:-1]} == {"lock_timeout"}


def test_with_env_the_environments_policy_sets_the_lock_timeout_and_an_option_given_wins(
        cli, environment, prefect_api, target, tmp_path, home):
    """The policy's lock_timeout_s holds for `upgrade --env` as it does in the flow: a lock held 5 s
    fails the run at the policy's 1 s, nothing changed; --lock-timeout given outlasts the holder."""
    ini = project(tmp_path, False, ALTER_T1)
    name = environment("staging", lock_timeout_s=1)
    env = {"PREFECT_API_URL": prefect_api}
    assert cli("upgrade", "-r", "r1", "--env", name, "--yes", "--alembic-config", ini, env=env).returncode == 0
    before = fingerprint_of(target)
    with held(target, hold_s=5):
        refused = cli("upgrade", "--env", name, "--yes", "--alembic-config", ini, env=env)
    assert refused.returncode == 1, refused.stderr
    assert "revision r2 failed: canceling statement due to lock timeout" in one_line_error(refused.stderr)
    report = last_report(home)
    assert report["error"]["phase"] == "migrate" and report["revision_after"] == "r1"
    assert fingerprint_of(target) == before
    with held(target, hold_s=2):
        waited = cli("upgrade", "--env", name, "--yes", "--lock-timeout", "30", "--alembic-config", ini, env=env)
    assert waited.returncode == 0, waited.stderr
    assert scalar(target, "SELECT version_num FROM alembic_version") == "r2"
