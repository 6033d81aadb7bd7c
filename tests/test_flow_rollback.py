"""Rollback in the flows: db-migrate's automatic rollback (downgrade, else the backup restored) and the
operator's db-rollback flow (to a revision, from a backup), against a real Prefect API (the test harness) and
PostgreSQL."""

import json
import threading

from tests.support.flows import (artifact, artifacts_of, resume_when_paused, run_flow, run_logs, run_named,
                                 task_runs_of, wait_for_approval_form)
from tests.support.helpers import fingerprint_of, last_report, sql
from tests.support.pgcluster import CANARY_PASSWORD
from tests.support.projects import CREATE, linear, stock_project, table_step


def at_r1_with_rows(tmp_path, cli, url, target, *steps) -> str:
    """A stock project (one transaction per revision) whose database is at r1 with rows in t1."""
    ini = str(stock_project(tmp_path, linear(*steps), transaction_per_migration=True))
    assert cli("upgrade", "-r", "r1", "--yes", "--alembic-config", ini, env={"DATABASE_URL": url}).returncode == 0
    sql(target, "INSERT INTO t1 VALUES (1), (2), (3)")
    return ini


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
    approver = threading.Thread(target=resume_when_paused, args=({"decision": "approve", "approver": "Frank"}, seen))
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
        resumer = threading.Thread(target=resume_when_paused, args=(answer, seen))
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
    wait_for_approval_form(seen)
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
