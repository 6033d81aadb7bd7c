"""The GitHub workflow (.github/workflows/db-migrate.yml): valid for GitHub, and its own shell
steps, run as the runner runs them (tests/support/github_actions.py), against a real `prefect server
start` and a process worker running prefect.yaml's deployments. The steps use Prefect's own
commands (`prefect deployment run`, `prefect flow-run watch|cancel|logs`, `prefect api`) and jq:
hostile inputs arrive as typed and execute nothing, a good run writes its summary and fetches its
report, a failed one says why and the rollback job takes the database back, a cancelled job
cancels the run. And the operator's terminal (`dbmigrate run --env E --watch`, dbmigrate/watch.py)
on the same server: the reason of a failure, the approval link, Ctrl-C cancelling the run."""

from __future__ import annotations

import inspect
import json
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.support.github_actions import (
    Workflow,
    condition,
    event_context,
    render,
    run_job,
    workspace,
)
from tests.support.helpers import (REPO, assert_no_canary, assert_takes, documented_commands, fingerprint_of,
                                   save_environment, start_cli, wait_until)
from tests.support.pgcluster import free_port
from tests.support.prefect_server import PrefectServer, Worker, deployed, flow_run, prefect
from tests.support.projects import linear, stock_project

# Its own Prefect server (the tests that use it are slow): one worker runs the module (--dist loadgroup).
pytestmark = [pytest.mark.xdist_group("prefect-server-github-workflow")]

WORKFLOW = Workflow(REPO / ".github" / "workflows" / "db-migrate.yml")
ENVIRONMENT = "staging"
MIGRATE, ROLLBACK = f"db-migrate/{ENVIRONMENT}", f"db-rollback/{ENVIRONMENT}-rollback"


def table(name: str) -> tuple[str, str]:
    return f"op.create_table('{name}', sa.Column('id', sa.Integer))", f"op.drop_table('{name}')"


# --- the workflow as GitHub reads it -------------------------------------------------------

def test_the_workflows_are_valid_for_github():
    """GitHub's own schema (bundled with check-jsonschema: no network)."""
    checker = Path(sys.executable).parent / "check-jsonschema"
    workflows = sorted(str(p) for p in (REPO / ".github" / "workflows").glob("*.yml"))
    result = subprocess.run([str(checker), "--builtin-schema", "vendor.github-workflows", *workflows],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_inputs_reach_the_shell_only_through_env():
    for step in WORKFLOW.run_steps():
        assert "${{" not in step["run"], f"an expression in the shell text of {step.get('name', step['run'])}"
    start = WORKFLOW.step("migrate", "start")
    assert {"TARGET_REVISION", "BACKUP", "DRY_RUN", "REQUESTED_BY"} <= set(start["env"])
    assert WORKFLOW.data["permissions"] == {"contents": "read"}
    assert set(WORKFLOW.triggers) == {"workflow_dispatch", "deployment"}
    inputs = WORKFLOW.triggers["workflow_dispatch"]["inputs"]
    assert inputs["environment"]["options"] == ["development", "staging", "production"]
    assert (inputs["target_revision"]["default"], inputs["backup"]["default"]) == ("head", True)
    for job in ("migrate", "rollback"):
        waits_s = int(WORKFLOW.job(job)["env"]["WATCH_TIMEOUT"])
        assert waits_s + 60 + 120 <= WORKFLOW.job(job)["timeout-minutes"] * 60, \
            f"{job}: the step cancels the run and reports (60 s for the run to end) before GitHub stops the job"


def test_the_workflow_uses_prefects_own_commands():
    """No client of our own: the jobs start the run with `prefect deployment run` and follow it
    with Prefect's commands; the setup installs Prefect and nothing else of ours."""
    assert not (REPO / ".github" / "scripts").exists()
    for job in ("migrate", "rollback"):
        assert 'prefect deployment run "$DEPLOYMENT" --params "$params"' in WORKFLOW.step(job, "start")["run"]
        assert 'prefect flow-run watch "$FLOW_RUN_ID" --timeout "$WATCH_TIMEOUT"' in WORKFLOW.step(job, "run")["run"]
        assert WORKFLOW.step(job, "cancel")["run"] == 'prefect flow-run cancel "$FLOW_RUN_ID"'


def test_the_workflow_runs_deployments_and_parameters_that_exist():
    from prefect.flows import load_flow_from_entrypoint

    options = WORKFLOW.triggers["workflow_dispatch"]["inputs"]["environment"]["options"]
    deployments = yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]
    for job, entrypoint, parameters in (("migrate", "flows/migrate.py:db_migrate", "target_revision: backup: dry_run:"),
                                        ("rollback", "flows/db_rollback.py:db_rollback", "to_revision: dry_run:")):
        env = WORKFLOW.job(job)["env"]
        flow = load_flow_from_entrypoint(str(REPO / entrypoint))
        assert env["FLOW"] == flow.name
        named = {render(env["DEPLOYMENT"], event_context(option)) for option in options}
        assert named <= {f"{flow.name}/{d['name']}" for d in deployments if d["entrypoint"] == entrypoint}, named
        for name in (*parameters.split(), "requested_by:"):
            assert name in WORKFLOW.step(job, "start")["run"] and name[:-1] in inspect.signature(flow.fn).parameters


@pytest.mark.parametrize("event, environment, inputs, secrets, says", [
    ("deployment", "github-pages", {}, {}, "Deployment 'db-migrate/github-pages' not found!"),
    ("deployment", "staging", {"backup": "maybe"}, {}, 'backup must be true or false, not "maybe"'),
    ("deployment", "staging", {"target_revision": ["12"]}, {},
     'target_revision must be a revision id, head, base or a relative one like -1, not ["12"]'),
    ("workflow_dispatch", "staging", {}, {"PREFECT_API_URL": ""},
     "error: PREFECT_API_URL is not set: add it to the repository's (or the environment's) secrets"),
    ("workflow_dispatch", "staging", {}, {"PREFECT_API_URL": "http://127.0.0.1:{port}/api"},
     "Could not connect to API at: http://127.0.0.1:{port}/api"),
], ids=["unknown environment", "not a boolean", "not a revision", "no API URL", "API unreachable"])
@pytest.mark.slow
def test_bad_input_is_refused_in_one_line_before_any_run(event, environment, inputs, secrets, says, server, tmp_path):
    """Refused by jq, by our one check or by `prefect deployment run` itself: no run, one line saying why."""
    port = free_port()
    secrets = {"PREFECT_API_URL": server.api_url, **{k: v.format(port=port) for k, v in secrets.items()}}
    context = event_context(environment, event, inputs) if event == "deployment" else event_context(environment)
    job = run_job(WORKFLOW, "migrate", {**context, "secrets": secrets}, workspace(tmp_path), tmp_path, timeout=120)
    print(job.stdout)
    assert list(job.results) == ["start"] and job.results["start"].returncode != 0
    assert says.format(port=port) in job.stdout and "Traceback" not in job.stdout
    assert job.output("flow_run_id") is None


def test_the_rollback_job_runs_after_a_failure_outside_production_only():
    rollback = WORKFLOW.job("rollback")
    needs = {"migrate": {"result": "failure", "outputs": {"rollback_to": "11"}}}
    for environment, event, expected in [("staging", "workflow_dispatch", True), ("development", "deployment", True),
                                         ("production", "workflow_dispatch", False),
                                         ("production", "deployment", False)]:
        context = {**event_context(environment, event), "needs": needs}
        assert condition(rollback["if"], context, "failure") is expected, (environment, event)
    context = {**event_context("staging", "workflow_dispatch"), "needs": needs}
    assert not condition(rollback["if"], context, "success"), "the migration succeeded"
    nothing = {"migrate": {"result": "failure", "outputs": {}}}
    assert not condition(rollback["if"], {**context, "needs": nothing}, "failure"), "nothing to roll back"


# --- the shell steps against a real server -------------------------------------------------

@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """11 <- 12 <- 13, all-digit revision ids, one transaction each; 13 fails after creating t3."""
    t3, drop_t3 = table("t3")
    steps = linear(table("t1"), table("t2"), (f"{t3}; op.execute('SELECT 1/0')", drop_t3), prefix="1")
    return stock_project(tmp_path_factory.mktemp("project"), steps, transaction_per_migration=True)


@pytest.fixture(scope="module")
def server(tmp_path_factory, project):
    """One server, prefect.yaml deployed, and one process worker running the deployments with the
    module's project (ALEMBIC_CONFIG: the workflow passes no alembic_config) and its own home."""

    home = tmp_path_factory.mktemp("prefect-home")
    with deployed(PrefectServer(home)) as server:
        state = home / "worker-home"
        environ = server.environ(DBMIGRATE_CHECKOUT=str(REPO), PYTHONPATH=str(REPO), DBMIGRATE_HOME=str(state),
                                 ALEMBIC_CONFIG=str(project))
        worker = Worker(server, environ, home / "worker.log")
        worker.start()
        server.worker_home = state
        try:
            yield server
        finally:
            worker.kill_all()


@pytest.fixture
def staging(server, target, cli, url, project):
    """The test's database at 11, as the staging environment of the server (credentials and a
    quick policy, overridden by ``policy``)."""
    assert cli("upgrade", "-r", "11", "--yes", "--alembic-config", str(project),
               env={"DATABASE_URL": url}).returncode == 0
    return lambda **policy: save_environment(target, ENVIRONMENT, **policy)


def job_run(server, tmp_path: Path, job: str, context: dict, name: str = "job", interrupt=None,
            tools: Path | None = None, **changed_env: str):
    """The job's steps, in a workspace of its own (what the steps write stays there)."""
    secrets = {"PREFECT_API_URL": server.api_url, "PREFECT_API_KEY": ""}
    run = run_job(WORKFLOW, job, {**context, "secrets": secrets}, workspace(tmp_path / name), tmp_path / name,
                  interrupt=interrupt, tools=tools, **changed_env)
    print(run.stdout)
    assert_no_canary(run.stdout + run.summary, "the job's output")
    return run


def finished(server, tmp_path: Path, job: str, context: dict, name: str = "job"):
    run = job_run(server, tmp_path, job, context, name)
    assert "Traceback" not in run.stdout
    assert list(run.results) == ["start", "run", "report"], "no cancel: the job was not cancelled"
    return run


def worker_reports(server) -> list[str]:
    """The reports the runs wrote on the worker's disk."""
    return [p.read_text() for p in (server.worker_home / "reports").glob("*.json")]


@pytest.mark.slow
def test_a_hostile_revision_arrives_as_typed_and_executes_nothing(server, staging, target, tmp_path):
    staging()
    marker = tmp_path / "pwned"
    hostile = f"it's \"$(touch {marker})\" `touch {marker}`; touch {marker} #"
    before = fingerprint_of(target)

    job = finished(server, tmp_path, "migrate", event_context(ENVIRONMENT, target_revision=hostile))

    assert job.status == "failure" and job.results["run"].returncode == 1
    assert not marker.exists(), "the revision was executed"
    run = flow_run(job.output("flow_run_id"))
    assert run.parameters["target_revision"] == hostile
    assert run.state.is_failed() and run.state.message.startswith(f"plan failed: malformed revision {hostile!r}")
    assert f"{MIGRATE}: Failed: {run.state.message}" in job.results["report"].stdout, "the job says why"
    for step in ("start", "run", "report"):  # what they print holds the parameters or the run's name, with the revision
        assert job.results[step].stdout.startswith("::stop-commands::"), "the run's text read as workflow commands"
    assert fingerprint_of(target) == before
    assert job.output("rollback_to") is None, "nothing changed: nothing to roll back"


@pytest.mark.slow
def test_a_good_run_with_an_all_digit_revision(server, staging, target, tmp_path):
    """`12` reaches the flow as the string "12" (`--param target_revision=12` would send the number);
    the wait ends with the run; the step summary tells the story and the report uploaded is the one
    the run wrote."""
    staging()
    job = finished(server, tmp_path, "migrate", event_context(ENVIRONMENT, target_revision="12"))

    assert job.status == "success", job.stdout
    run = flow_run(job.output("flow_run_id"))
    assert run.parameters["target_revision"] == "12" and run.state.is_completed()
    assert fingerprint_of(target).revisions == ("12",)
    # the wait ends with the run, not a state poll (STATE_POLL_S) later: once, the poll's sleep held it
    waited = job.steps["run"].ended_at - run.end_time.timestamp()
    assert waited < 20, f"the wait step ended {waited:.0f} s after the run"
    saved = job.output("report")
    fetched = (tmp_path / "job" / "workspace" / saved).read_text()
    assert saved.startswith("migration-reports/"), "where the upload step looks"
    assert fetched in worker_reports(server), "the report as the run wrote it, byte for byte"
    report = json.loads(fetched)
    assert report["requested_by"] == "octocat (GitHub Actions run 4242)" and report["revision_after"] == "12"
    summary = job.summary
    assert summary.startswith(f"### {MIGRATE}: Completed")
    assert "` 11 ` → ` 12 ` (target ` 12 `)" in summary and f"{report['duration_s']} s" in summary
    assert f"]({server.api_url.removesuffix('/api')}/runs/flow-run/{run.id})" in summary, "a link to the run"


@pytest.mark.slow
def test_a_watch_that_misses_the_runs_last_event_does_not_hold_the_job(server, staging, target, tmp_path):
    """Prefect's `flow-run watch` follows the event stream only; one that never sees the final
    event (PrefectHQ/prefect#19989; a job once hung here for 240 s) must not hold the job until
    WATCH_TIMEOUT: the run's state, polled beside it, ends the wait and decides the exit code."""
    staging()
    tools = tmp_path / "tools"
    tools.mkdir()
    (tools / "prefect").write_text(
        "#!/bin/bash\n"
        "if [ \"$1 $2\" = 'flow-run watch' ]; then exec sleep 600; fi  # the event that never comes\n"
        f"exec {Path(sys.executable).parent / 'prefect'} \"$@\"\n")
    (tools / "prefect").chmod(0o755)

    job = job_run(server, tmp_path, "migrate", event_context(ENVIRONMENT, target_revision="12"), tools=tools,
                  STATE_POLL_S="5")

    assert job.status == "success" and list(job.results) == ["start", "run", "report"], job.stdout
    assert flow_run(job.output("flow_run_id")).state.is_completed()
    assert fingerprint_of(target).revisions == ("12",)
    assert job.output("timed_out") is None, "the run ended: nothing to cancel"


@pytest.mark.slow
def test_the_documented_json_forms_send_an_all_digit_revision(server, staging, tmp_path):
    """docs/PREFECT.md "Revision ids that look like JSON": what `prefect deployment run` needs for such a revision."""
    staging(approval_required=True)  # the runs wait for an answer: nothing is changed, and they are cancelled
    refused = subprocess.run([str(Path(sys.executable).parent / "prefect"), "deployment", "run", MIGRATE,
                              "--param", "target_revision=12"], env=server.environ(), cwd=REPO,
                             capture_output=True, text=True, timeout=120, check=False)
    assert refused.returncode == 1 and "12 is not of type 'string'" in refused.stdout
    for command in documented_commands("docs/PREFECT.md", "### Revision ids that look like JSON"):
        argv = shlex.split(command)
        assert argv[:4] == ["prefect", "deployment", "run", MIGRATE], command
        out = prefect(server, *argv[1:], cwd=REPO)
        run_id = out.split("UUID: ")[1].split()[0]
        assert flow_run(run_id).parameters["target_revision"] == "12"
        # Cancelled once it waits for approval: a cancel that lands while the worker is still starting
        # the run's process can find no process to stop and leave the run Cancelling (seen under load).
        wait_until(lambda run_id=run_id: flow_run(run_id).state.is_paused(), 180, "the run to wait for approval")
        prefect(server, "flow-run", "cancel", run_id, cwd=REPO)
        wait_until(lambda run_id=run_id: flow_run(run_id).state.is_final(), 90, "the run to be cancelled")


@pytest.mark.slow
def test_a_failed_migration_says_why_and_the_rollback_job_takes_it_back(server, staging, target, tmp_path):
    staging(auto_rollback=False)  # the flow leaves the database where the failure left it
    before = fingerprint_of(target)
    context = event_context(ENVIRONMENT)
    job = finished(server, tmp_path, "migrate", context)

    assert job.status == "failure"
    run = flow_run(job.output("flow_run_id"))
    assert run.state.message.startswith("migrate failed: revision 13 failed: division by zero"), run.state.message
    told = job.results["report"].stdout
    assert f"{MIGRATE}: Failed: {run.state.message}" in told
    assert "last log lines of flow run" in told and "division by zero" in told.split("last log")[1]
    assert fingerprint_of(target).revisions == ("12",), "12 committed, 13 failed"
    assert "failed in | migrate:" in job.summary

    steps = {name: {"outputs": step.outputs} for name, step in job.steps.items()}
    needs = {"migrate": {"result": "failure", "outputs": {
        name: render(value, {"steps": steps}) for name, value in WORKFLOW.job("migrate")["outputs"].items()}}}
    assert needs["migrate"]["outputs"]["rollback_to"] == "11"
    context = {**context, "needs": needs}
    assert condition(WORKFLOW.job("rollback")["if"], context, "failure")
    job = finished(server, tmp_path, "rollback", context, name="rollback")

    assert job.status == "success", job.stdout
    run = flow_run(job.output("flow_run_id"))
    assert run.parameters == {"environment": ENVIRONMENT, "to_revision": "11", "dry_run": False,
                              "requested_by": "octocat (GitHub Actions run 4242, rollback)"}
    assert fingerprint_of(target) == before
    assert job.summary.startswith(f"### {ROLLBACK}: Completed")
    assert job.output("report").startswith("rollback-reports/")


@pytest.mark.slow
def test_production_without_a_backup_is_refused_by_the_flow(server, target, tmp_path):
    """The workflow does not repeat the policy: the run says why, naming the rule, and changes nothing."""
    save_environment(target, "production")
    before = fingerprint_of(target)
    job = finished(server, tmp_path, "migrate", event_context("production", backup=False))
    assert job.status == "failure"
    run = flow_run(job.output("flow_run_id"))
    assert run.state.is_failed() and run.state.message.endswith("backup=false is refused"), run.state.message
    assert f"db-migrate/production: Failed: {run.state.message}" in job.results["report"].stdout
    assert fingerprint_of(target) == before


@pytest.mark.slow
def test_the_job_cancelled_cancels_the_run(server, staging, target, tmp_path):
    """GitHub signals the running step when the job is cancelled or times out (SIGINT, then
    SIGTERM), then runs the steps whose `if:` says cancelled(): the Prefect run is cancelled, not
    left waiting. Here a deployment event's run, paused for approval."""
    staging(approval_required=True)
    before = fingerprint_of(target)

    def interrupt(step_id, step, steps) -> bool:
        if step_id != "run":
            return False
        run_id = stopped["run_id"] = steps["start"]["outputs"]["flow_run_id"]
        wait_until(lambda: flow_run(run_id).state.is_paused(), 120, "the run to wait for approval")
        assert_takes(step.process.pid, signal.SIGINT)
        os.killpg(step.process.pid, signal.SIGINT)  # the step's processes, as the runner ends them
        return True

    stopped = {}
    job = job_run(server, tmp_path, "migrate", event_context(ENVIRONMENT, "deployment", {"target_revision": 12}),
                  interrupt=interrupt)

    run_id = stopped["run_id"]
    assert job.status == "cancelled" and list(job.results) == ["start", "run", "cancel", "report"]
    assert job.results["run"].returncode == 130 and "no final state" not in job.results["run"].stdout
    assert flow_run(run_id).parameters["target_revision"] == "12"
    run = wait_until(lambda: (r := flow_run(run_id)).state.is_final() and r, 90, "the run to end")
    assert run.state.is_cancelled(), run.state
    assert fingerprint_of(target) == before


@pytest.mark.slow
def test_a_run_still_going_when_the_wait_ends_is_cancelled(server, staging, target, tmp_path):
    """The wait's own timeout (WATCH_TIMEOUT, shortened here to about the time a worker takes to
    start a run): the run is cancelled, started or not, and the job fails saying so. (The policy
    asks for approval: a run that got further would wait, never migrate.)"""
    staging(approval_required=True)
    before = fingerprint_of(target)
    job = job_run(server, tmp_path, "migrate", event_context(ENVIRONMENT), WATCH_TIMEOUT="8")

    assert job.status == "failure" and list(job.results) == ["start", "run", "report"]
    run = flow_run(job.output("flow_run_id"))
    assert f"no final state within 8s: cancelling flow run {run.id}" in job.results["run"].stdout
    assert run.state.is_cancelled(), run.state
    assert f"{MIGRATE}: timed out, Cancelled" in job.results["report"].stdout
    assert job.summary.startswith(f"### {MIGRATE}: timed out, Cancelled")
    assert fingerprint_of(target) == before


# --- the operator's terminal: `dbmigrate run --env E --watch` --------------------------------

@pytest.mark.slow
def test_dbmigrate_run_says_why_a_run_failed(server, staging, target, cli):
    """What `prefect deployment run --watch` never prints (it ends `Flow run finished in state
    'Failed'.`): the final state's message, the one-line reason."""
    staging()
    before = fingerprint_of(target)
    api = {"PREFECT_API_URL": server.api_url}  # the only setting named: in this process, whose client points there
    result = cli("run", "--env", ENVIRONMENT, "--revision", "nope", "--watch", env=api)
    print(result.stdout, result.stderr)

    assert result.returncode == 1
    [run_id] = re.findall(rf"^flow run \S+ \(([0-9a-f-]{{36}})\) of {MIGRATE}: ", result.stdout, re.MULTILINE)
    run = flow_run(run_id)
    assert run.state.message.startswith("plan failed: ") and "'nope'" in run.state.message
    assert result.stdout.rstrip().endswith(f"Failed: {run.state.message}")
    assert run.parameters["target_revision"] == "nope" and "(dbmigrate run)" in run.parameters["requested_by"]
    assert fingerprint_of(target) == before

    refused = cli("run", "--env", "nowhere", "--watch", env=api)
    assert (refused.returncode, refused.stdout) == (2, "")
    assert refused.stderr == (f"dbmigrate: error: no deployment db-migrate/nowhere on {server.api_url}: "
                              "`prefect deploy --all` from the checkout\n")


@pytest.mark.slow
def test_dbmigrate_run_shows_where_to_approve_and_ctrl_c_cancels_the_run(server, staging, target, home):
    staging(approval_required=True)
    before = fingerprint_of(target)
    process = start_cli(home, "run", "--env", ENVIRONMENT, "--watch", env=server.environ())
    lines = []
    try:
        for line in process.stdout:
            lines.append(line)
            if line.startswith("approve or reject it at "):
                break
        printed = "".join(lines)
        [run_id] = re.findall(rf"^flow run \S+ \(([0-9a-f-]{{36}})\) of {MIGRATE}: ", printed, re.MULTILINE)
        assert flow_run(run_id).state.is_paused()
        assert ": waiting for approval of 11 → 13 in staging" in printed
        assert f"approve or reject it at {server.api_url.removesuffix('/api')}/runs/flow-run/{run_id}" in printed
        assert_takes(process.pid, signal.SIGINT)
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    print(printed + out, err)

    assert process.returncode == 130 and err.strip() == "dbmigrate: interrupted"
    assert f"interrupted from the terminal that started it: cancelling flow run {run_id}" in out
    run = flow_run(run_id)
    assert run.state.is_cancelled(), run.state
    assert "Run cancelled during approval, before migrating: the database was not changed" in out, \
        "the flow's cancellation hook says where the database is"
    assert fingerprint_of(target) == before
