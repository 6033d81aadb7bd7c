"""Item 11: the orchestration layer failing, against a real `prefect server start` and a process
worker running the deployments of prefect.yaml: the server away (down for half a minute,
restarted with in-memory leases), a run waiting for approval outliving its worker, a rejected run
retried from the UI, a run an automation created.

Each test starts a run whose revision sleeps in PostgreSQL, then breaks Prefect under it and
checks what an operator relies on: the database at its starting revision (or at the target, never
between), a final state whose message says where the database is, the environment's concurrency
slot free again within seconds, and a next run that works. Shared: tests/support/orchestration.py.
"""

from __future__ import annotations

import base64
import json
import signal
import time

import pytest

from tests.support.helpers import assert_no_canary, fingerprint_of, last_report, wait_until
from tests.support.orchestration import active_slots, at_r1, ended, migrating, next_run_completes
from tests.support.prefect_server import (MEMORY_LEASES, PrefectServer, deployed, final, flow_run, run_log, start_run,
                                         working)

# Its own Prefect server, its workers killed and restarted: one worker runs the module (--dist loadgroup).
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("prefect-server-orchestration-server")]


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

    from prefect.client.orchestration import get_client

    environment = blocks("staging")
    ini = at_r1(tmp_path, cli, url, slow_s=0)
    with get_client(sync_client=True) as client:  # its requests retried and its errors said as Prefect's are
        deployment = client.read_deployment_by_name(f"db-migrate/{environment}")
        created = client.request(
            "POST", "/deployments/{id}/create_flow_run", path_params={"id": deployment.id},
            json={"parameters": {"environment": environment, "alembic_config": ini}},
            headers={"Prefect-Automation-ID": str(uuid.uuid4()),
                     "Prefect-Automation-Name": base64.b64encode(b"nightly upgrade").decode()})
    run = final(created.json()["id"], 120)
    assert run.state.is_completed(), run_log(str(run.id))
    assert last_report(tmp_path / "worker-home")["requested_by"] == "nightly upgrade (automation)"


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
