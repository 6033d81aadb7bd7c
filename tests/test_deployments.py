"""prefect.yaml names flows and parameters that exist (the GitHub workflow: tests/test_github_workflow.py)."""

import inspect
import os
import subprocess
import sys
from pathlib import Path

import yaml
from prefect.flows import load_flow_from_entrypoint

from tests.helpers import REPO, last_report


def test_every_deployment_names_a_real_flow_and_its_parameters():
    config = yaml.safe_load((REPO / "prefect.yaml").read_text())
    seen = set()
    for deployment in config["deployments"]:
        flow = load_flow_from_entrypoint(str(REPO / deployment["entrypoint"]))
        accepted = set(inspect.signature(flow.fn).parameters)
        assert set(deployment["parameters"]) <= accepted, deployment["name"]
        assert deployment["parameters"]["environment"] in deployment["tags"]
        seen.add(f"{flow.name}/{deployment['name']}")
    assert {"db-migrate/development", "db-migrate/staging", "db-migrate/production",
            "db-rollback/production", "db-health/production-nightly", "db-backup/production-nightly"} <= seen


def test_flow_parameters_are_described_for_the_ui():
    flow = load_flow_from_entrypoint(str(REPO / "flows" / "migrate.py:db_migrate"))
    properties = flow.parameters.properties
    assert set(properties) >= {"environment", "target_revision", "backup", "dry_run", "skip_health_checks",
                               "skip_validation"}
    assert all(p.get("description") for p in properties.values())


def test_deploy_all_then_a_worker_runs_what_github_actions_triggers(prefect_api, environment, target, home, tmp_path):
    """`prefect deploy --all` from prefect.yaml, `prefect deployment run` as the GitHub workflow calls it,
    and a process worker of the `dbmigrate` pool running the flow from this checkout."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    from tests.helpers import assert_no_canary, fingerprint_of, reports_in
    from tests.projects import linear, stock_project

    name = environment("staging")
    ini = stock_project(tmp_path / "project", linear("op.create_table('t1', sa.Column('id', sa.Integer))"))
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "DBMIGRATE_CHECKOUT": str(REPO),
           "DBMIGRATE_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    prefect = str(Path(sys.executable).parent / "prefect")

    def run(*args: str) -> str:
        result = subprocess.run([prefect, "--no-prompt", *args], cwd=REPO, env=env, capture_output=True,
                                text=True, timeout=240)
        assert result.returncode == 0, f"prefect {' '.join(args)}: {result.stdout[-2000:]} {result.stderr[-2000:]}"
        assert_no_canary(result.stdout + result.stderr, f"prefect {args[0]}")
        return result.stdout

    run("work-pool", "create", "dbmigrate", "--type", "process", "--overwrite")
    run("deploy", "--all")
    with get_client(sync_client=True) as client:
        nightly = client.read_deployment_by_name("db-health/production-nightly")
        staging = client.read_deployment_by_name("db-migrate/staging")
    assert [s.schedule.cron for s in nightly.schedules] == ["0 2 * * *"]
    assert staging.parameters == {"environment": "staging"} and staging.work_pool_name == "dbmigrate"

    run("deployment", "run", "db-migrate/staging", "--param", f"credentials_block={name}",
        "--param", f"alembic_config={ini}", "--param", "requested_by=octocat (GitHub Actions run 1)")
    run("worker", "start", "--pool", "dbmigrate", "--run-once")

    with get_client(sync_client=True) as client:
        [flow_run] = [r for r in client.read_flow_runs() if r.deployment_id == staging.id]
    assert flow_run.state.is_completed(), flow_run.state.message
    assert flow_run.name == "staging-head" and "staging" in flow_run.tags
    assert fingerprint_of(target).revisions == ("r1",)
    report = last_report(home)
    assert report["operator"] == "octocat (GitHub Actions run 1)" and report["backup"]["verified"] is False

    # The staging deployment, its parameters overridden to reach production: refused, nothing touched.
    production = environment("production", approval_timeout_s=5)
    before = fingerprint_of(target), len(reports_in(home))
    run("deployment", "run", "db-migrate/staging", "--param", f"environment={production}",
        "--param", f"credentials_block={production}", "--param", f"alembic_config={ini}")
    run("worker", "start", "--pool", "dbmigrate", "--run-once")
    with get_client(sync_client=True) as client:
        [refused] = [r for r in client.read_flow_runs() if r.deployment_id == staging.id and r.id != flow_run.id]
    assert refused.state.is_failed()
    assert refused.state.message == "deployment for staging refuses the production database (block 'production')"
    assert (fingerprint_of(target), len(reports_in(home))) == before
    with get_client(sync_client=True) as client:
        logs = "\n".join(log.message for log in client.read_logs(
            LogFilter(flow_run_id=LogFilterFlowRunId(any_=[refused.id]))))
    assert refused.state.message in logs.splitlines()
    assert "Traceback" not in logs and "unexpected exception" not in logs, logs
