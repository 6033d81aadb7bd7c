"""The Prefect flows against a real Prefect API (test harness), PostgreSQL and S3."""

import json
import os
import threading
import time

import pytest

from tests.support.helpers import assert_no_canary, fingerprint_of, last_report, open_to_others, reports_in, sql
from tests.support.pgcluster import CANARY_PASSWORD, free_port
from tests.support.projects import BEST_EFFORT_INDEX, DUPLICATES, linear, stock_project

CREATE = "op.create_table('{0}', sa.Column('id', sa.Integer, primary_key=True))"
DROP = "op.drop_table('{0}')"


def table_step(name: str) -> tuple[str, str]:
    return CREATE.format(name), DROP.format(name)


def run_flow(**parameters):
    return run_named("db-migrate", **parameters)


def run_named(flow_name: str, **parameters):
    from flows.db_rollback import db_rollback
    from flows.maintenance import db_backup, db_health
    from flows.migrate import db_migrate

    flow = {"db-migrate": db_migrate, "db-rollback": db_rollback, "db-health": db_health, "db-backup": db_backup}
    return flow[flow_name](return_state=True, **parameters)


def at_r1_with_rows(tmp_path, cli, url, target, *steps) -> str:
    """A stock project (one transaction per revision) whose database is at r1 with rows in t1."""
    ini = str(stock_project(tmp_path, linear(*steps), transaction_per_migration=True))
    assert cli("upgrade", "-r", "r1", "--yes", "--alembic-config", ini, env={"DATABASE_URL": url}).returncode == 0
    sql(target, "INSERT INTO t1 VALUES (1), (2), (3)")
    return ini


def test_a_run_writes_its_backup_and_report_for_the_workers_user_alone(environment, target, home, tmp_path):
    """A worker started with the common umask 022 (not by `local up`): the run's dump, manifest and
    report, and the directories made for them, get no group or other bits."""
    ini = str(stock_project(tmp_path, linear(table_step("t1"))))
    previous = os.umask(0o022)
    try:
        state = run_flow(environment=environment("staging"), alembic_config=ini)
    finally:
        os.umask(previous)
    assert state.is_completed(), state.message
    assert any((home / "backups").rglob("*.json")) and reports_in(home)
    assert open_to_others(home) == []


def test_staging_failure_rolls_back_to_the_starting_revision(environment, target, home, tmp_path, cli, url):
    ini = at_r1_with_rows(tmp_path, cli, url, target, table_step("t1"), table_step("t2"), table_step("t3"),
                          ("op.execute('SELECT 1/0')", "pass"))
    before = fingerprint_of(target)

    state = run_flow(environment=environment("staging"), alembic_config=ini)
    assert state.is_failed()
    assert state.message.startswith("migrate failed: revision r4 failed: division by zero")
    assert "rollback: database back at the starting revision" in state.message
    assert fingerprint_of(target) == before

    report = last_report(home)
    assert report["status"] == "failed" and report["error"]["phase"] == "migrate"
    assert [m["revision"] for m in report["migrations_applied"]] == ["r2", "r3"]
    assert report["rollback"] == {
        "performed": True, "method": "downgrade", "succeeded": True, "revision_after": "r1",
        "detail": "database back at the starting revision with the same schema and row counts",
    }
    assert report["backup"]["verified"] is False and report["approval"]["via"] == "policy"

    task_runs = task_runs_of(state)
    assert len([t for t in task_runs if t.name.startswith("rollback")]) == 1, [t.name for t in task_runs]
    assert not [t.name for t in task_runs if t.task_inputs.get("__parents__")], "no task runs inside another"


def test_a_run_that_leaves_an_invalid_index_fails_validation_and_rolls_back(environment, target, home, tmp_path,
                                                                            cli, url):
    ini = str(stock_project(tmp_path, linear(DUPLICATES, (BEST_EFFORT_INDEX, "op.execute('DROP INDEX ix_t_n')"))))
    assert cli("upgrade", "-r", "r1", "--yes", "--alembic-config", ini, env={"DATABASE_URL": url}).returncode == 0
    before = fingerprint_of(target)

    state = run_flow(environment=environment("staging"), alembic_config=ini)
    assert state.is_failed()
    assert state.message == ("validate failed: validation failed: invalid index(es) left by the run: public.ix_t_n "
                             "on public.t (a CREATE INDEX CONCURRENTLY failed): drop and build again; rollback: "
                             "database back at the starting revision with the same schema and row counts")
    assert fingerprint_of(target) == before, "the downgrade dropped the invalid index"
    report = last_report(home)
    assert (report["error"]["phase"], report["rollback"]["succeeded"]) == ("validate", True)
    assert {c["name"]: c["status"] for c in report["validation"]}["invalid_indexes"] == "fail"


def test_production_refuses_to_run_without_a_backup(environment, target, tmp_path):
    ini = str(stock_project(tmp_path, linear(table_step("t1"))))
    state = run_flow(environment=environment("production"), alembic_config=ini, backup=False)
    assert state.is_failed() and "requires a backup before migrating: backup=false is refused" in state.message
    assert fingerprint_of(target).revisions == ()


def _wait_for_approval_form(seen: dict) -> None:
    """Wait for a run paused for approval whose form is there; keep the run and the
    description the approver reads in ``seen``."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType
    from prefect.input.actions import read_flow_run_input
    from prefect.input.run_input import keyset_from_paused_state

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        with get_client(sync_client=True) as client:
            paused = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PAUSED]))))
        description = paused and read_flow_run_input(keyset_from_paused_state(paused[0].state)["description"],
                                                     flow_run_id=paused[0].id)
        if description:
            seen.update(run=paused[0], description=description)
            return
        time.sleep(0.5)


def _resume_when_paused(answer: dict, seen: dict):
    """Answer the approval form as an operator in the UI would."""
    from prefect.flow_runs import resume_flow_run

    _wait_for_approval_form(seen)
    resume_flow_run(seen["run"].id, run_input=answer)


def test_production_waits_for_approval(environment, target, home, tmp_path):
    from prefect.client.orchestration import get_client

    name = environment("production")
    ini = str(stock_project(tmp_path, linear(table_step("t1"), table_step("t2"))))
    before = fingerprint_of(target)

    seen = {}
    rejecter = threading.Thread(target=_resume_when_paused, args=({"decision": "reject", "approver": "bob"}, seen))
    rejecter.start()
    state = run_flow(environment=name, alembic_config=ini)
    rejecter.join()
    assert state.is_failed() and state.message == "approval failed: not approved by bob: nothing was changed"
    assert fingerprint_of(target) == before
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(seen["run"].id)
    assert run.name == "production-head" and "production" in run.tags
    assert "CREATE TABLE t2" in seen["description"], "the approver sees the SQL"

    approver = threading.Thread(target=_resume_when_paused,
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


def test_unreachable_s3_retries_the_backup_then_fails_before_migrating(environment, target, home, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from tests.support.helpers import s3_bucket_block

    dead = s3_bucket_block(f"http://127.0.0.1:{free_port()}", "gone", client_config={"retries": {"max_attempts": 1}})
    dead.save("dead-bucket", overwrite=True)
    ini = str(stock_project(tmp_path, linear(table_step("t1"))))
    before = fingerprint_of(target)

    state = run_flow(environment=environment("staging"), alembic_config=ini, backup_storage="s3-bucket/dead-bucket")
    assert state.is_failed() and state.message.startswith("backup failed: storage: upload to s3://gone/")
    assert fingerprint_of(target) == before
    assert last_report(home)["migrations_applied"] == []
    with get_client(sync_client=True) as client:
        task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(
            id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
    [backup_run] = [t for t in task_runs if t.name.startswith("backup")]
    assert backup_run.run_count == 3, "two retries of the transient upload failure"
    assert not any(t.name.startswith("migrate") for t in task_runs)


def test_a_backup_storage_naming_a_missing_block_fails_the_backup_saying_how_to_create_it(
        environment, target, home, tmp_path, monkeypatch):
    """The README's worker command before anyone created the block: the run fails in the backup
    phase (not the guard's), says how to create the block, and changes and stores nothing."""
    monkeypatch.setenv("DBMIGRATE_BACKUP_STORAGE", "s3-bucket/backups")
    ini = str(stock_project(tmp_path, linear(table_step("t1"))))
    before = fingerprint_of(target)

    state = run_flow(environment=environment("staging"), alembic_config=ini)
    assert state.is_failed()
    assert state.message == (
        "backup failed: no S3Bucket block named 'backups': create it (`dbmigrate blocks sync --env ENV --from-env` "
        "with BACKUP_BUCKET set, or a prefect-aws S3Bucket block saved as 'backups' in the Prefect UI), or give "
        "another backup storage (README 'Backups')")
    report = last_report(home)
    assert report["error"]["phase"] == "backup" and report["backup"] is None and report["migrations_applied"] == []
    assert fingerprint_of(target) == before
    assert sorted(p.name for p in home.iterdir()) == ["reports"], "nothing but the report was written"


def test_two_concurrent_runs_exactly_one_migrates(environment, target, home, tmp_path):
    name = environment("staging")
    ini = str(stock_project(tmp_path, linear(("op.execute('SELECT pg_sleep(3)'); " + CREATE.format("t1"), "pass"))))
    states = []
    runs = [threading.Thread(target=lambda: states.append(run_flow(environment=name, alembic_config=ini)))
            for _ in range(2)]
    for run in runs:
        run.start()
    for run in runs:
        run.join()
    assert sorted(s.is_completed() for s in states) == [False, True]
    loser = next(s for s in states if s.is_failed())
    assert "another" in loser.message and ("holds" in loser.message)
    assert fingerprint_of(target).revisions == ("r1",)


def test_the_canary_password_appears_nowhere(environment, target, home, tmp_path):
    """Logs, artifacts, reports, backups' manifests, and pg_dump's command line."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter

    from tests.support.helpers import recording_pg_dump

    shim_dir, argv_log = recording_pg_dump(target, tmp_path)
    ini = str(stock_project(tmp_path / "project", linear(table_step("t1"))))
    import os

    os.environ["PG_BIN_DIR"] = str(shim_dir)
    try:
        state = run_flow(environment=environment("development"), alembic_config=ini)
    finally:
        del os.environ["PG_BIN_DIR"]
    assert state.is_completed(), state.message
    assert argv_log.read_text().strip(), "the pg_dump shim was used"
    assert_no_canary(argv_log.read_text(), "pg_dump's command line")
    with get_client(sync_client=True) as client:
        logs = client.read_logs(LogFilter())
        artifacts = client.read_artifacts()
        runs = client.read_flow_runs()
    assert logs and artifacts
    assert_no_canary("\n".join(log.message for log in logs), "the flow-run logs")
    assert_no_canary("\n".join(str(a.data) + str(a.description) for a in artifacts), "the artifacts")
    assert_no_canary("\n".join(json.dumps(r.parameters) for r in runs), "the flow-run parameters")
    reports, manifests = reports_in(home), sorted((home / "backups").rglob("*.json"))
    assert reports and manifests, "the run wrote a report and a backup manifest"
    for path in reports + manifests:
        assert_no_canary(path.read_text(), str(path))


def test_staging_restores_the_backup_when_the_downgrade_fails(environment, target, home, tmp_path, cli, url):
    ini = at_r1_with_rows(tmp_path, cli, url, target, table_step("t1"),
                          (CREATE.format("t2"), "op.execute('SELECT 1/0')"),  # a downgrade that cannot run
                          ("op.execute('SELECT 1/0')", "pass"))
    before = fingerprint_of(target)

    state = run_flow(environment=environment("staging"), alembic_config=ini)
    assert state.is_failed()
    assert state.message.startswith("migrate failed: revision r3 failed: division by zero")
    assert fingerprint_of(target) == before, "the pre-migration backup put the database back"

    report = last_report(home)
    assert [m["revision"] for m in report["migrations_applied"]] == ["r2"]
    rollback = report["rollback"]
    assert (rollback["method"], rollback["succeeded"], rollback["revision_after"]) == ("restore", True, "r1")
    assert rollback["detail"] == ("downgrade failed (revision r2 failed: division by zero); database back at "
                                  "the starting revision with the same schema and row counts")
    assert "migrate failed: revision r3 failed: division by zero" in run_logs(state), \
        "the run log survives the project's env.py (stock template: fileConfig)"


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
    answer = threading.Thread(target=_resume_when_paused, args=({"decision": "approve", "approver": "Alice"}, seen))
    answer.start()
    state = run_flow(environment=name, alembic_config=ini, requested_by=asked)
    answer.join()
    assert state.is_failed() and state.message == ("approval failed: Alice asked for this run and may not approve "
                                                   "it too: this environment requires someone else to approve: "
                                                   "nothing was changed")
    assert fingerprint_of(target) == before
    report = last_report(home)
    assert (report["requested_by"], report["operator"]) == (asked, getpass.getuser())

    answer = threading.Thread(target=_resume_when_paused, args=({"decision": "approve", "approver": "Bob"}, seen))
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


def run_logs(state) -> str:
    """Everything the flow run logged to the Prefect API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=10)  # logs reach the API in batches
    with get_client(sync_client=True) as client:
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[state.state_details.flow_run_id])))
    return "\n".join(log.message for log in logs)


def artifact(key: str) -> str:
    """The newest version of the artifact with this key."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    with get_client(sync_client=True) as client:
        [latest] = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])),
                                         sort=ArtifactSort.CREATED_DESC, limit=1)
    return latest.data


def test_db_rollback_to_a_revision_dry_run_first_then_approved(environment, target, home, tmp_path, cli, url):
    ini = str(stock_project(tmp_path, linear(table_step("t1"), table_step("t2"))))
    assert cli("upgrade", "--yes", "--alembic-config", ini, env={"DATABASE_URL": url}).returncode == 0
    before = fingerprint_of(target)
    name = environment("production")

    state = run_named("db-rollback", environment=name, to_revision="r1", alembic_config=ini)
    assert state.is_completed(), state.message
    assert state.result()["status"] == "dry_run" and fingerprint_of(target) == before
    assert "DROP TABLE t2" in artifact("db-rollback-production-sql")
    keys = {a.key for a in artifacts_of(state)}
    assert keys and all(k.startswith("db-rollback-production") for k in keys), "never the db-migrate summary"

    seen = {}
    approver = threading.Thread(target=_resume_when_paused, args=({"decision": "approve", "approver": "Frank"}, seen))
    approver.start()
    state = run_named("db-rollback", environment=name, to_revision="r1", dry_run=False, alembic_config=ini,
                      requested_by="carol")
    approver.join()
    assert state.is_completed(), state.message
    assert fingerprint_of(target).revisions == ("r1",)
    report = last_report(home)
    assert (report["operation"], report["revision_before"], report["revision_after"]) == ("downgrade", "r2", "r1")
    assert report["requested_by"] == "carol" and report["backup"]["id"], "a backup of the state before the downgrade"
    assert report["approval"]["approver"] == "Frank" and report["approval"]["via"] == "prefect-ui"
    assert seen["description"].startswith("## Approve downgrade of production: r2 → r1\n")
    assert "DROP TABLE t2" in seen["description"], "the approver sees the downgrade's SQL"
    assert seen["run"].state.message.startswith("waiting for approval of r2 → r1 in production: click Resume")

    state = run_named("db-rollback", environment=name, alembic_config=ini)
    assert state.is_failed() and state.message == "give exactly one of to_revision and backup_id"


def test_db_backup_then_db_rollback_from_it_in_production(environment, target, home, tmp_path, cli, url):
    from dbmigrate import catalogue
    from dbmigrate.storage import LocalStorage
    from dbmigrate.target import DatabaseTarget

    name = environment("production")
    ini = str(stock_project(tmp_path, linear(table_step("t1"))))
    assert cli("upgrade", "--yes", "--alembic-config", ini, env={"DATABASE_URL": url}).returncode == 0
    sql(target, "INSERT INTO t1 VALUES (1), (2), (3)")
    state = run_named("db-backup", environment=name, verify_restore=True)
    assert state.is_completed(), state.message
    backed_up = fingerprint_of(target)
    backup_id = state.result()["id"]
    assert state.result()["verified"] and backup_id in artifact("db-migrate-production-backup-summary")

    sql(target, "INSERT INTO t1 VALUES (4), (5)")
    changed = fingerprint_of(target)

    state = run_named("db-rollback", environment=name, backup_id=backup_id)
    assert state.is_completed(), state.message
    assert state.result()["tables_changing"] == ["public.t1"] and fingerprint_of(target) == changed

    seen = {}

    def rollback_answered(answer: dict):
        resumer = threading.Thread(target=_resume_when_paused, args=(answer, seen))
        resumer.start()
        try:
            return run_named("db-rollback", environment=name, backup_id=backup_id, dry_run=False)
        finally:
            resumer.join()

    state = rollback_answered({"decision": "reject", "approver": "dave"})
    assert state.is_failed() and state.message == "restore not approved by dave: nothing was changed"
    assert seen["run"].state.message.startswith(f"waiting for approval of the restore of backup {backup_id} over "
                                                "production: click Resume")
    assert fingerprint_of(target) == changed
    refused = last_report(home)
    assert (refused["operation"], refused["status"], refused["error"]["phase"]) == ("restore", "failed", "approval")
    assert json.loads(artifact("db-rollback-production-report").split("```json\n")[1].split("```")[0]) == refused

    state = rollback_answered({"decision": "approve", "approver": "Erin"})
    assert state.is_completed(), state.message
    assert fingerprint_of(target) == backed_up
    result = state.result()
    assert result["approval"]["approver"] == "Erin"
    listed = [m.id for m in catalogue.list_backups(LocalStorage(home / "backups"), DatabaseTarget(target.url, name))]
    assert result["safety_backup"] in listed, "the state before the restore was backed up first"
    assert "Approved by Erin (prefect-ui)" in artifact("db-rollback-production-restore")
    assert "**succeeded**" in artifact("db-rollback-production")
    report = last_report(home)
    assert (report["operation"], report["status"], report["approval"]["approver"]) == ("restore", "succeeded", "Erin")
    assert report["restore"] == {"backup_id": backup_id, "tables_changing": ["public.t1"],
                                 "safety_backup": result["safety_backup"]}
    assert {a.key for a in artifacts_of(state)} == {"db-rollback-production", "db-rollback-production-restore",
                                                   "db-rollback-production-report"}


def test_db_health_reports_pending_revisions_and_drift(environment, target, tmp_path, cli, url, pg_cluster):
    ini = str(stock_project(tmp_path, linear(table_step("t1"), table_step("t2"))))
    assert cli("upgrade", "-r", "r1", "--yes", "--alembic-config", ini, env={"DATABASE_URL": url}).returncode == 0
    name = environment("staging")

    state = run_named("db-health", environment=name, alembic_config=ini)
    assert state.is_completed(), state.message
    checks = {c["name"]: c for c in state.result()}
    assert checks["pending_revisions"]["status"] == "warn" and checks["drift"]["status"] == "ok"
    assert checks["drift"]["data"] == {"revision": "r1", "drift": False, "findings": [],
                                       "models": "models not compared: the database is not at head (r2)"}

    sql(target, "ALTER TABLE t1 ADD COLUMN hotfix text")  # a change made by hand, outside Alembic
    state = run_named("db-health", environment=name, alembic_config=ini)
    assert state.is_failed()
    assert state.message == ("health failed: drift: 1 difference(s) from the migrations at r1: extra column "
                             "public.t1.hotfix (text); models not compared: the database is not at head (r2)")
    report = artifact("db-migrate-staging-health")
    assert "| drift | fail |" in report
    assert report.endswith("### drift: 1 finding(s)\n\n- extra column public.t1.hotfix (text)")
    assert not [n for n in pg_cluster.databases() if n.startswith("dbmigrate_drift_")], "scratch database dropped"


def test_db_backup_to_an_s3_bucket_block_prunes_but_keeps_the_newest_verified(environment, target, s3_endpoint):
    import uuid

    from dbmigrate import catalogue
    from dbmigrate.storage import S3Storage
    from dbmigrate.target import DatabaseTarget
    from tests.support.helpers import s3_bucket_block

    block = s3_bucket_block(s3_endpoint, "nightly-" + uuid.uuid4().hex[:8], "db")
    storage = S3Storage.from_block(block)
    storage.client.create_bucket(Bucket=block.bucket_name)
    block.save("nightly-backups", overwrite=True)
    name = environment("production")
    production = DatabaseTarget(target.url, name)

    def nightly(**parameters) -> str:
        state = run_named("db-backup", environment=name, backup_storage="s3-bucket/nightly-backups", **parameters)
        assert state.is_completed(), state.message
        return state.result()["id"]

    verified = nightly(verify_restore=True)
    unverified = nightly(verify_restore=False, keep_last=1)
    assert [m.id for m in catalogue.list_backups(storage, production)] == [unverified, verified], \
        "the newest verified backup is never pruned"
    newest = nightly(verify_restore=True, keep_last=1)
    assert [m.id for m in catalogue.list_backups(storage, production)] == [newest]
    assert sorted(storage.keys("")) == sorted(f"production/{target.database}/{newest}.{ext}" for ext in ("dump", "json"))


def test_a_rollback_that_cannot_reach_the_database_says_so(environment, target, home, tmp_path, cli, url):
    """The migration locks its own role out, then fails: the report keeps the migration's error
    and says the rollback could not run, rather than pretend or lose either."""
    import uuid

    from blocks import DatabaseCredentials

    role = "migrator_" + uuid.uuid4().hex[:8]
    sql(target, f"CREATE ROLE {role} LOGIN SUPERUSER PASSWORD '{CANARY_PASSWORD}'")
    DatabaseCredentials(host="127.0.0.1", port=target.port, database=target.database, username=role,
                        password=CANARY_PASSWORD, sslmode="disable", connect_timeout=5,
                        environment="staging").save("locked-out", overwrite=True)
    ini = at_r1_with_rows(tmp_path, cli, url, target, table_step("t1"),
                          ("op.execute('ALTER ROLE CURRENT_USER NOLOGIN')", "pass"),
                          ("op.execute('SELECT 1/0')", "pass"))
    try:
        state = run_flow(environment=environment("staging"), credentials_block="locked-out", alembic_config=ini)
    finally:
        sql(target, f"DROP ROLE {role}")
    assert state.is_failed()
    # never a guess: r2 is reported because its COMMIT returned (one transaction per revision)
    unknown = "revisions committed before: r2; could not read which revisions the database kept: run `dbmigrate status`"
    assert state.message.startswith(f"migrate failed: revision r3 failed: division by zero; {unknown}; "
                                    "rollback: rollback could not run: cannot connect to")
    report = last_report(home)
    assert report["error"]["message"] == f"revision r3 failed: division by zero; {unknown}"
    assert [step["revision"] for step in report["migrations_applied"]] == ["r2"]
    assert report["rollback"]["succeeded"] is False and report["revision_after"] is None
    assert fingerprint_of(target).revisions == ("r2",), "nothing pretended to roll back"


def test_db_rollback_does_not_run_while_a_migration_waits_for_approval(environment, target, tmp_path):
    from prefect.flow_runs import resume_flow_run
    from prefect.utilities.urls import url_for

    name = environment("production")
    ini = str(stock_project(tmp_path, linear(table_step("t1"))))
    before = fingerprint_of(target)
    migrations = []
    migration = threading.Thread(target=lambda: migrations.append(run_flow(environment=name, alembic_config=ini)))
    migration.start()
    seen = {}
    _wait_for_approval_form(seen)
    assert "run" in seen, f"the migration did not pause: {migrations[0].message if migrations else 'still running'}"
    try:
        state = run_named("db-rollback", environment=name, to_revision="base", alembic_config=ini)
    finally:
        resume_flow_run(seen["run"].id, run_input={"decision": "reject", "approver": "gina"})
        migration.join()
    assert state.is_failed()
    holder = seen["run"]  # named by its link: every run of the same revision has the same name
    assert state.message == ("concurrency failed: another run for production holds db-migrate-production: "
                             f"'production-head' (Paused): {url_for(holder)}")
    assert url_for(holder).endswith(f"/runs/flow-run/{holder.id}")
    assert migrations[0].is_failed() and fingerprint_of(target) == before


def flow_run_of(state):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(state.state_details.flow_run_id)


def artifacts_of(state) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        return client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])))


def task_runs_of(state) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        return client.read_task_runs(flow_run_filter=FlowRunFilter(
            id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))


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
    rejecter = threading.Thread(target=_resume_when_paused, args=({"decision": "reject", "approver": "bob"}, seen))
    rejecter.start()
    state = run_flow(environment=name, credentials_block="main-db", alembic_config=ini)
    rejecter.join()
    assert state.is_failed() and state.message == "approval failed: not approved by bob: nothing was changed"
    assert str(seen["run"].id) == str(state.state_details.flow_run_id), "it paused for approval"
    assert fingerprint_of(target) == before
    assert last_report(home)["environment"] == "production"
    assert "production" in flow_run_of(state).tags
    assert {a.key for a in artifacts_of(state)} >= {"db-migrate-production"}


def run_in_engine_process(prefect_api: str, entrypoint: str, **parameters):
    """Run a flow the way a worker does: a flow run created through the API, executed by
    `python -m prefect.engine` in a process of its own. Returns the finished flow run."""
    import os
    import subprocess
    import sys

    from prefect.client.orchestration import get_client
    from prefect.flows import load_flow_from_entrypoint

    from tests.support.helpers import REPO

    with get_client(sync_client=True) as client:
        run = client.create_flow_run(load_flow_from_entrypoint(str(REPO / entrypoint)), parameters=parameters)
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "PREFECT__FLOW_RUN_ID": str(run.id),
           "PREFECT__FLOW_ENTRYPOINT": entrypoint, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-m", "prefect.engine"], cwd=REPO, env=env, capture_output=True, timeout=120)
    with get_client(sync_client=True) as client:
        return client.read_flow_run(run.id)


@pytest.mark.parametrize("failure", ["refused before the run", "a phase fails"])
def test_an_expected_failure_logs_one_line_and_no_traceback(failure, environment, prefect_api, target, tmp_path):
    ini = str(stock_project(tmp_path, linear(table_step("t1"))))
    if failure == "refused before the run":
        parameters = {"environment": environment("production"), "backup": False}
        reason = "this environment requires a backup before migrating: backup=false is refused"
    else:  # the health_checks task fails: nothing listens where the block points
        port = free_port()
        parameters = {"environment": environment("staging", port=port, transient_retries=0)}
        reason = f"health_checks failed: cannot connect to 127.0.0.1:{port}/{target.database}: connection refused"
    run = run_in_engine_process(prefect_api, "flows/migrate.py:db_migrate", alembic_config=ini, **parameters)
    assert run.state.is_failed() and run.state.message.startswith(reason), run.state.message
    logs = run_logs(run.state)
    assert run.state.message in logs.splitlines()
    assert "Traceback" not in logs and "unexpected exception" not in logs, logs


class ServerComingUp:
    """A loopback port where nothing listens until :meth:`start`, then a TCP forwarder
    to the test cluster: a database server that comes up late."""

    def __init__(self, upstream_port: int):
        import socket

        self.upstream_port, self.port, self.listener = upstream_port, free_port(), socket.socket()

    def start(self) -> None:
        self.listener.bind(("127.0.0.1", self.port))
        self.listener.listen()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket

        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:  # closed
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source, sink) -> None:
        import socket

        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                try:
                    end.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.listener.close()


@pytest.mark.parametrize("flow_name", ["db-migrate", "db-health"])
def test_health_checks_retry_until_the_server_comes_up(flow_name, environment, target, tmp_path):
    import logging

    server = ServerComingUp(target.port)
    refused = threading.Event()

    def watch(record: logging.LogRecord) -> bool:
        """Start the server once the first attempt failed, before the retry delay is over. A logger
        filter that keeps every record: Prefect replaces the handlers when it sets up logging."""
        if "connection refused" in record.getMessage() and not refused.is_set():
            refused.set()
            server.start()
        return True

    ini = str(stock_project(tmp_path, linear(table_step("t1"))))
    logging.getLogger("prefect.task_runs").addFilter(watch)
    try:
        state = run_named(flow_name, alembic_config=ini,
                          environment=environment("staging", port=server.port, retry_delay_s=2, transient_retries=3))
    finally:
        logging.getLogger("prefect.task_runs").removeFilter(watch)
        server.close()
    assert refused.is_set(), "the first attempt found nothing listening"
    assert state.is_completed(), state.message
    assert fingerprint_of(target).revisions == (("r1",) if flow_name == "db-migrate" else ())
    [health_run] = [t for t in task_runs_of(state) if t.name.startswith("health_checks")]
    assert health_run.run_count == 2 and health_run.state.is_completed()


def test_the_report_artifact_holds_the_whole_report_and_where_it_is(environment, target, home, tmp_path,
                                                                     s3_endpoint):
    """`<flow>-<environment>-report`, read through the API: the report file's JSON, byte for byte,
    in the artifact's one ```json fence (what the GitHub workflow saves), and where it is stored
    (the worker's host and absolute path, or the S3 copy)."""
    import re
    import socket
    import uuid

    from dbmigrate.storage import S3Storage
    from tests.support.helpers import s3_bucket_block

    def fetch(flow_run_id, key: str) -> str:
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

        with get_client(sync_client=True) as client:
            [artifact] = client.read_artifacts(artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]), key=ArtifactFilterKey(any_=[key])))
        [body] = re.findall(r"^```json\n(.*?)^```$", artifact.data, re.DOTALL | re.MULTILINE)
        return body
    ini = str(stock_project(tmp_path, linear(table_step("t1"), table_step("t2"))))
    name = environment("staging")

    def published(state, key: str) -> str:
        [markdown] = [a.data for a in artifacts_of(state) if a.key == key]
        assert_no_canary(markdown, f"the artifact {key}")
        assert fetch(state.state_details.flow_run_id, key) == reports_in(home)[-1].read_text()
        return markdown

    state = run_flow(environment=name, alembic_config=ini, target_revision="r1")
    assert state.is_completed(), state.message
    markdown = published(state, "db-migrate-staging-report")
    assert f"Stored at `{socket.gethostname()}:{reports_in(home)[-1]}`." in markdown

    block = s3_bucket_block(s3_endpoint, "reports-" + uuid.uuid4().hex[:8])
    S3Storage.from_block(block).client.create_bucket(Bucket=block.bucket_name)
    block.save("report-bucket", overwrite=True)
    state = run_flow(environment=name, alembic_config=ini, backup_storage="s3-bucket/report-bucket")
    assert state.is_completed(), state.message
    [copy] = last_report(home)["copies"]
    assert copy.startswith(f"s3://{block.bucket_name}/reports/")
    assert f"Stored at `{copy}`." in published(state, "db-migrate-staging-report")

    state = run_named("db-rollback", environment=name, to_revision="r1", alembic_config=ini)
    assert state.is_completed() and state.result()["status"] == "dry_run"
    published(state, "db-rollback-staging-report")


def test_lock_retries_of_the_policy_wait_out_a_held_lock_and_show_every_attempt(environment, target, home,
                                                                                  tmp_path):
    """The EnvironmentPolicy's schedule: the approval form says how locks are taken, the run
    waits out a table held for 2 s in short attempts, and the report and the artifact list them."""
    from tests.support.helpers import held

    # No backup, no automatic rollback: pg_dump and the fingerprint would queue behind the held lock themselves.
    name = environment("staging", approval_required=True, auto_rollback=False, lock_retry_timeouts_s=[0.1, 0.2, 0.5],
                       lock_retry_pause_s=0.3, lock_retry_total_s=30)
    ini = str(stock_project(tmp_path, linear(table_step("t1"), "op.add_column('t1', sa.Column('note', sa.Text))")))
    sql(target, "CREATE TABLE t1 (id int PRIMARY KEY); CREATE TABLE alembic_version (version_num varchar(32) "
                "PRIMARY KEY); INSERT INTO alembic_version VALUES ('r1')")
    seen = {}
    approver = threading.Thread(target=_resume_when_paused, args=({"decision": "approve", "approver": "Ann"}, seen))
    approver.start()
    with held(target, hold_s=2) as holder:
        state = run_flow(environment=name, backup=False, alembic_config=ini)
    approver.join()
    assert state.is_completed(), state.message
    assert ("**Locks**: lock retries: lock_timeout 0.1, 0.2, 0.5 s (the last repeats), 0.3 s between attempts, "
            "giving up after 30 s") in seen["description"]

    attempts = last_report(home)["lock_attempts"]
    assert attempts[-1]["outcome"] == "succeeded" and len(attempts) >= 3
    assert {a["outcome"] for a in attempts[:-1]} == {"lock_timeout"}
    rows = json.loads(artifact("db-migrate-staging-lock-attempts"))
    assert [(r["attempt"], r["outcome"]) for r in rows] == [(a["number"], a["outcome"]) for a in attempts]
    assert any(f"pid {holder.pid} ('the-holder'" in r["blocked_by"] for r in rows)
    print(f"flow: {len(attempts)} attempts, waits {[a['waited_s'] for a in attempts]}")
