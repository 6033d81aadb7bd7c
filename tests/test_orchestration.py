"""Item 11: the orchestration layer failing, against a real `prefect server start` and
a process worker running the deployments of prefect.yaml.

Each test starts a run whose revision sleeps in PostgreSQL, then breaks Prefect under
it (SIGKILL of the flow-run process or of the worker with it, a cancel from the UI,
the server down for half a minute, the worker restarted during an approval wait) and
checks what an operator relies on: the database at its starting revision (or at the
target, never between), a final state whose message says where the database is, the
environment's concurrency slot free again within seconds, and a next run that works.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import time
from pathlib import Path

import pytest

from tests.support.helpers import (IN_COPY, LONG_COPY_ROWS, REPO, assert_no_canary, backend, fill, fingerprint_of,
                                   last_report, save_environment, sleeping_backend, sql, wait_until)
from tests.support.prefect_server import (
    MEMORY_LEASES,
    PrefectServer,
    Worker,
    deployed,
    final,
    flow_run,
    prefect,
    run_log,
    start_run,
    working,
)
from tests.support.projects import linear, stock_project

# Its own Prefect server, its workers killed and restarted: one worker runs the module (--dist loadgroup).
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("prefect-server-orchestration")]

SLOW_S = 60  # the revision being interrupted sleeps this long in PostgreSQL (see slow_project)
# How soon the environment's slot must be free again: well under the revision's sleep and the
# slot's 5-minute lease, so a pass proves the run was stopped and its slot freed, not waited out.
# The seconds it took are printed (a figure, not a timed test): 0.5-15 s seen, with the machine's load.
FREE_WITHIN_S = 30


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with deployed(PrefectServer(tmp_path_factory.mktemp("prefect-home"))) as server:
        yield server


@pytest.fixture
def worker(server, tmp_path):
    with working(server, tmp_path) as worker:
        yield worker


@pytest.fixture
def blocks(target):
    """Credentials and a quick policy for an environment, saved to the real server."""
    return lambda name, **policy: save_environment(target, name, **policy)


SLEEP = "op.execute(\"SELECT pg_sleep(coalesce(nullif(current_setting('dbmigrate_test.sleep', true), '')::float, 0))\")"


def slow_project(base: Path, transaction_per_migration: bool = False) -> str:
    """r1 <- r2 <- r3: r3, up or down, sleeps in PostgreSQL for the seconds the database's
    setting dbmigrate_test.sleep says (see go_slow), so the next run goes straight through."""
    steps = linear(
        ("op.create_table('t1', sa.Column('id', sa.Integer))", "op.drop_table('t1')"),
        ("op.create_table('t2', sa.Column('id', sa.Integer))", "op.drop_table('t2')"),
        (f"{SLEEP}; op.create_table('t3', sa.Column('id', sa.Integer))", f"{SLEEP}; op.drop_table('t3')"),
    )
    return str(stock_project(base, steps, transaction_per_migration))


def at_r1(tmp_path, cli, url, transaction_per_migration=False, slow_s: float = SLOW_S) -> str:
    ini = slow_project(tmp_path / "project", transaction_per_migration)
    result = cli("upgrade", "-r", "r1", "--yes", "--alembic-config", ini, env={"DATABASE_URL": url})
    assert result.returncode == 0, result.stderr
    go_slow(url, slow_s)
    return ini


def go_slow(url: str, seconds: float) -> None:
    """How long the slow revision sleeps in connections opened from now on."""
    database = url.rsplit("/", 1)[1]
    sql(url, f"ALTER DATABASE \"{database}\" SET dbmigrate_test.sleep = '{seconds:g}'")


def active_slots(environment: str) -> int:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_global_concurrency_limit_by_name(f"db-migrate-{environment}").active_slots


def slot_free_after(environment: str, timeout: float = 360) -> float:
    """Seconds until the environment's slot is free (measured, so the report can say)."""
    start = time.monotonic()
    wait_until(lambda: active_slots(environment) == 0, timeout, f"the {environment} slot to be free", 0.5)
    return time.monotonic() - start


def ended(run_id: str, since: float, what: str, still_running_s: float = 0):
    """The run's final state, once the slot is free again; asserts how soon, prints the figures.
    ``still_running_s``: how long the run may legitimately go on after ``since`` (it still holds
    the slot then, as it should)."""
    run = final(run_id)
    final_after = time.monotonic() - since
    held = slot_free_after(run.parameters["environment"], FREE_WITHIN_S + 20)
    run = flow_run(run_id)  # the worker's hook ends it with what happened to the database, then frees the slot
    print(f"\n{what}: final state after {final_after:.1f}s, slot free {held:.1f}s later; "
          f"{run.state.name}: {run.state.message}")
    assert final_after + held < FREE_WITHIN_S + still_running_s, f"the slot stayed held {final_after + held:.0f}s"
    return run


def next_run_completes(server, environment: str, ini: str, url: str) -> None:
    go_slow(url, 0)
    run_id = start_run(server, environment, ini)
    run = final(run_id, 120)
    assert run.state.is_completed(), f"the next run: {run.state.name}: {run.state.message}"


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


def migrating(server, pg_cluster, db_name, environment: str, ini: str) -> str:
    """Start a run and wait until it is inside the slow revision."""
    run_id = start_run(server, environment, ini)
    wait_until(lambda: sleeping_backend(pg_cluster, db_name), 120, "the slow revision to start")
    return run_id


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

    run = ended(run_id, time.monotonic(), "SIGKILL of the worker alone")
    assert fingerprint_of(target).revisions == ("r3",)
    assert run.state.is_completed() or "database at r3, the target revision" in run.state.message, run.state
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


def says_in_the_end(run_id: str, says: str) -> None:
    """The worker marks a cancelled run Cancelled with its own message after our hook set
    ours (Prefect's cancellation: kill, hooks, then its final state): once the worker's
    message is in the history, ours must be back as the last word."""
    from prefect.client.orchestration import get_client

    def settled() -> bool:
        with get_client(sync_client=True) as client:
            messages = [state.message or "" for state in client.read_flow_run_states(run_id)]
        worker_spoke = any("cancelled successfully" in message for message in messages)
        return worker_spoke and says in messages[-1]

    wait_until(settled, 30, f"the worker's message, then ours ('{says}'), as the final state")


def restarted(server: PrefectServer, down_s: float) -> float:
    """Stop the Prefect server, keep it down ``down_s`` seconds, start it; returns when it was back."""
    server.stop()
    time.sleep(down_s)
    server.start()
    return time.monotonic()


def test_server_down_for_half_a_minute_mid_run(server, worker, blocks, pg_cluster, db_name, target, tmp_path, cli,
                                               url):
    """The migration goes on while the API is away; the run then completes and frees the slot."""
    environment = blocks("staging")
    ini = at_r1(tmp_path, cli, url, slow_s=40)
    run_id = migrating(server, pg_cluster, db_name, environment, ini)
    back = restarted(server, down_s=30)

    # The revision still sleeps ~10 s, and the run's Prefect client reconnects with backoff
    # (seen: up to ~70 s before the run reports Completed); the slot must be free once it has.
    run = ended(run_id, back, "the server down for 30s", still_running_s=120)
    assert run.state.is_completed(), f"{run.state}\n{run_log(run_id)}"
    assert fingerprint_of(target).revisions == ("r3",)
    next_run_completes(server, environment, ini, url)


def test_server_with_in_memory_leases_restarted_mid_run(blocks, pg_cluster, db_name, target, tmp_path,
                                                        tmp_path_factory, cli, url):
    """Prefect's default keeps leases in memory: a restart forgets the run's lease, so its
    release at the end frees nothing. The run must still leave the slot free."""
    memory = PrefectServer(tmp_path_factory.mktemp("prefect-memory-leases"), lease_storage=MEMORY_LEASES)
    with deployed(memory), working(memory, tmp_path):
        environment = blocks("staging")
        ini = at_r1(tmp_path, cli, url, slow_s=15)
        run_id = migrating(memory, pg_cluster, db_name, environment, ini)
        back = restarted(memory, down_s=3)

        # As with the half-minute outage, the run's client may take a while to reconnect (seen: 69 s
        # under load); what matters is that the slot is free once the run has ended.
        run = ended(run_id, back, "an in-memory-lease server restarted mid-run", still_running_s=120)
        assert run.state.is_completed(), f"{run.state}\n{run_log(run_id)}"
        next_run_completes(memory, environment, ini, url)


def test_a_production_run_waiting_for_approval_survives_its_worker(server, worker, blocks, target, tmp_path, cli,
                                                                  url):
    """Item 30 (a, b): a run waiting for approval is suspended and holds no process, so its worker
    restarted (SIGTERM), then lost with everything it started (SIGKILL), loses nothing; meanwhile the
    environment stays the waiting run's. Approved, the run starts again on the new worker, reuses
    the backup and rehearsal it did before it asked, and migrates."""
    from prefect.flow_runs import resume_flow_run

    environment = blocks("production")
    ini = at_r1(tmp_path, cli, url, slow_s=0)
    run_id = start_run(server, environment, ini)
    wait_until(lambda: flow_run(run_id).state.is_paused(), 120, "the run to wait for approval")
    wait_until(lambda: not worker.flow_run_pids(), 30, "the waiting run to hold no process")
    worker.stop(signal.SIGTERM)
    worker.start()
    worker.kill_all()
    worker.start()

    other = final(start_run(server, environment, ini), 120)
    assert other.state.is_failed(), other.state
    assert "waits for approval: 'production-head' (Suspended)" in other.state.message, other.state.message
    assert flow_run(run_id).state.is_paused()
    resume_flow_run(run_id, run_input={"decision": "approve", "approver": "Alice Ops"})
    run = final(run_id, 180)
    assert run.state.is_completed(), run_log(run_id)
    assert fingerprint_of(target).revisions == ("r3",)
    report = last_report(tmp_path / "worker-home")
    assert report["approval"]["approver"] == "Alice Ops" and report["migrations_applied"]
    backups = list((tmp_path / "worker-home").rglob("*.dump"))
    assert len(backups) == 1 and report["rehearsal"]["backup_id"] == report["backup"]["id"], \
        f"one backup, rehearsed before the approval: {backups}"
    assert active_slots(environment) == 0
    for kept in (server.home / "storage").iterdir():  # the backup's and rehearsal's results Prefect kept
        assert_no_canary(base64.b64decode(json.loads(kept.read_text())["result"]).decode("latin-1"), kept.name)


def test_a_run_an_automation_created_records_it_as_who_asked(server, worker, blocks, tmp_path, cli, url):
    """Item 19: the creator Prefect records for a run (here an automation's, as its run-deployment
    action sends it) is the report's requested_by."""
    import uuid

    import httpx
    from prefect.client.orchestration import get_client

    environment = blocks("staging")
    ini = at_r1(tmp_path, cli, url, slow_s=0)
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name(f"db-migrate/{environment}")
    created = httpx.post(f"{server.api_url}/deployments/{deployment.id}/create_flow_run",
                         json={"parameters": {"environment": environment, "alembic_config": ini}},
                         headers={"Prefect-Automation-ID": str(uuid.uuid4()),
                                  "Prefect-Automation-Name": base64.b64encode(b"nightly upgrade").decode()})
    run = final(created.json()["id"], 120)
    assert run.state.is_completed(), run_log(str(run.id))
    assert last_report(tmp_path / "worker-home")["requested_by"] == "nightly upgrade (automation)"


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


def retry_from_the_ui(run_id: str) -> None:
    """What the Prefect UI's Retry button sends (both UIs): the run Scheduled again, forced."""
    from prefect.client.orchestration import get_client
    from prefect.states import AwaitingRetry

    with get_client(sync_client=True) as client:
        client.set_flow_run_state(run_id, AwaitingRetry(message="Retry from the UI"), force=True)


def paused_or_final(run_id: str):
    state = flow_run(run_id).state
    return state if state.is_paused() or state.is_final() else None


def test_a_rejected_production_run_retried_from_the_ui_asks_again(server, worker, blocks, target, tmp_path, cli,
                                                                  url):
    """Item 17: the retried attempt asks for approval again (its own form), then migrates once
    approved, and the in-flight journal is gone at the end."""
    from flows import recovery
    from prefect.flow_runs import resume_flow_run

    environment = blocks("production", approval_poll_s=1)
    ini = at_r1(tmp_path, cli, url, slow_s=0)
    run_id = start_run(server, environment, ini)
    wait_until(lambda: flow_run(run_id).state.is_paused(), 120, "the run to pause for approval")
    resume_flow_run(run_id, run_input={"decision": "reject", "approver": "Bob"})
    # A suspended run holds no process: answered, it waits for a worker to start it again (seen over 90 s
    # at the end of the full suite, 38 s in another full run).
    rejected = final(run_id, timeout=240)
    assert rejected.state.is_failed(), run_log(run_id)

    retry_from_the_ui(run_id)
    asked = wait_until(lambda: paused_or_final(run_id), 120, "the retried run to ask again or end")
    assert asked.is_paused(), f"{asked.name}: {asked.message}\n{run_log(run_id)}"
    assert asked.message.startswith("waiting for approval of r1 → r3 in production"), asked.message
    resume_flow_run(run_id, run_input={"decision": "approve", "approver": "Alice Ops"})
    run = final(run_id, timeout=240)
    assert run.state.is_completed(), run_log(run_id)
    assert fingerprint_of(target).revisions == ("r3",)
    assert recovery.read(environment) is None, "the in-flight journal was left behind"
    assert active_slots(environment) == 0
