"""The db-migrate flow against a real Prefect API (the test harness), PostgreSQL and S3: a run's backup and
report, validation, backup storage failing, two runs at once, the canary, the run's log and artifact, health
checks and lock retries."""

import json
import os
import threading

import psycopg
import pytest

from tests.support.flows import artifact, artifacts_of, resume_when_paused, run_flow, run_logs, run_named, task_runs_of
from tests.support.helpers import (assert_no_canary, fingerprint_of, last_report, libpq_url, open_to_others,
                                   reports_in, sql, wait_until)
from tests.support.pgcluster import free_port
from tests.support.projects import BEST_EFFORT_INDEX, CREATE, DUPLICATES, linear, stock_project, table_step


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
    """The worker command of docs/PREFECT.md before anyone created the block: the run fails in the backup
    phase (not the guard's), says how to create the block, and changes and stores nothing."""
    monkeypatch.setenv("DBMIGRATE_BACKUP_STORAGE", "s3-bucket/backups")
    ini = str(stock_project(tmp_path, linear(table_step("t1"))))
    before = fingerprint_of(target)

    state = run_flow(environment=environment("staging"), alembic_config=ini)
    assert state.is_failed()
    assert state.message == (
        "backup failed: no S3Bucket block named 'backups': create it (`dbmigrate blocks sync --env ENV --from-env` "
        "with BACKUP_BUCKET set, or a prefect-aws S3Bucket block saved as 'backups' in the Prefect UI), or give "
        "another backup storage (see docs/BACKUPS.md#storage)")
    report = last_report(home)
    assert report["error"]["phase"] == "backup" and report["backup"] is None and report["migrations_applied"] == []
    assert fingerprint_of(target) == before
    assert sorted(p.name for p in home.iterdir()) == ["reports"], "nothing but the report was written"


def test_two_concurrent_runs_exactly_one_migrates(environment, target, home, tmp_path):
    """A second run started while the first is inside its migration (held there until the test
    lets go of a lock, not for a time that a loaded machine may outlast) is refused, saying another
    run holds the database; the first then migrates."""
    name = environment("staging")
    held = ("DO $$ BEGIN WHILE NOT pg_try_advisory_lock_shared(4242) LOOP PERFORM pg_sleep(0.05); END LOOP; "
            "END $$")
    ini = str(stock_project(tmp_path, linear((f"op.execute({held!r}); " + CREATE.format("t1"), "pass"))))
    states = []
    first = threading.Thread(target=lambda: states.append(run_flow(environment=name, alembic_config=ini)))
    with psycopg.connect(libpq_url(target), autocommit=True) as lock:
        lock.execute("SELECT pg_advisory_lock(4242)")
        first.start()
        wait_until(lambda: sql(target, "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'DO $$%' "
                                       "AND pid <> pg_backend_pid()")[0][0], 120, "the first run inside r1", 0.2)
        second = run_flow(environment=name, alembic_config=ini)
    first.join()
    assert second.is_failed() and "another" in second.message and "holds" in second.message, second.message
    [state] = states
    assert state.is_completed(), state.message
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
    approver = threading.Thread(target=resume_when_paused, args=({"decision": "approve", "approver": "Ann"}, seen))
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
