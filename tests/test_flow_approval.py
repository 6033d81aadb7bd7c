"""Production's db-migrate runs: the approval in the Prefect UI's form, who asked and who may approve, an
approval that times out, the policy a block's environment brings."""

import threading

import pytest

from tests.support.flows import (artifact, artifacts_of, flow_run_of, resume_when_paused, run_flow, run_logs, run_named,
                                 task_runs_of)
from tests.support.helpers import fingerprint_of, last_report, reports_in
from tests.support.projects import linear, stock_project, table_step


def test_production_refuses_to_run_without_a_backup(environment, target, tmp_path):
    ini = str(stock_project(tmp_path, linear(table_step("t1"))))
    state = run_flow(environment=environment("production"), alembic_config=ini, backup=False)
    assert state.is_failed() and "requires a backup before migrating: backup=false is refused" in state.message
    assert fingerprint_of(target).revisions == ()


def test_production_waits_for_approval(environment, target, home, tmp_path):
    from prefect.client.orchestration import get_client

    name = environment("production")
    ini = str(stock_project(tmp_path, linear(table_step("t1"), table_step("t2"))))
    before = fingerprint_of(target)

    seen = {}
    rejecter = threading.Thread(target=resume_when_paused, args=({"decision": "reject", "approver": "bob"}, seen))
    rejecter.start()
    state = run_flow(environment=name, alembic_config=ini)
    rejecter.join()
    assert state.is_failed() and state.message == "approval failed: not approved by bob: nothing was changed"
    assert fingerprint_of(target) == before
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(seen["run"].id)
    assert run.name == "production-head" and "production" in run.tags
    assert "CREATE TABLE t2" in seen["description"], "the approver sees the SQL"

    approver = threading.Thread(target=resume_when_paused,
                                args=({"decision": "approve", "approver": "Alice Ops", "comment": "CHG-42"}, seen))
    approver.start()
    state = run_flow(environment=name, alembic_config=ini)
    approver.join()
    assert state.is_completed(), state.message
    report = last_report(home)
    assert report["status"] == "succeeded" and report["revision_after"] == "r2"
    assert report["approval"] == {"approved": True, "approver": "Alice Ops", "via": "prefect-ui", "comment": "CHG-42"}
    assert report["backup"] is not None, "production always backs up"

    summary = next(a for a in artifacts_of(state) if a.key == "db-migrate-production" and a.type == "markdown")
    assert "succeeded" in summary.data
    assert "approved by Alice Ops (prefect-ui)" in summary.data and "`base` → `r2`" in summary.data


def test_who_asked_is_recorded_and_may_not_approve_where_the_policy_says_so(environment, target, home, tmp_path):
    """Item 19: the report names who asked (the GitHub workflow's requested_by), not the worker's
    user; with approver_must_differ, the requester's own approval is refused saying why, someone
    else's goes through, and a run that does not say who asked is refused before anything."""
    import getpass

    name = environment("production", approver_must_differ=True, rehearse=False)
    ini = str(stock_project(tmp_path, linear(table_step("t1"))))
    before = fingerprint_of(target)
    asked = "alice (GitHub Actions run 7)"

    state = run_flow(environment=name, alembic_config=ini)
    assert state.is_failed() and state.message == (
        "this environment requires someone other than who asked for a run to approve it: say who asks (requested_by)")
    assert reports_in(home) == [] and fingerprint_of(target) == before

    seen = {}
    answer = threading.Thread(target=resume_when_paused, args=({"decision": "approve", "approver": "Alice"}, seen))
    answer.start()
    state = run_flow(environment=name, alembic_config=ini, requested_by=asked)
    answer.join()
    assert state.is_failed() and state.message == ("approval failed: Alice asked for this run and may not approve "
                                                   "it too: this environment requires someone else to approve: "
                                                   "nothing was changed")
    assert fingerprint_of(target) == before
    report = last_report(home)
    assert (report["requested_by"], report["operator"]) == (asked, getpass.getuser())

    answer = threading.Thread(target=resume_when_paused, args=({"decision": "approve", "approver": "Bob"}, seen))
    answer.start()
    state = run_flow(environment=name, alembic_config=ini, requested_by=asked)
    answer.join()
    assert state.is_completed(), state.message
    report = last_report(home)
    assert report["requested_by"] == asked and report["approval"]["approver"] == "Bob"
    assert f"**requested by** {asked}" in artifact("db-migrate-production")


def test_production_approval_that_times_out_changes_nothing(environment, target, home, tmp_path):
    ini = str(stock_project(tmp_path, linear(table_step("t1"))))
    before = fingerprint_of(target)
    state = run_flow(environment=environment("production", approval_timeout_s=3), alembic_config=ini)
    assert state.is_failed() and state.message == "approval failed: nobody approved within 3s: nothing was changed"
    assert fingerprint_of(target) == before
    report = last_report(home)
    assert report["error"]["phase"] == "approval"
    # production rehearses before asking: its backup, restored into the rehearsal's copy, came first
    assert report["backup"]["id"] == report["rehearsal"]["backup_id"] and report["rehearsal"]["failed"] is None
    assert report["error"]["message"] == "nobody approved within 3s: nothing was changed"
    assert "**failed in** **approval**: nobody approved within 3s" in artifact("db-migrate-production")
    assert "approval failed: nobody approved within 3s" in run_logs(state), "logged after Alembic rendered the SQL"


@pytest.mark.parametrize("flow_name, parameters", [
    ("db-migrate", {"alembic_config": "{ini}"}),
    ("db-rollback", {"to_revision": "base", "dry_run": False, "alembic_config": "{ini}"}),
    ("db-health", {"alembic_config": "{ini}"}),
    ("db-backup", {}),
], ids=["db-migrate", "db-rollback", "db-health", "db-backup"])
def test_a_deployment_refuses_the_database_of_another_environment(flow_name, parameters, environment, target, home,
                                                                  tmp_path):
    """db-<flow>/staging pointed at production's credentials block changes nothing and leaves nothing
    keyed staging."""
    production = environment("production")
    environment("staging")
    ini = str(stock_project(tmp_path, linear(table_step("t1"))))
    before = fingerprint_of(target)
    parameters = {k: v.format(ini=ini) if isinstance(v, str) else v for k, v in parameters.items()}
    state = run_named(flow_name, environment="staging", credentials_block=production, **parameters)
    assert state.is_failed(), state.message
    assert state.message == "deployment for staging refuses the production database (block 'production')"
    assert "staging" not in flow_run_of(state).tags and not artifacts_of(state)
    assert not task_runs_of(state), "it ran a phase"
    assert fingerprint_of(target) == before
    assert not (home / "backups").exists() and not reports_in(home), "no backup taken, no report of a run"


def test_a_block_recording_production_is_refused_by_the_staging_deployment(environment, target, home, tmp_path):
    ini = str(stock_project(tmp_path, linear(table_step("t1"))))
    before = fingerprint_of(target)
    environment("staging", database_of="production")  # the block named staging says: production's database
    state = run_flow(environment="staging", alembic_config=ini)
    assert state.is_failed()
    assert state.message == "deployment for staging refuses the production database (block 'staging')"
    assert fingerprint_of(target) == before
    assert not (home / "backups").exists() and not reports_in(home), "no backup taken, no report of a run"


def test_a_block_recording_production_gets_the_production_policy(environment, target, home, tmp_path):
    name = environment("production")
    environment("main-db", database_of=name)
    ini = str(stock_project(tmp_path, linear(table_step("t1"))))
    before = fingerprint_of(target)

    seen = {}
    rejecter = threading.Thread(target=resume_when_paused, args=({"decision": "reject", "approver": "bob"}, seen))
    rejecter.start()
    state = run_flow(environment=name, credentials_block="main-db", alembic_config=ini)
    rejecter.join()
    assert state.is_failed() and state.message == "approval failed: not approved by bob: nothing was changed"
    assert str(seen["run"].id) == str(state.state_details.flow_run_id), "it paused for approval"
    assert fingerprint_of(target) == before
    assert last_report(home)["environment"] == "production"
    assert "production" in flow_run_of(state).tags
    assert {a.key for a in artifacts_of(state)} >= {"db-migrate-production"}
