"""prefect.yaml and the GitHub workflow name flows and parameters that exist."""

import inspect
import re

import yaml
from prefect.flows import load_flow_from_entrypoint

from tests.conftest import REPO


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


def test_the_github_workflow_runs_db_migrate_with_parameters_it_has():
    workflow = (REPO / ".github" / "workflows" / "db-migrate.yml").read_text()
    flow = load_flow_from_entrypoint(str(REPO / "flows" / "migrate.py:db_migrate"))
    params = set(re.findall(r"--param (\w+)=", workflow))
    assert params and params <= set(inspect.signature(flow.fn).parameters)
    assert 'prefect deployment run "db-migrate/${{ inputs.environment }}"' in workflow
    options = yaml.safe_load(workflow)[True]["workflow_dispatch"]["inputs"]["environment"]["options"]
    deployments = {d["name"] for d in yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]
                   if d["entrypoint"].endswith(":db_migrate")}
    assert set(options) == deployments


def test_flow_parameters_are_described_for_the_ui():
    flow = load_flow_from_entrypoint(str(REPO / "flows" / "migrate.py:db_migrate"))
    properties = flow.parameters.properties
    assert set(properties) >= {"environment", "target_revision", "backup", "dry_run", "skip_health_checks",
                               "skip_validation"}
    assert all(p.get("description") for p in properties.values())
