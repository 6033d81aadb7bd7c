"""The Prefect flows against a real Prefect API (test harness), PostgreSQL and S3."""

import json
import threading
import time

import pytest

from tests.conftest import assert_no_canary, fingerprint_of, reports_in
from tests.pgcluster import CANARY_PASSWORD, free_port
from tests.projects import linear, stock_project

CREATE = "op.create_table('{0}', sa.Column('id', sa.Integer, primary_key=True))"
DROP = "op.drop_table('{0}')"


def table_step(name: str) -> tuple[str, str]:
    return CREATE.format(name), DROP.format(name)


@pytest.fixture
def environment(prefect_api, target, home, monkeypatch):
    """Blocks for an environment named like the test's: credentials and a quick policy."""
    from blocks import DatabaseCredentials, EnvironmentPolicy

    monkeypatch.setenv("DBMIGRATE_HOME", str(home))

    def make(name: str, **policy) -> str:
        DatabaseCredentials(
            host="127.0.0.1", port=target.port, database=target.database, username="postgres",
            password=CANARY_PASSWORD, sslmode="disable", connect_timeout=5,
        ).save(name, overwrite=True)
        EnvironmentPolicy(retry_delay_s=0.2, approval_poll_s=1, **policy).save(name, overwrite=True)
        return name

    return make


def run_flow(**parameters):
    from flows.migrate import db_migrate

    return db_migrate(return_state=True, **parameters)


def last_report(home) -> dict:
    return json.loads(reports_in(home)[-1].read_text())


def test_staging_failure_rolls_back_to_the_starting_revision(environment, target, home, tmp_path, cli, url):
    ini = str(stock_project(tmp_path, linear(
        table_step("t1"), table_step("t2"), table_step("t3"),
        ("op.execute('SELECT 1/0')", "pass"),
    ), transaction_per_migration=True))
    assert cli("upgrade", "-r", "r1", "--yes", "--alembic-config", ini, env={"DATABASE_URL": url}).returncode == 0
    with __import__("dbmigrate.db", fromlist=["db"]).connect(target) as conn, conn.begin():
        conn.exec_driver_sql("INSERT INTO t1 VALUES (1), (2), (3)")
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


def test_production_refuses_to_run_without_a_backup(environment, target, tmp_path):
    ini = str(stock_project(tmp_path, linear(table_step("t1"))))
    state = run_flow(environment=environment("production"), alembic_config=ini, backup=False)
    assert state.is_failed() and "requires a backup before migrating: backup=false is refused" in state.message
    assert fingerprint_of(target).revisions == ()


def _resume_when_paused(answer: dict, seen: dict):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType
    from prefect.flow_runs import resume_flow_run

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        with get_client(sync_client=True) as client:
            paused = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PAUSED]))))
        if paused:
            seen["run"] = paused[0]
            resume_flow_run(paused[0].id, run_input=answer)
            return
        time.sleep(0.5)


def test_production_waits_for_approval(environment, target, home, tmp_path):
    from prefect.client.orchestration import get_client

    name = environment("production")
    ini = str(stock_project(tmp_path, linear(table_step("t1"), table_step("t2"))))
    before = fingerprint_of(target)

    seen = {}
    rejecter = threading.Thread(target=_resume_when_paused, args=({"approve": False, "approver": "bob"}, seen))
    rejecter.start()
    state = run_flow(environment=name, alembic_config=ini)
    rejecter.join()
    assert state.is_failed() and state.message == "approval failed: not approved by bob: nothing was changed"
    assert fingerprint_of(target) == before
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(seen["run"].id)
    assert run.name == "production-head" and "production" in run.tags

    approver = threading.Thread(target=_resume_when_paused,
                                args=({"approve": True, "approver": "Alice Ops", "comment": "CHG-42"}, seen))
    approver.start()
    state = run_flow(environment=name, alembic_config=ini)
    approver.join()
    assert state.is_completed(), state.message
    report = last_report(home)
    assert report["status"] == "succeeded" and report["revision_after"] == "r2"
    assert report["approval"] == {"approved": True, "approver": "Alice Ops", "via": "prefect-ui", "comment": "CHG-42"}
    assert report["backup"] is not None, "production always backs up"

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts()
    summary = next(a for a in artifacts if a.key == "db-migrate-production" and a.type == "markdown"
                   and "succeeded" in a.data)
    assert "approved by Alice Ops (prefect-ui)" in summary.data and "`base` → `r2`" in summary.data


def test_unreachable_s3_retries_the_backup_then_fails_before_migrating(environment, target, home, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from tests.conftest import s3_bucket_block

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


def test_the_canary_password_appears_nowhere(environment, target, home, tmp_path, pg_cluster):
    """Logs, artifacts, reports, backups' manifests, and pg_dump's command line."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter

    from dbmigrate import db, pgtools

    with db.connect(target) as conn:
        real = pgtools.find("pg_dump", db.server_version(conn)[0])
    shim_dir, argv_log = tmp_path / "bin", tmp_path / "argv.log"
    shim_dir.mkdir()
    (shim_dir / "pg_dump").write_text(f'#!/bin/sh\necho "$*" >> {argv_log}\nexec {real} "$@"\n')
    (shim_dir / "pg_dump").chmod(0o755)
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
    for path in (home / "reports").glob("*.json"):
        assert_no_canary(path.read_text(), str(path))
    for path in (home / "backups").rglob("*.json"):
        assert_no_canary(path.read_text(), str(path))
