"""What the orchestration tests (tests/orchestration/) share: a migration project whose last revision
sleeps in PostgreSQL for as long as a test needs to break Prefect under it, and how a test waits
for a run to end and for its environment's slot to be free again."""

from __future__ import annotations

import time
from pathlib import Path

from tests.support.helpers import sql, sleeping_backend, wait_until
from tests.support.prefect_server import final, flow_run, start_run
from tests.support.projects import linear, stock_project

SLOW_S = 60  # the revision being interrupted sleeps this long in PostgreSQL (see slow_project)
# How soon the environment's slot must be free again: well under the revision's sleep and the
# slot's 5-minute lease, so a pass proves the run was stopped and its slot freed, not waited out.
# The seconds it took are printed (a figure, not a timed test): 0.5-15 s seen, with the machine's load.
FREE_WITHIN_S = 30

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


def migrating(server, pg_cluster, db_name, environment: str, ini: str) -> str:
    """Start a run and wait until it is inside the slow revision."""
    run_id = start_run(server, environment, ini)
    wait_until(lambda: sleeping_backend(pg_cluster, db_name), 120, "the slow revision to start")
    return run_id


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
