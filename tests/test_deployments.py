"""prefect.yaml names flows and parameters that exist (the GitHub workflow: tests/test_github_workflow.py)."""

import inspect
import os
import subprocess
import sys
from datetime import UTC, datetime, time, timedelta
from pathlib import Path

import pytest
import yaml
from prefect.flows import load_flow_from_entrypoint

from dbmigrate.policy import ENVIRONMENTS
from tests.support.helpers import (
    REPO,
    assert_no_canary,
    documented_commands,
    fingerprint_of,
    last_report,
    reports_in,
    save_environment,
    wait_until,
)
from tests.support.prefect_server import PrefectServer, client_pointed_at, pool_and_deployments, prefect
from tests.support.projects import linear, stock_project

# Its own Prefect servers (the tests that use them are slow): one worker runs the module (--dist loadgroup).
pytestmark = [pytest.mark.xdist_group("prefect-server-deployments")]

CREATE_T1 = "op.create_table('t1', sa.Column('id', sa.Integer))"


# The UI lists deployments by name: the suffix tells an environment's four apart at a glance.
SUFFIXES = {"db-migrate": "", "db-rollback": "-rollback", "db-health": "-health", "db-backup": "-backup",
            "db-migrate-fleet": "", "db-migrate-fleet-batch": ""}


def deployments() -> list[dict]:
    return yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]


def test_every_deployment_names_a_real_flow_and_its_parameters():
    seen = set()
    for deployment in deployments():
        flow = load_flow_from_entrypoint(str(REPO / deployment["entrypoint"]))
        accepted = set(inspect.signature(flow.fn).parameters)
        assert set(deployment["parameters"]) <= accepted, deployment["name"]
        environment = deployment["parameters"]["environment"]
        assert {flow.name, environment} <= set(deployment["tags"]), deployment["name"]
        assert deployment["name"] == environment + SUFFIXES[flow.name]
        # One run per environment is the flows' own limit: Prefect's deployment limit crashes a run paused
        # for approval after four minutes (see prefect.yaml).
        assert "concurrency_limit" not in deployment, deployment["name"]
        assert bool(deployment.get("schedules")) == (flow.name in ("db-health", "db-backup")), deployment["name"]
        seen.add(f"{flow.name}/{deployment['name']}")
    assert seen == {f"{flow}/{env}{suffix}" for env in ENVIRONMENTS for flow, suffix in SUFFIXES.items()}


def test_flow_parameters_are_described_for_the_ui():
    flow = load_flow_from_entrypoint(str(REPO / "flows" / "migrate.py:db_migrate"))
    properties = flow.parameters.properties
    assert set(properties) >= {"environment", "target_revision", "backup", "dry_run", "skip_health_checks",
                               "skip_validation"}
    assert all(p.get("description") for p in properties.values())


PREFECT = str(Path(sys.executable).parent / "prefect")


def prefect_cli(env: dict[str, str], *args: str) -> str:
    """`prefect ARGS` from this checkout, as an operator runs it: it succeeds, and prints no password."""
    result = subprocess.run([PREFECT, "--no-prompt", *args], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=240, check=False)
    assert result.returncode == 0, f"prefect {' '.join(args)}: {result.stdout[-2000:]} {result.stderr[-2000:]}"
    assert_no_canary(result.stdout + result.stderr, f"prefect {args[0]}")
    return result.stdout


@pytest.fixture(scope="module")
def deployed(prefect_api, tmp_path_factory) -> dict[str, str]:
    """The `dbmigrate` pool as docs/PREFECT.md#deploying creates it (its commands as written, the
    project's Python first on PATH) and every deployment of prefect.yaml (`prefect deploy --all`) on
    the test harness's API; the environment a worker beside this checkout runs with."""
    from prefect.client.orchestration import get_client

    env = {**os.environ, "PREFECT_API_URL": prefect_api, "DBMIGRATE_CHECKOUT": str(REPO),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    shell = {**env, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    where = tmp_path_factory.mktemp("pool")
    for command in (line for line in documented_commands("docs/PREFECT.md", "## Deploying")
                    if line.startswith("prefect work-pool")):
        done = subprocess.run(["bash", "-eo", "pipefail", "-c", command], cwd=where,
                              env=shell, capture_output=True, text=True, timeout=120, check=False)
        assert done.returncode == 0, command + done.stdout + done.stderr
    with get_client(sync_client=True) as client:
        template = client.read_work_pool("dbmigrate").base_job_template
    assert template["variables"]["properties"]["command"]["default"] == f"{sys.executable} -m prefect.engine"
    prefect_cli(env, "deploy", "--all")
    return env


def runs_of(deployment_id) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    with get_client(sync_client=True) as client:
        return client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])))


def log_of(flow_run_id) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with get_client(sync_client=True) as client:
        return [log.message for log in client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))]


@pytest.mark.slow
def test_deploy_all_then_a_worker_runs_what_github_actions_triggers(deployed, environment, target, home, tmp_path):
    """`prefect deploy --all` from prefect.yaml, `prefect deployment run` as the GitHub workflow calls it,
    and a process worker of the `dbmigrate` pool running the flow from this checkout."""
    from prefect.client.orchestration import get_client

    name = environment("staging")
    ini = stock_project(tmp_path / "project", linear(CREATE_T1))
    env = {**deployed, "DBMIGRATE_HOME": str(home)}
    with get_client(sync_client=True) as client:
        health = client.read_deployment_by_name("db-health/production-health")
        staging = client.read_deployment_by_name("db-migrate/staging")
    assert [s.schedule.cron for s in health.schedules] == ["0 2 * * *"]
    assert staging.parameters == {"environment": "staging"} and staging.work_pool_name == "dbmigrate"

    prefect_cli(env, "deployment", "run", "db-migrate/staging", "--param", f"credentials_block={name}",
                "--param", f"alembic_config={ini}", "--param", "requested_by=octocat (GitHub Actions run 1)")
    prefect_cli(env, "worker", "start", "--pool", "dbmigrate", "--run-once")

    [flow_run] = runs_of(staging.id)
    assert flow_run.state.is_completed(), flow_run.state.message
    assert flow_run.name == "staging-head" and "staging" in flow_run.tags
    assert fingerprint_of(target).revisions == ("r1",)
    report = last_report(home)
    assert report["requested_by"] == "octocat (GitHub Actions run 1)" and report["backup"]["verified"] is False

    # The staging deployment, its parameters overridden to reach production: refused, nothing touched.
    production = environment("production", approval_timeout_s=5)
    before = fingerprint_of(target), len(reports_in(home))
    prefect_cli(env, "deployment", "run", "db-migrate/staging", "--param", f"environment={production}",
                "--param", f"credentials_block={production}", "--param", f"alembic_config={ini}")
    prefect_cli(env, "worker", "start", "--pool", "dbmigrate", "--run-once")
    [refused] = [r for r in runs_of(staging.id) if r.id != flow_run.id]
    assert refused.state.is_failed()
    assert refused.state.message == "deployment for staging refuses the production database (block 'production')"
    assert (fingerprint_of(target), len(reports_in(home))) == before
    logs = log_of(refused.id)
    assert refused.state.message in logs
    assert not [line for line in logs if "Traceback" in line or "unexpected exception" in line], logs


@pytest.mark.slow
def test_a_worker_without_its_checkout_fails_the_run_naming_the_variable(deployed, environment, target, home,
                                                                        tmp_path):
    """DBMIGRATE_CHECKOUT unset, or naming a directory that is not the checkout: the run ends Failed
    with a message naming the variable (its state and its log, through the API) before the flow is
    even loaded, not with `FileNotFoundError: …/flows/migrate.py` after a pull step that "completed
    successfully". The database is untouched."""
    from prefect.client.orchestration import get_client

    environment("development")  # credentials of the test's database: a run that got that far would migrate it
    ini = stock_project(tmp_path / "project", linear(CREATE_T1))
    before = fingerprint_of(target)
    without = {k: v for k, v in deployed.items() if k != "DBMIGRATE_CHECKOUT"} | {"DBMIGRATE_HOME": str(home)}
    wrong = REPO / "flows"  # a directory of the checkout, not the checkout
    cases = [
        (without, ("DBMIGRATE_CHECKOUT is not set in the worker's environment: set it to the absolute path of "
                   "the checkout of dbmigrate the flows run from (see docs/PREFECT.md#deploying)")),
        ({**without, "DBMIGRATE_CHECKOUT": str(wrong)},
         f"DBMIGRATE_CHECKOUT={wrong} is not a checkout of dbmigrate: no readable prefect.yaml there"),
    ]
    for worker, message in cases:
        with get_client(sync_client=True) as client:
            deployment = client.read_deployment_by_name("db-migrate/development")
            run = client.create_flow_run_from_deployment(deployment.id, parameters={"alembic_config": str(ini)})
        prefect_cli(worker, "worker", "start", "--pool", "dbmigrate", "--run-once")
        with get_client(sync_client=True) as client:
            state = client.read_flow_run(run.id).state
        assert state.is_failed() and state.message == message, state
        assert message in log_of(run.id)
    assert fingerprint_of(target) == before and not reports_in(home)


@pytest.mark.slow
def test_the_scheduler_creates_the_nightly_runs_and_a_worker_runs_one(target, tmp_path):
    """A real `prefect server start` from this project's environment (SQLAlchemy 2.0: on 2.1 the
    scheduler fails every loop with "Can't evaluate bulk DML statement" and no run is ever created),
    its scheduler's loop shortened: deploying db-health/development-health makes the scheduler (not
    `prefect deploy`) create its nightly runs; a run the scheduler makes due now, a worker completes."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.schedules import IntervalSchedule

    home = tmp_path / "prefect-home"
    home.mkdir()
    server = PrefectServer(home, settings={"PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "1"})
    worker = server.environ(DBMIGRATE_CHECKOUT=str(REPO), PYTHONPATH=str(REPO), DBMIGRATE_HOME=str(tmp_path / "state"))
    server.start()
    try:
        with client_pointed_at(server.api_url):
            pool_and_deployments(server, "--name", "development-health")
            save_environment(target, "development")
            with get_client(sync_client=True) as client:
                deployment = client.read_deployment_by_name("db-health/development-health")

            nightly = wait_until(lambda: runs_of(deployment.id), 30, "the scheduler to create the nightly runs")
            assert all(r.auto_scheduled and r.created_by.type == "SCHEDULE" for r in nightly), nightly
            assert all(r.state.is_scheduled() and r.expected_start_time.astimezone(UTC).time() == time(0, 0)
                       for r in nightly), [r.expected_start_time for r in nightly]

            # A second schedule whose first run is due in a few seconds: the scheduler creates it, a worker runs it.
            due = datetime.now(UTC) + timedelta(seconds=3)
            with get_client(sync_client=True) as client:
                client.create_deployment_schedules(deployment.id, [
                    (IntervalSchedule(interval=timedelta(days=1), anchor_date=due), True)])
            [soon] = wait_until(lambda: [r for r in runs_of(deployment.id) if r.expected_start_time <= due],
                                30, "the scheduler to create the run due now")
            assert soon.auto_scheduled and soon.created_by.type == "SCHEDULE"
            wait_until(lambda: datetime.now(UTC) > due, 10, "the run to be due")
            prefect(server, "worker", "start", "--pool", "dbmigrate", "--run-once", cwd=REPO, env=worker)
            with get_client(sync_client=True) as client:
                ran = client.read_flow_run(soon.id)
            assert ran.state.is_completed(), (ran.state, log_of(soon.id))
            assert ran.name == "development-health"
    finally:
        server.stop()
    server_log = (home / "server.log").read_text()
    assert "Can't evaluate bulk DML statement" not in server_log and "Error scheduling deployment" not in server_log
