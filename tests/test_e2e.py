"""End to end, as an operator runs it (`make e2e`), on one local stack: `dbmigrate local up` on
fresh ports (what it starts and prints, owner-only files, an API closed to other users, up again
changing nothing), the demo job with Prefect's own `prefect deployment run --watch`; an environment
set up from variables (`blocks sync --from-env`); the guide's commands as written (`dbmigrate run
--watch` among them); the GitHub workflow's own steps running db-migrate/staging, and a target that
fails; a production run approved through the Prefect UI in headless Chromium; a db-health run
created by the server's scheduler and completed by the worker; `local up --fleet` adding tenant
databases; everything stopped, worker first, and no output holding the stack's password.
The tests run in order on one stack. Screenshots of the approval form and the run's summary go to
screenshots/ (tests/support/browser.py)."""

from __future__ import annotations

import base64
import json
import os
import stat
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest

from dbmigrate.policy import ENVIRONMENTS
from tests.support import browser
from tests.support.github_actions import Workflow, event_context, run_job, workspace
from tests.support.helpers import (REPO, SAMPLE_HEAD, documented_commands, fingerprint_of, open_to_others,
                                   reports_in, scalar, wait_until)
from tests.support.local_stack import Stack, alive, running
from tests.support.prefect_server import PREFECT

# One local stack at a time (test_stack's refusals start parts of one): one worker (--dist loadgroup).
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("local-stack")]

WORKFLOW = Workflow(REPO / ".github" / "workflows" / "db-migrate.yml")
APPROVER = "Grace Hopper"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """`dbmigrate local up` on fresh ports, its scheduler looking every second (a due run is
    created at once rather than within Prefect's default minute); the first up's output and time
    kept for the first test."""
    with running(tmp_path_factory.mktemp("home")) as stack:
        started = time.monotonic()
        stack.first_up = stack.up(PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="1")
        stack.first_up_s = time.monotonic() - started
        assert stack.first_up.returncode == 0, stack.first_up.stdout + stack.first_up.stderr
        yield stack


@pytest.fixture(scope="module")
def prefect_api(stack):
    """The stack's Prefect API for this process's client."""
    with stack.talking_to():
        yield


def workflow_job(stack, tmp_path, name: str, **inputs):
    """The migrate job's own steps, as GitHub runs them on a workflow_dispatch with ``inputs``."""
    context = {**event_context(**inputs), "secrets": {**stack.client_env, "PREFECT_API_KEY": ""}}
    job = run_job(WORKFLOW, "migrate", context, workspace(tmp_path / name), tmp_path / name, timeout=300)
    stack.outputs += [job.stdout, job.summary]
    return job


def test_local_up_starts_the_stack_on_fresh_ports_and_up_again_changes_nothing(stack):
    first = stack.first_up
    print(f"first local up: {stack.first_up_s:.1f}s")
    assert first.returncode == 0, first.stdout + first.stderr
    assert f"export PREFECT_API_URL={stack.api}" in first.stdout.splitlines()
    assert f"UI:  http://127.0.0.1:{stack.prefect_port}  (runs, their logs and artifacts)" in first.stdout

    password_file = stack.home / "local-password"
    assert stat.S_IMODE(password_file.stat().st_mode) == 0o600
    for database in ENVIRONMENTS:
        with psycopg.connect(host="127.0.0.1", port=stack.pg_port, user="postgres", password=stack.password,
                             dbname=database) as conn:
            assert conn.execute("SELECT current_database()").fetchone() == (database,)
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(host="127.0.0.1", port=stack.pg_port, user="postgres", password="wrong", dbname="staging")

    status = stack.cli("local", "status")
    assert status.returncode == 0
    assert status.stdout.startswith("running: pid ")
    for line in (f"tcp: 127.0.0.1:{stack.pg_port}, user postgres, password in {password_file}",
                 f"UI: http://127.0.0.1:{stack.prefect_port}", f"PREFECT_API_URL={stack.api}"):
        assert line in status.stdout.splitlines()
    assert f"prefect server: running, pid {stack.pids()['server']}, http://127.0.0.1:{stack.prefect_port}" \
        in status.stdout
    assert f"worker: running, pid {stack.pids()['worker']}, pool dbmigrate" in status.stdout

    _blocks_reach_their_databases(stack)
    auth_file = stack.home / "prefect-auth"
    assert stack.cli("local", "env").stdout == (f"export PREFECT_API_URL={stack.api}\n"
                                                f'export PREFECT_API_AUTH_STRING="$(cat {auth_file})"\n')
    assert stat.S_IMODE(auth_file.stat().st_mode) == 0o600
    _the_api_refuses_whoever_lacks_the_auth_string(stack)

    second = stack.up()
    assert second.returncode == 0, second.stderr
    for part in ("postgresql: already running", "prefect server: already running", "worker: already running",
                 "work pool dbmigrate: exists", "deployments: up to date"):
        assert part in second.stdout
    assert [line for line in second.stdout.splitlines() if line.startswith("block ")] == [
        f"block dbmigrate-database-credentials/{name}: unchanged" for name in ENVIRONMENTS]


def _blocks_reach_their_databases(stack: Stack) -> None:
    """load_target works for each environment's block, over TCP with the generated password."""
    from blocks import load_target
    from dbmigrate import db

    with stack.talking_to():
        for name in ENVIRONMENTS:
            target = load_target(name)
            assert (target.environment, target.host, target.port) == (name, "127.0.0.1", stack.pg_port)
            with db.connect(target) as conn:
                assert conn.exec_driver_sql("SELECT current_database()").scalar() == name


def _the_api_refuses_whoever_lacks_the_auth_string(stack: Stack) -> None:
    """Another user of the machine reaches 127.0.0.1: without the auth string the blocks' secrets
    (the database's password) stay closed; the health check stays open."""
    import httpx

    filter_secrets = f"{stack.api}/block_documents/filter"
    anonymous = httpx.post(filter_secrets, json={"include_secrets": True}, timeout=10)
    assert anonymous.status_code == 401 and stack.password not in anonymous.text
    wrong = httpx.post(filter_secrets, json={"include_secrets": True}, auth=("wrong", ""), timeout=10)
    assert wrong.status_code == 401
    assert httpx.get(f"{stack.api}/health", timeout=10).status_code == 200
    owner = httpx.post(filter_secrets, json={"include_secrets": True}, timeout=10,
                       headers={"Authorization": "Basic " + base64.b64encode(
                           stack.client_env["PREFECT_API_AUTH_STRING"].encode()).decode()})
    assert owner.status_code == 200 and stack.password in owner.text


def _watch_exits(pids: dict[str, int]) -> dict[str, float]:
    """When each process disappears, watched from now on in the background."""
    gone: dict[str, float] = {}

    def watch():
        deadline = time.monotonic() + 120
        while len(gone) < len(pids) and time.monotonic() < deadline:
            for name, pid in pids.items():
                if name not in gone and not alive(pid):
                    gone[name] = time.monotonic()
            time.sleep(0.01)

    threading.Thread(target=watch, daemon=True).start()
    return gone


def test_the_demo_job_runs_with_prefects_own_command(stack):
    """What `make demo` runs: db-migrate/development, watched by `prefect deployment run --watch`."""
    run = subprocess.run([PREFECT, "deployment", "run", "db-migrate/development", "--watch"], cwd=REPO,
                         env={**os.environ, **stack.client_env}, capture_output=True, text=True, timeout=300,
                         check=False)
    stack.outputs.append(run.stdout + run.stderr)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "Flow run finished successfully in 'Completed'." in run.stdout
    report = json.loads(reports_in(stack.home)[-1].read_text())
    assert (report["environment"], report["status"], report["revision_after"]) == (
        "development", "succeeded", SAMPLE_HEAD)
    with psycopg.connect(host="127.0.0.1", port=stack.pg_port, user="postgres", password=stack.password,
                         dbname="development") as conn:
        assert conn.execute("SELECT version_num FROM alembic_version").fetchall() == [(SAMPLE_HEAD,)]
    # Prefect's database (the key that decrypts the blocks), the logs, the run's backup and report: owner-only.
    assert (stack.home / "prefect" / "prefect.db").exists() and any((stack.home / "backups").rglob("*.json"))
    assert open_to_others(stack.home) == []
    # the command line, with no --env or URL, looks at the database the demo migrated
    status = stack.cli("status")
    assert status.returncode == 0 and status.stderr == "", status.stderr
    where, *state = status.stdout.splitlines()[:4]
    assert where.endswith(f":{stack.pg_port}/development (development)"), where
    assert state == [f"current:  {SAMPLE_HEAD}", f"head:     {SAMPLE_HEAD}", "pending:  0"]
    assert stack.cli("check").stdout == f"up to date: database at {SAMPLE_HEAD}\n"


def test_an_environment_set_up_from_variables(stack, prefect_api):
    """`blocks sync` as GitHub Actions or an operator runs it: the stack's staging block, its TLS mode
    changed, then the same again: only what changed is written."""
    variables = {**stack.client_env, "DB_HOST": "127.0.0.1", "DB_PORT": str(stack.pg_port),
                 "DB_NAME": "staging", "DB_USER": "postgres", "DB_PASSWORD": stack.password,
                 "DB_SSLMODE": "prefer"}
    synced = stack.cli("blocks", "sync", "--env", "staging", "--from-env", env=variables)
    again = stack.cli("blocks", "sync", "--env", "staging", "--from-env", env=variables)

    assert synced.returncode == 0, synced.stderr
    no_alerts = "alerts of staging: none (ALERT_WEBHOOK_URL or ALERT_SLACK_WEBHOOK_URL not set)\n"
    assert synced.stdout == "dbmigrate-database-credentials/staging: updated: sslmode\n" + no_alerts
    assert again.stdout == "dbmigrate-database-credentials/staging: unchanged\n" + no_alerts
    from blocks import load_target

    synced_target = load_target("staging")
    assert (synced_target.host, synced_target.port, synced_target.database) == ("127.0.0.1", stack.pg_port, "staging")


def run_as_written(stack, command: str) -> subprocess.CompletedProcess:
    """``command`` in bash from the checkout, as an operator runs it after `eval "$(dbmigrate local env)"`."""
    environ = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
               **stack.client_env, "DBMIGRATE_HOME": str(stack.home)}
    result = subprocess.run(["bash", "-c", command], cwd=REPO, env=environ, capture_output=True, text=True,
                            timeout=300, check=False)
    stack.outputs.append(result.stdout + result.stderr)
    assert result.returncode == 0, f"{command}\n{result.stdout[-3000:]}{result.stderr[-3000:]}"
    return result


def test_the_guides_commands_run_as_written(stack, prefect_api):
    """Steps 4 and 7 of the operator's guide (docs/OPERATORS.md), command by command, on the stack's staging."""
    staging = stack.target("staging")
    migrate_to_0005, migrate_to_head = documented_commands("docs/OPERATORS.md", "## 4. Run a migration")
    run_as_written(stack, migrate_to_0005)
    assert fingerprint_of(staging).revisions == ("0005",)
    run_as_written(stack, migrate_to_head)
    assert fingerprint_of(staging).revisions == (SAMPLE_HEAD,)

    roll_back, back_up, list_backups = documented_commands("docs/OPERATORS.md", "## 7. Roll back, restore a backup")
    run_as_written(stack, roll_back)
    assert fingerprint_of(staging).revisions == ("0005",)
    run_as_written(stack, back_up)
    listed = run_as_written(stack, list_backups).stdout
    assert "-0005" in listed and "verified" in listed, listed


def test_the_workflow_step_migrates_staging_and_fetches_the_report(stack, prefect_api, tmp_path):
    job = workflow_job(stack, tmp_path, "staging", environment="staging")

    assert job.status == "success", job.stdout
    assert fingerprint_of(stack.target("staging")).revisions == (SAMPLE_HEAD,)
    report = json.loads((tmp_path / "staging" / "workspace" / job.output("report")).read_text())
    assert (report["status"], report["environment"], report["revision_after"]) == ("succeeded", "staging",
                                                                                  SAMPLE_HEAD)
    assert report["requested_by"] == "octocat (GitHub Actions run 4242)"
    assert job.summary.startswith("### db-migrate/staging: Completed")


def test_a_target_that_fails_exits_non_zero_saying_why_and_changes_nothing(stack, prefect_api, tmp_path):
    before = fingerprint_of(stack.target("staging"))
    job = workflow_job(stack, tmp_path, "unknown", environment="staging", target_revision="0099")

    assert job.status == "failure", job.stdout
    assert "db-migrate/staging: Failed: plan failed: " in job.stdout and "0099" in job.stdout
    # Prefect's own watch, on the stack's server (it streams the log out), prints the reason itself
    assert "plan failed: " in job.results["run"].stdout
    assert fingerprint_of(stack.target("staging")) == before


def paused_run(deployment: str):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    with get_client(sync_client=True) as client:
        wanted = client.read_deployment_by_name(deployment)
        runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[wanted.id])))
    return next((run for run in runs if run.state and run.state.is_paused()), None)


def test_production_pauses_and_is_approved_in_the_prefect_ui(stack, prefect_api, tmp_path):
    jobs = []  # the job waits for the run, which waits for the approval given below
    waiting = threading.Thread(target=lambda: jobs.append(
        workflow_job(stack, tmp_path, "production", environment="production")))
    waiting.start()
    run = wait_until(lambda: paused_run("db-migrate/production"), 180, "the production run to pause for approval")
    assert fingerprint_of(stack.target("production")).revisions == ()

    auth = stack.client_env["PREFECT_API_AUTH_STRING"]  # typed into the UI's login page
    seen = browser.approve_in_ui(stack.ui, str(run.id), APPROVER, "e2e: reviewed the SQL", name="e2e-approval",
                                 auth=auth)
    waiting.join(360)
    [job] = jobs

    assert "waiting for approval" in seen.state_message
    assert not seen.clipped, f"cut off in the form: {seen.clipped}"
    assert job.status == "success", job.stdout
    assert fingerprint_of(stack.target("production")).revisions == (SAMPLE_HEAD,)
    report = json.loads((tmp_path / "production" / "workspace" / job.output("report")).read_text())
    assert report["approval"] == {"approved": True, "approver": APPROVER, "via": "prefect-ui",
                                  "comment": "e2e: reviewed the SQL"}
    summary = browser.show_artifact(stack.ui, str(run.id), "db-migrate-production", name="e2e-summary",
                                    auth=auth)
    assert report["backup"]["id"] in summary.text and not summary.clipped


def test_the_scheduler_creates_a_health_run_and_the_worker_completes_it(stack, prefect_api):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.client.schemas.schedules import IntervalSchedule

    due = datetime.now(UTC) + timedelta(seconds=3)
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("db-health/development-health")
        client.create_deployment_schedules(deployment.id, [
            (IntervalSchedule(interval=timedelta(days=1), anchor_date=due), True)])

    def ran():
        with get_client(sync_client=True) as client:
            runs = client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])))
        return next((r for r in runs if r.expected_start_time <= due and r.state.is_final()), None)

    run = wait_until(ran, 180, "the scheduled db-health run to be created and to end")
    assert run.auto_scheduled and run.created_by.type == "SCHEDULE", "created by the scheduler"
    assert run.state.is_completed(), run.state


def test_local_up_fleet_adds_each_environments_tenants_and_fleet_block(stack):
    first = stack.up("--fleet", "2")
    assert first.returncode == 0, first.stdout + first.stderr
    assert ("fleet: 2 tenant databases per environment (tenant_001…, staging_tenant_001…, production_tenant_001…), "
            "6 created from fleet_template at revision 0004") in first.stdout.splitlines()
    assert "block dbmigrate-database-fleet/staging-fleet: created" in first.stdout.splitlines()

    status = stack.cli("fleet", "status", "--env", "development", "--json", env=stack.client_env)
    assert status.returncode == 0, status.stderr
    result = json.loads(status.stdout)
    assert [(row["name"], row["revision"], row["pending"]) for row in result["members"]] == [
        ("tenant_001", "0004", 2), ("tenant_002", "0004", 2)]
    assert result["summary"] == "2 databases: 2 at 0004"
    staging = stack.cli("fleet", "status", "--env", "staging", env=stack.client_env)
    assert [line.split()[0] for line in staging.stdout.splitlines()[:-1]] == ["staging_tenant_001",
                                                                              "staging_tenant_002"]
    assert scalar(stack.target("production_tenant_002"), "SELECT count(*) FROM cost_records") == 500

    second = stack.up("--fleet", "2")
    assert second.returncode == 0, second.stderr
    assert ("fleet: 2 tenant databases per environment, all there (tenant_001…, staging_tenant_001…, "
            "production_tenant_001…)") in second.stdout.splitlines()


def test_down_stops_everything_worker_first(stack):
    """Then `local status` says nothing runs, `local env` refuses, and no output, log or report holds
    the stack's password."""
    pids = stack.pids()
    gone = _watch_exits(pids)
    down = stack.cli("local", "down")
    assert down.returncode == 0, down.stderr
    assert down.stdout.splitlines() == [f"worker: stopped (pid {pids['worker']})",
                                        f"prefect server: stopped (pid {pids['server']})", "postgresql: stopped"]
    time.sleep(0.3)
    assert gone["worker"] < gone["server"] < gone["postgresql"], gone
    after = stack.cli("local", "status")
    assert after.returncode == 1
    assert after.stdout.splitlines() == [f"not running (data directory {stack.home.resolve() / 'pgdata'})",
                                         "prefect server: not running", "worker: not running"]
    no_env = stack.cli("local", "env")
    assert no_env.returncode == 2 and no_env.stderr.startswith("dbmigrate: error: the local Prefect server is not "
                                                               "running")

    secret = stack.password
    for where in [*stack.outputs, stack.logs(), *(p.read_text() for p in reports_in(stack.home))]:
        assert secret not in where
