"""Item 11: the orchestration layer failing, against a real `prefect server start` and a process
worker running the deployments of prefect.yaml: the run's own processes failing (SIGKILL of the
flow-run process, of the worker with it or alone, of the tool a restore feeds) and a cancel from
the UI.

Each test starts a run whose revision sleeps in PostgreSQL, then breaks Prefect under it and
checks what an operator relies on: the database at its starting revision (or at the target, never
between), a final state whose message says where the database is, the environment's concurrency
slot free again within seconds, and a next run that works. Shared: tests/support/orchestration.py.
"""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from tests.support.helpers import (IN_COPY, LONG_COPY_ROWS, REPO, backend, fill, fingerprint_of, last_report,
                                   sleeping_backend, sql, wait_until)
from tests.support.orchestration import (SLOW_S, active_slots, at_r1, ended, go_slow, migrating, next_run_completes,
                                        says_in_the_end)
from tests.support.prefect_server import Worker, flow_run, prefect, run_log, start_run

# Its own Prefect server, its workers killed and restarted: one worker runs the module (--dist loadgroup).
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("prefect-server-orchestration-processes")]


def test_flow_run_process_sigkilled_mid_revision(server, worker, blocks, pg_cluster, db_name, target, tmp_path,
                                                 cli, url):
    environment = blocks("staging")
    ini = at_r1(tmp_path, cli, url)
    before = fingerprint_of(target)
    started = time.monotonic()
    run_id = start_run(server, environment, ini)
    wait_until(lambda: sleeping_backend(pg_cluster, db_name), 120, "the slow revision to start")
    [pid] = worker.flow_run_pids()[-1:]
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()

    run = ended(run_id, killed, "SIGKILL of the flow-run process")
    assert fingerprint_of(target) == before
    assert run.state.is_crashed()
    assert "during the migration: database at r1, its starting revision: nothing was applied" in run.state.message, \
        run_log(run_id)
    next_run_completes(server, environment, ini, url)
    assert fingerprint_of(target).revisions == ("r3",)
    print(f"scenario took {time.monotonic() - started:.1f}s")


def test_worker_sigkilled_with_its_flow_run_mid_revision(server, worker, blocks, pg_cluster, db_name, target,
                                                         tmp_path, cli, url):
    """Nobody is left to report: the run stays Running in Prefect. The next run finds its
    owner dead (its presence connection closed), ends it with where the database is, and
    takes the slot."""
    environment = blocks("staging")
    ini = at_r1(tmp_path, cli, url)
    before = fingerprint_of(target)
    lost = migrating(server, pg_cluster, db_name, environment, ini)
    worker.kill_all()
    assert flow_run(lost).state.is_running() and active_slots(environment) == 1

    worker.start()
    started = time.monotonic()
    next_run_completes(server, environment, ini, url)
    print(f"\nworker + flow run SIGKILLed: the next run reclaimed the slot and completed in "
          f"{time.monotonic() - started:.1f}s")
    run = flow_run(lost)
    assert run.state.is_crashed(), run.state
    assert run.state.message.startswith("Run lost during the migration (its process and worker are gone): "
                                     "database at r1, its starting revision: nothing was applied"), run.state.message
    assert fingerprint_of(target).revisions == ("r3",) and before.revisions == ("r1",)
    assert active_slots(environment) == 0


def test_worker_alone_sigkilled_mid_revision(server, worker, blocks, pg_cluster, db_name, target, tmp_path, cli, url):
    """The flow-run process outlives its worker and finishes the migration, but Prefect's engine
    then exits (its runner is gone) and the run ends Crashed: its message must say the
    database reached the target, and the slot must be free."""
    environment = blocks("staging")
    ini = at_r1(tmp_path, cli, url, slow_s=10)
    run_id = migrating(server, pg_cluster, db_name, environment, ini)
    worker.stop(signal.SIGKILL)
    wait_until(lambda: not sleeping_backend(pg_cluster, db_name), 60, "the slow revision to end")

    ended(run_id, time.monotonic(), "SIGKILL of the worker alone")
    assert fingerprint_of(target).revisions == ("r3",)
    # The process exits on the broken pipe at its next log line: its slot is freed on the way out, before
    # its crash hook replaces Prefect's "aborted by Python system exit call" with ours (about 0.2 s later).
    wait_until(lambda: (state := flow_run(run_id).state).is_completed() or
               "database at r3, the target revision" in state.message, 30,
               "the run's final state to say where the database is")
    report = last_report(tmp_path / "worker-home")  # item 30 (c): it agrees with the database
    assert [step["revision"] for step in report["migrations_applied"]] == ["r2", "r3"], report
    assert report["revision_after"] == "r3"
    assert report["status"] == "succeeded" or "database at r3, the target revision" in report["error"]["message"], \
        report["error"]
    worker.start()
    next_run_completes(server, environment, ini, url)


def test_cancelled_from_the_ui_mid_migration(server, worker, blocks, pg_cluster, db_name, target, tmp_path, cli,
                                             url):
    environment = blocks("staging")
    ini = at_r1(tmp_path, cli, url)
    before = fingerprint_of(target)
    run_id = migrating(server, pg_cluster, db_name, environment, ini)
    prefect(server, "flow-run", "cancel", run_id, cwd=REPO)
    cancelled = time.monotonic()

    run = ended(run_id, cancelled, "prefect flow-run cancel")
    assert fingerprint_of(target) == before
    assert run.state.is_cancelled(), run.state
    says_in_the_end(run_id, "database at r1, its starting revision: nothing was applied")
    report = last_report(tmp_path / "worker-home")  # item 27: the report says what the state says
    assert report["error"] == {"type": "TerminationSignal", "phase": "migrate", "message": (
        "Run cancelled during the migration: database at r1, its starting revision: nothing was applied")}
    assert report["migrations_applied"] == [] and report["revision_after"] == "r1"
    assert report["requested_by"] == "unknown", "not the worker's user: nobody said who asked"
    next_run_completes(server, environment, ini, url)


@pytest.mark.parametrize("auto_rollback", [True, False], ids=["rolls-back", "says-between"])
def test_sigkill_between_revisions_with_a_transaction_per_revision(auto_rollback, server, worker, blocks, pg_cluster,
                                                                   db_name, target, tmp_path, cli, url):
    """env.py commits each revision: killed in r3, the database keeps r2. Where the policy rolls
    back automatically the worker's hook takes it back to r1; otherwise the final state says it
    is between and what to run."""
    # development rolls back on its own; staging told not to (independent slots, too)
    environment = blocks("development") if auto_rollback else blocks("staging", auto_rollback=False)
    ini = at_r1(tmp_path, cli, url, transaction_per_migration=True)
    before = fingerprint_of(target)
    run_id = migrating(server, pg_cluster, db_name, environment, ini)
    os.kill(worker.flow_run_pids()[-1], signal.SIGKILL)

    run = ended(run_id, time.monotonic(), f"SIGKILL between revisions (auto_rollback={auto_rollback})")
    left = "during the migration: database left at r2, between the starting revision r1 and the target r3"
    assert left in run.state.message, run.state.message
    if auto_rollback:
        assert run.state.message.endswith("; rolled back automatically to r1, its starting revision.")
        assert fingerprint_of(target) == before
    else:
        assert run.state.message.endswith(": run db-rollback to r1, or db-migrate again to finish.")
        assert fingerprint_of(target).revisions == ("r2",)
    next_run_completes(server, environment, ini, url)


def feeding(worker: Worker, tool: str) -> int:
    """The flow-run process whose child ``tool`` (psql, pg_restore) is."""
    import psutil

    [child] = [p for p in psutil.Process(worker.process.pid).children(recursive=True) if p.name() == tool]
    return child.ppid()


def test_db_rollback_sigkilled_mid_restore(server, worker, blocks, pg_cluster, db_name, target, tmp_path, cli, url):
    """A restore by backup id whose flow-run process is SIGKILLed while psql replays the data:
    the restore commits nothing, and the final state says so, told by the row counts (the
    backup has the revision the database has now)."""
    environment = blocks("staging")
    ini = at_r1(tmp_path, cli, url, slow_s=0)
    fill(target, LONG_COPY_ROWS)
    storage = str(tmp_path / "backups")
    taken = cli("backup", "--json", "--env", environment, "--storage", storage,
                env={"PREFECT_API_URL": server.api_url})
    assert taken.returncode == 0, taken.stderr
    sql(target, "DELETE FROM payload WHERE id % 3 = 0; CREATE TABLE added_later (id int)")
    before = fingerprint_of(target)
    run_id = start_run(server, environment, ini, flow="db-rollback", backup_id=json.loads(taken.stdout)["id"],
                       dry_run=False, backup_storage=storage)
    wait_until(lambda: backend(pg_cluster, db_name, IN_COPY), 120, "the restore's COPY", 0.05)
    os.kill(feeding(worker, "psql"), signal.SIGKILL)

    run = ended(run_id, time.monotonic(), "SIGKILL of a db-rollback mid-restore")
    assert fingerprint_of(target) == before
    assert run.state.is_crashed(), run.state
    assert ("during the restore: the restore did not commit: database as it was (revision r1 and row counts as "
            "before the restore)") in run.state.message, run_log(run_id)
    next_run_completes(server, environment, ini, url)


def test_db_rollback_cancelled_from_the_ui_mid_downgrade(server, worker, blocks, pg_cluster, db_name, target,
                                                        tmp_path, cli, url):
    environment = blocks("staging")
    ini = at_r1(tmp_path, cli, url, slow_s=0)
    assert cli("upgrade", "-r", "r3", "--yes", "--alembic-config", ini, env={"DATABASE_URL": url}).returncode == 0
    go_slow(url, SLOW_S)
    before = fingerprint_of(target)
    run_id = start_run(server, environment, ini, flow="db-rollback", to_revision="r1", dry_run=False)
    wait_until(lambda: sleeping_backend(pg_cluster, db_name), 120, "the slow downgrade to start")
    prefect(server, "flow-run", "cancel", run_id, cwd=REPO)

    run = ended(run_id, time.monotonic(), "db-rollback cancelled mid-downgrade")
    assert fingerprint_of(target) == before
    assert run.state.is_cancelled(), run.state
    says_in_the_end(run_id, "during the migration: database at r3, its starting revision: nothing was applied")
    next_run_completes(server, environment, ini, url)
