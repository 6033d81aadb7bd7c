"""Alerts through Prefect's own machinery: `dbmigrate blocks sync` sets up an environment's
notification blocks and automations on a real `prefect server start`; each kind of alert is then
caused for real (a failed migration, an automatic rollback, a run waiting for approval, drift found
by db-health, a flow-run process killed) and the message a webhook listener on loopback receives
is checked: environment, revisions, phase, reason, the run's link, never a secret."""

from __future__ import annotations

import contextvars
import json
import os
import signal
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass

import pytest

from tests.support.helpers import (REPO, assert_no_canary, fingerprint_of, save_environment, sleeping_backend, sql,
                                   wait_until)
from tests.support.pgcluster import CANARY_PASSWORD
from tests.support.prefect_server import PrefectServer, Worker, final
from tests.support.projects import linear, stock_project
from tests.support.webhooks import Listener

# Its own Prefect server: one worker runs the module (--dist loadgroup).
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("prefect-server-alerts")]

ENV = "staging"  # prefect.yaml's deployment db-migrate/staging runs the crashed run
TOKEN = "hook-" + uuid.uuid4().hex  # the webhook URL's secret part: never printed, never in a message
KINDS = ("run failed", "run crashed", "rolled back", "waiting for approval", "drift found")


@dataclass
class Alerts:
    server: PrefectServer
    listener: Listener
    sync: object  # sync(environment, **variables) -> CompletedProcess


@pytest.fixture(scope="module")
def alerts(tmp_path_factory, pg_cluster):
    """One server for the module, the dbmigrate pool and db-migrate/staging deployed, a listener,
    and `blocks sync` of staging with both alert variables, as an operator runs it."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from tests.support.helpers import run_cli

    server = PrefectServer(tmp_path_factory.mktemp("prefect-home"))
    listener = Listener()
    home = tmp_path_factory.mktemp("sync-home")
    database = pg_cluster.create_database()
    server.start()
    try:
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            def sync(environment: str, **variables: str):
                given = {"DB_HOST": "127.0.0.1", "DB_PORT": str(pg_cluster.port), "DB_NAME": database,
                         "DB_USER": "postgres", "DB_PASSWORD": CANARY_PASSWORD, "DB_SSLMODE": "disable",
                         **variables}
                # in this process (its client points at the server): only the API differs from the harness
                result = run_cli(home, "blocks", "sync", "--env", environment, "--from-env",
                                 env={"PREFECT_API_URL": server.api_url, **given})
                assert TOKEN not in result.stdout + result.stderr
                return result

            created = sync(ENV, ALERT_WEBHOOK_URL=f"{listener.url}/hooks/{TOKEN}",
                           ALERT_SLACK_WEBHOOK_URL=f"{listener.url}/slack/{TOKEN}")
            assert created.returncode == 0, created.stderr
            assert created.stdout.splitlines() == [
                f"dbmigrate-database-credentials/{ENV}: created",
                f"custom-webhook/{ENV}-alerts: created",
                f"custom-webhook/{ENV}-slack-alerts: created",
                *(f"automation/dbmigrate {ENV}: {kind}: created" for kind in KINDS),
            ]
            try:
                yield Alerts(server, listener, sync)
            finally:  # what this process still sends goes to this server, not to the next module's
                APILogWorker.drain_all()
                EventsWorker.drain_all()
    finally:
        server.stop()
        listener.server.shutdown()
        pg_cluster.drop_database(database)


def automations_named(prefix: str) -> list:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return [a for a in client.read_automations() if a.name.startswith(prefix)]


def test_sync_again_changes_nothing_and_without_variables_sets_up_no_alerts(alerts):
    again = alerts.sync(ENV, ALERT_WEBHOOK_URL=f"{alerts.listener.url}/hooks/{TOKEN}",
                        ALERT_SLACK_WEBHOOK_URL=f"{alerts.listener.url}/slack/{TOKEN}")
    assert again.returncode == 0, again.stderr
    assert [line.rsplit(": ", 1)[1] for line in again.stdout.splitlines()] == ["unchanged"] * 8
    assert sorted(a.name for a in automations_named(f"dbmigrate {ENV}:")) == sorted(
        f"dbmigrate {ENV}: {kind}" for kind in KINDS)

    from prefect.client.orchestration import get_client
    from prefect.events.schemas.automations import AutomationCore

    with get_client(sync_client=True) as client:  # what the UI and the API show of the blocks
        shown = [client.read_block_document_by_name(name, "custom-webhook", include_secrets=False).model_dump_json()
                 for name in (f"{ENV}-alerts", f"{ENV}-slack-alerts")]
    assert all(TOKEN not in block and '"url":"{{url}}"' in block for block in shown), shown

    # the webhook moved: the block's secret is updated; an automation edited in the UI is put back

    [edited] = automations_named(f"dbmigrate {ENV}: drift found")
    with get_client(sync_client=True) as client:
        client.update_automation(edited.id, AutomationCore.model_validate(
            {**edited.model_dump(exclude={"id", "owner_resource"}), "description": "edited in the UI"}))
    moved = alerts.sync(ENV, ALERT_WEBHOOK_URL=f"{alerts.listener.url}/moved/{TOKEN}",
                        ALERT_SLACK_WEBHOOK_URL=f"{alerts.listener.url}/slack/{TOKEN}")
    assert [line for line in moved.stdout.splitlines() if not line.endswith(": unchanged")] == [
        f"custom-webhook/{ENV}-alerts: updated: secrets", f"automation/dbmigrate {ENV}: drift found: updated"]
    assert alerts.sync(ENV, ALERT_WEBHOOK_URL=f"{alerts.listener.url}/hooks/{TOKEN}",
                       ALERT_SLACK_WEBHOOK_URL=f"{alerts.listener.url}/slack/{TOKEN}").returncode == 0
    assert len(automations_named(f"dbmigrate {ENV}:")) == len(KINDS)

    plain = alerts.sync("quiet")
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout.splitlines() == [
        "dbmigrate-database-credentials/quiet: created",
        "alerts of quiet: none (ALERT_WEBHOOK_URL or ALERT_SLACK_WEBHOOK_URL not set)"]
    assert automations_named("dbmigrate quiet:") == []

    bad = alerts.sync("quiet", ALERT_WEBHOOK_URL="hooks.example/" + TOKEN)
    assert bad.returncode == 2 and bad.stderr.strip() == "dbmigrate: error: ALERT_WEBHOOK_URL: not an http(s) URL"
    assert automations_named("dbmigrate quiet:") == []


@contextmanager
def pointed_at(alerts: Alerts, target, tmp_path, monkeypatch, **policy):
    """The staging blocks pointed at the test's database, runs in this process against the server."""
    monkeypatch.setenv("DBMIGRATE_HOME", str(tmp_path / "state"))
    save_environment(target, ENV, **policy)
    yield ENV


def delivered(alerts: Alerts, subject: str, run_id: str, since: float, says: str = "") -> str:
    """The message both blocks delivered for the run (the JSON one and the Slack-shaped one), checked
    for secrets; prints the latency from ``since``."""
    hook = alerts.listener.wait_for(f"/hooks/{TOKEN}", f"dbmigrate {ENV}: {subject}", run_id, says)
    slack = alerts.listener.wait_for(f"/slack/{TOKEN}", f"dbmigrate {ENV}: {subject}", run_id, says)
    assert hook.json["environment"] == ENV and hook.json["subject"] == f"dbmigrate {ENV}: {subject}"
    assert slack.json["text"] == f"*dbmigrate {ENV}: {subject}*\n{hook.json['body']}"
    for delivery in (hook, slack):
        assert_no_canary(json.dumps(delivery.json), f"the {subject} alert")
        assert TOKEN not in json.dumps(delivery.json)
    print(f"\n{subject}: delivered {hook.at - since:+.1f}s from the run's end (negative: before the flow returned)")
    return hook.json["body"]


def lines(body: str) -> dict[str, str]:
    return dict(line.split(": ", 1) for line in body.splitlines()[1:])


def run_migrate(**parameters):
    from flows.migrate import db_migrate

    return db_migrate(return_state=True, **parameters)


def test_a_failed_migration_alerts_with_its_revisions_phase_and_reason(alerts, target, tmp_path, monkeypatch):
    ini = str(stock_project(tmp_path, linear("op.create_table('t1', sa.Column('id', sa.Integer))",
                                             "op.execute('SELECT 1/0')")))
    with pointed_at(alerts, target, tmp_path, monkeypatch, auto_rollback=False) as env:
        state = run_migrate(environment=env, alembic_config=ini)
    ended = time.monotonic()
    assert state.is_failed()
    run_id = str(state.state_details.flow_run_id)
    body = delivered(alerts, "run failed", run_id, ended)
    assert lines(body) == {
        "Environment": ENV, "Revisions": "base → head", "Phase": "migrate",
        "Reason": state.message, "Run": f"{alerts.server.api_url.removesuffix('/api')}/runs/flow-run/{run_id}"}
    assert "revision r2 failed: division by zero" in body
    assert fingerprint_of(target).revisions == ()


def test_an_automatic_rollback_alerts(alerts, target, tmp_path, monkeypatch, cli, url):
    ini = str(stock_project(tmp_path, linear(("op.create_table('t1', sa.Column('id', sa.Integer))", "op.drop_table('t1')"),
                                             ("op.create_table('t2', sa.Column('id', sa.Integer))", "op.drop_table('t2')"),
                                             "op.execute('SELECT 1/0')"), transaction_per_migration=True))
    assert cli("upgrade", "-r", "r1", "--yes", "--alembic-config", ini, env={"DATABASE_URL": url}).returncode == 0
    with pointed_at(alerts, target, tmp_path, monkeypatch, auto_rollback=True) as env:
        state = run_migrate(environment=env, alembic_config=ini)
    ended = time.monotonic()
    assert state.is_failed() and "rollback: database back at the starting revision" in state.message
    fields = lines(delivered(alerts, "rolled back", str(state.state_details.flow_run_id), ended))
    assert (fields["Environment"], fields["Revisions"], fields["Phase"]) == (ENV, "r1 → head", "migrate")
    assert fields["Reason"] == state.message
    assert fingerprint_of(target).revisions == ("r1",)


def test_a_db_rollback_alerts(alerts, target, tmp_path, monkeypatch, cli, url):
    from flows.db_rollback import db_rollback

    ini = str(stock_project(tmp_path, linear(("op.create_table('t1', sa.Column('id', sa.Integer))",
                                              "op.drop_table('t1')"))))
    assert cli("upgrade", "--yes", "--alembic-config", ini, env={"DATABASE_URL": url}).returncode == 0
    with pointed_at(alerts, target, tmp_path, monkeypatch, approval_required=False) as env:
        state = db_rollback(environment=env, to_revision="base", dry_run=False, alembic_config=ini,
                            requested_by="ops-oncall", return_state=True)
    ended = time.monotonic()
    assert state.is_completed()
    fields = lines(delivered(alerts, "rolled back", str(state.state_details.flow_run_id), ended))
    assert (fields["Environment"], fields["Revisions"], fields["Phase"]) == (ENV, "r1 → base", "downgrade")
    assert fields["Reason"] == "downgrade to base by ops-oncall: done"
    assert fingerprint_of(target).revisions == ()


def test_a_run_waiting_for_approval_alerts(alerts, target, tmp_path, monkeypatch):
    ini = str(stock_project(tmp_path, linear("op.create_table('t1', sa.Column('id', sa.Integer))")))
    with pointed_at(alerts, target, tmp_path, monkeypatch, approval_required=True, approval_timeout_s=8,
                     backup_required=False) as env:
        started = time.monotonic()
        state = {}
        run = lambda: state.update(s=run_migrate(environment=env, alembic_config=ini, backup=False))
        runner = threading.Thread(target=contextvars.copy_context().run, args=(run,))  # the test's Prefect API
        runner.start()
        waiting = wait_until(lambda: next((d for d in alerts.listener.received if d.at > started and
                                           "waiting for approval" in d.json.get("subject", "")), None),
                             60, "the approval alert")
        runner.join(60)
    ended = time.monotonic()
    fields = lines(waiting.json["body"])
    assert (fields["Environment"], fields["Revisions"], fields["Phase"]) == (ENV, f"base → r1 in {ENV}", "approval")
    assert fields["Reason"].startswith(f"waiting for approval of base → r1 in {ENV}: click Resume on this run")
    assert str(state["s"].state_details.flow_run_id) in fields["Run"]
    assert state["s"].is_failed() and "nobody approved within 8s" in state["s"].message
    failed = lines(delivered(alerts, "run failed", str(state["s"].state_details.flow_run_id), ended))
    assert (failed["Phase"], failed["Reason"]) == ("approval", state["s"].message)
    assert fingerprint_of(target).revisions == ()


def test_drift_found_by_db_health_alerts(alerts, target, tmp_path, monkeypatch, cli, url):
    from flows.maintenance import db_health

    ini = str(stock_project(tmp_path, linear("op.create_table('t1', sa.Column('id', sa.Integer))")))
    assert cli("upgrade", "--yes", "--alembic-config", ini, env={"DATABASE_URL": url}).returncode == 0
    sql(target, "ALTER TABLE t1 ADD COLUMN by_hand text")
    with pointed_at(alerts, target, tmp_path, monkeypatch) as env:
        state = db_health(environment=env, alembic_config=ini, return_state=True)
    ended = time.monotonic()
    assert state.is_failed()
    run_id = str(state.state_details.flow_run_id)
    fields = lines(delivered(alerts, "drift found", run_id, ended))
    assert (fields["Environment"], fields["Revisions"], fields["Phase"]) == (ENV, "at r1", "drift")
    assert "t1" in fields["Reason"] or "changed outside Alembic" in fields["Reason"]
    time.sleep(3)  # one alert for the run: its failure is the drift, not also a "run failed"
    assert [d.json["subject"] for d in alerts.listener.received if run_id in d.text and "/hooks/" in d.path] == [
        f"dbmigrate {ENV}: drift found"]


SLEEP = "op.execute('SELECT pg_sleep(60)')"


def test_a_crashed_run_alerts(alerts, target, tmp_path, pg_cluster, db_name):
    """The flow-run process SIGKILLed mid-revision: it emits nothing, Prefect's Crashed events alert, twice for a
    run that held the environment (Prefect's crash, then flows.recovery's final state naming the phase)."""
    from prefect.client.orchestration import get_client

    ini = str(stock_project(tmp_path, linear(f"{SLEEP}; op.create_table('t1', sa.Column('id', sa.Integer))")))
    save_environment(target, ENV)
    state = tmp_path / "worker-home"
    state.mkdir()
    worker = Worker(alerts.server, alerts.server.environ(DBMIGRATE_CHECKOUT=str(REPO), PYTHONPATH=str(REPO),
                                                         DBMIGRATE_HOME=str(state)), tmp_path / "worker.log")
    worker.start()
    try:
        with get_client(sync_client=True) as client:
            deployment = client.read_deployment_by_name(f"db-migrate/{ENV}")
            run_id = str(client.create_flow_run_from_deployment(
                deployment.id, parameters={"environment": ENV, "alembic_config": ini}).id)
        wait_until(lambda: sleeping_backend(pg_cluster, db_name), 120, "the slow revision to start")
        os.kill(worker.flow_run_pids()[-1], signal.SIGKILL)
        killed = time.monotonic()
        run = final(run_id)
        assert run.state.is_crashed()
        # at once, Prefect's own words; then, once flows.recovery's hook has said where the database is, that
        first = lines(delivered(alerts, "run crashed", run_id, killed, "Phase: unknown (the process died)"))
        body = delivered(alerts, "run crashed", run_id, killed, "Phase: the migration")
    finally:
        worker.kill_all()
    assert (first["Environment"], first["Revisions"]) == (ENV, "to head")
    assert first["Reason"].startswith("Process exited with status code: -9.")
    fields = lines(body)
    assert (fields["Environment"], fields["Revisions"]) == (ENV, "to head")
    assert fields["Reason"] == ("Run crashed (Process exited with status code: -9) during the migration: "
                                "database at base, its starting revision: nothing was applied.")
    assert fingerprint_of(target).revisions == ()
