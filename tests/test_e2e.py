"""End to end, as an operator runs it (`make e2e`): the local stack on fresh ports; an environment
set up from variables (`blocks sync --from-env`); the guide's commands as written (`dbmigrate run
--watch` among them); the GitHub workflow's own steps running db-migrate/staging, and a target that
fails; a production run approved through the Prefect UI in headless Chromium; a db-health run
created by the server's scheduler and completed by the worker; everything stopped, worker first.
The tests run in order on one stack. Screenshots of the approval form and the run's summary go to
screenshots/ (tests/support/browser.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.support import browser
from tests.support.github_actions import Workflow, event_context, run_job, workspace
from tests.support.helpers import REPO, SAMPLE_HEAD, documented_commands, fingerprint_of, wait_until
from tests.support.local_stack import alive, running

# One local stack at a time: the e2e tests and test_stack run on one worker (--dist loadgroup).
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("local-stack")]

WORKFLOW = Workflow(REPO / ".github" / "workflows" / "db-migrate.yml")
APPROVER = "Grace Hopper"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """`dbmigrate local up` on fresh ports, its scheduler looking every second (a due run is
    created at once rather than within Prefect's default minute)."""
    with running(tmp_path_factory.mktemp("home")) as stack:
        up = stack.up(PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="1")
        assert up.returncode == 0, up.stdout + up.stderr
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


def test_down_stops_everything_worker_first(stack):
    pids = stack.pids()
    down = stack.cli("local", "down")

    assert down.returncode == 0, down.stderr
    assert [line.split(":")[0] for line in down.stdout.splitlines()] == ["worker", "prefect server", "postgresql"]
    assert not any(alive(pid) for pid in pids.values()), pids
    for output in [*stack.outputs, stack.logs()]:
        assert stack.password not in output
