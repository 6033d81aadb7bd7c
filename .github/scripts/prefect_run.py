"""Run a dbmigrate deployment from GitHub Actions, wait for it, and tell the job what happened.

    python .github/scripts/prefect_run.py migrate    # db-migrate/<ENVIRONMENT>
    python .github/scripts/prefect_run.py rollback   # db-rollback/<ENVIRONMENT>-rollback, to TO_REVISION

The inputs come from the environment the workflow's ``env:`` sets, never from the shell text,
and reach Prefect as parameters of the Prefect client's request: a revision id arrives as the
string typed (``12``, ``-1``, quotes and ``$(...)`` included) and nothing is executed. The
run's JSON report comes from the artifact the flow publishes (``<flow>-<environment>-report``)
and is saved under REPORT_DIR; the outcome goes to $GITHUB_STEP_SUMMARY and $GITHUB_OUTPUT.
A SIGINT or SIGTERM (GitHub cancelling the job, or its timeout) cancels the Prefect run too.

Exit status: 0 the run completed; 1 it did not (failed, crashed, cancelled, timed out);
2 refused before any run was created (bad input, no such deployment, Prefect unreachable).
Only the standard library and the Prefect client: the job installs nothing else.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from uuid import UUID

ENVIRONMENTS = ("development", "staging", "production")
POLL_S = 2.0
WATCH_TIMEOUT_S = 3600  # unless WATCH_TIMEOUT says otherwise
LOG_LINES = 30  # of a run that did not complete
LOG_SETTLE_S = 10.0  # the run's process sends its last log lines in a batch after its final state


class Refused(Exception):
    """Nothing was started: the one line says why."""


class Interrupted(BaseException):
    """The job was cancelled or timed out: GitHub signals the step's process."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@dataclass
class Request:
    """What to run: ``flow/deployment`` and its parameters, exactly as they will reach Prefect."""

    flow: str
    environment: str
    parameters: dict = field(default_factory=dict)

    @property
    def deployment(self) -> str:
        return f"{self.flow}/{self.environment}" + ("-rollback" if self.flow == "db-rollback" else "")


# --- inputs ------------------------------------------------------------------------------

def environment_of(environ) -> str:
    name = environ.get("ENVIRONMENT", "")
    if name not in ENVIRONMENTS:
        raise Refused(f"unknown environment {name!r}: expected one of {', '.join(ENVIRONMENTS)}")
    return name


def flag(value, name: str, default: bool) -> bool:
    """A boolean input: GitHub renders inputs as 'true'/'false' ('' when the event has none);
    a deployment's payload holds JSON."""
    if value in ("", None):
        return default
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("true", "false"):
        return str(value).lower() == "true"
    raise Refused(f"{name} must be true or false, not {str(value)!r}")


def revision(value, name: str) -> str:
    if isinstance(value, int) and not isinstance(value, bool):  # {"target_revision": 12} in a payload
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        raise Refused(f"{name} must be a revision id, 'head', 'base' or a relative one like '-1', not {value!r}")
    return value


def migrate_request(environ) -> Request:
    """db-migrate/<environment>: from the workflow_dispatch inputs, or a deployment event's payload
    ({"target_revision": ..., "backup": ..., "dry_run": ...}, all optional)."""
    environment = environment_of(environ)
    if environ.get("GITHUB_EVENT_NAME") == "deployment":
        payload = json.loads(environ.get("DEPLOYMENT_PAYLOAD") or "null")
        inputs = payload if isinstance(payload, dict) else {}
    else:
        inputs = {key: environ.get(key.upper(), "") for key in ("target_revision", "backup", "dry_run")}
    backup, dry_run = flag(inputs.get("backup"), "backup", True), flag(inputs.get("dry_run"), "dry_run", False)
    if environment == "production" and not backup and not dry_run:  # the flow's policy refuses it too, later
        raise Refused("production requires a backup before migrating: backup=false is refused")
    return Request("db-migrate", environment, {
        "target_revision": revision(inputs.get("target_revision") or "head", "target_revision"),
        "backup": backup,
        "dry_run": dry_run,
        "requested_by": environ.get("REQUESTED_BY", ""),
    })


def rollback_request(environ) -> Request:
    """db-rollback/<environment>-rollback to TO_REVISION, for real (a dry run would undo nothing)."""
    environment = environment_of(environ)
    if environment == "production":
        raise Refused("production is never rolled back from GitHub: an operator runs db-rollback/production-rollback")
    return Request("db-rollback", environment, {
        "to_revision": revision(environ.get("TO_REVISION", ""), "TO_REVISION"),
        "dry_run": False,
        "requested_by": environ.get("REQUESTED_BY", ""),
    })


REQUESTS = {"migrate": migrate_request, "rollback": rollback_request}


# --- Prefect -----------------------------------------------------------------------------

def client():
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


def start(request: Request):
    """The flow run, created from the deployment with the request's parameters."""
    import httpx
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():  # the client would start a throw-away server of its own
        raise Refused("PREFECT_API_URL is not set: add it to the repository's (or the environment's) secrets")
    try:
        return _create(request)
    except httpx.TransportError as exc:
        raise Refused(f"cannot reach the Prefect API at {PREFECT_API_URL.value()}: {exc}") from None


def _create(request: Request):
    from prefect.exceptions import ObjectNotFound, PrefectHTTPStatusError

    with client() as prefect:
        try:
            deployment = prefect.read_deployment_by_name(request.deployment)
        except ObjectNotFound:
            raise Refused(f"no deployment {request.deployment} on {prefect.api_url}: run `prefect deploy --all`") from None
        try:
            return prefect.create_flow_run_from_deployment(deployment.id, parameters=request.parameters,
                                                           tags=["github-actions"])
        except PrefectHTTPStatusError as exc:  # the server validates the parameters against the flow's schema
            raise Refused(f"Prefect refused the run: {exc.response.json().get('detail', exc)}") from None


def wait(run_id: UUID, timeout_s: float):
    """Poll until the run ends or ``timeout_s`` passed, printing each state it enters; the run as last read."""
    deadline, seen = time.monotonic() + timeout_s, None
    while True:
        with client() as prefect:
            run = prefect.read_flow_run(run_id)
        if (run.state.name, run.state.message) != seen:
            seen = (run.state.name, run.state.message)
            print(run.state.name + (f": {run.state.message}" if run.state.message else ""), flush=True)
        if run.state.is_final() or time.monotonic() >= deadline:
            return run
        time.sleep(POLL_S)


def cancel(run_id: UUID, why: str) -> None:
    """Ask Prefect to cancel the run: the worker stops it and the flow's cancellation hook
    leaves the database at a revision and says which."""
    from prefect.client.schemas.objects import StateType
    from prefect.states import State

    with client() as prefect:
        prefect.set_flow_run_state(run_id, State(type=StateType.CANCELLING, message=why))
    print(f"{why}: asked Prefect to cancel flow run {run_id}", flush=True)


def last_log_lines(run, count: int = LOG_LINES) -> list[str]:
    """The run's last log lines, once those written after its final state have arrived (or
    LOG_SETTLE_S has passed: a killed process never sends them)."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import LogSort

    deadline = time.monotonic() + LOG_SETTLE_S
    with client() as prefect:
        while True:
            logs = prefect.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])), limit=count,
                                     sort=LogSort.TIMESTAMP_DESC)
            if (logs and logs[0].timestamp >= run.state.timestamp) or time.monotonic() >= deadline:
                break
            time.sleep(POLL_S)
    return [f"{log.timestamp:%H:%M:%S} {log.message}" for log in reversed(logs)]


def report_key(flow: str, environment: str) -> str:
    """The flow's report artifact (flows.artifacts.publish_report; environments are already lowercase words)."""
    return f"{flow}-{environment}-report"


def fetch_report(run_id: UUID, key: str) -> str | None:
    """The JSON report the run published, as the flow wrote it; None when it published none
    (a run refused or stopped before it had a report)."""
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    with client() as prefect:
        artifacts = prefect.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]),
                                           key=ArtifactFilterKey(any_=[key])),
            sort=ArtifactSort.CREATED_DESC, limit=1)
    return report_in(artifacts[0].data) if artifacts else None


def report_in(markdown: str) -> str:
    """The report in the artifact's one ```json fence (JSON escapes newlines: no line inside is a fence)."""
    [body] = re.findall(r"^```json\n(.*?)^```$", markdown, re.DOTALL | re.MULTILINE)
    return body


def ui_link(run) -> str | None:
    from prefect.utilities.urls import url_for

    return url_for(run)


# --- telling GitHub ----------------------------------------------------------------------

def set_output(name: str, value: str) -> None:
    """A step output, in the delimited form: no value can forge another output."""
    if path := os.environ.get("GITHUB_OUTPUT"):
        delimiter = f"EOF_{secrets.token_hex(16)}"
        with open(path, "a") as out:
            out.write(f"{name}<<{delimiter}\n{value}\n{delimiter}\n")


def code(text) -> str:
    """``text`` as an inline code span in a table cell, whatever it holds."""
    text = " ".join(str(text).split("\n")).replace("|", "\\|")
    fence = "`" * (max(map(len, re.findall("`+", text)), default=0) + 1)
    return f"{fence} {text} {fence}"


def shown(revision: str | None) -> str:
    return revision or "base"


def summary(request: Request, run, report: dict | None, outcome: str) -> str:
    link = ui_link(run)
    lines = [f"### {request.deployment}: {outcome}", "", "| | |", "|---|---|",
             f"| flow run | {f'[{code(run.name)}]({link})' if link else code(run.name)} ({run.id}) |"]
    if run.state.message:
        lines.append(f"| final state | {run.state.name}: {code(run.state.message)} |")
    if report is not None:
        revisions = f"{code(shown(report['revision_before']))} → {code(shown(report['revision_after']))}"
        lines += [f"| revision | {revisions} (target {code(report['target_revision'])}) |",
                  f"| report | {code(report['status'])}, {report['duration_s']} s; uploaded with this workflow run |"]
        if report.get("error"):
            lines.append(f"| failed in | {report['error']['phase']}: {code(report['error']['message'])} |")
        if report.get("rollback"):
            lines.append(f"| automatic rollback | {code(report['rollback']['detail'])} |")
    elif run.total_run_time:
        lines.append(f"| duration | {run.total_run_time.total_seconds():.1f} s (no report: the run stopped before one) |")
    return "\n".join(lines) + "\n"


def rollback_target(request: Request, run, report: dict | None) -> str | None:
    """Where the rollback job takes the database after a failed migration: back to the revision the
    run started from, when the run left it elsewhere (or cannot say where) and outside production."""
    if request.flow != "db-migrate" or request.environment == "production" or run.state.is_completed():
        return None
    if report is None or report["status"] == "dry_run" or report["revision_after"] == report["revision_before"]:
        return None
    before = shown(report["revision_before"])
    if "," in before:
        print(f"the run started from several heads ({before}): roll back with db-rollback by hand", flush=True)
        return None
    return before


# --- the step ----------------------------------------------------------------------------

def interrupted(signum, frame):
    raise Interrupted(signum)


def save(text: str, request: Request, run) -> Path:
    """The report as the flow wrote it, named after the run (never after an input)."""
    path = Path(os.environ.get("REPORT_DIR", "reports")) / f"{request.flow}-{request.environment}-{run.id}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def finish(request: Request, run, timed_out: bool) -> int:
    text = fetch_report(run.id, report_key(request.flow, request.environment))
    report = json.loads(text) if text is not None else None
    completed = run.state.is_completed()
    outcome = f"timed out, {run.state.name}" if timed_out else run.state.name
    print(f"{request.deployment}: {outcome}" + (f": {run.state.message}" if run.state.message else ""), flush=True)
    if not completed:
        print(f"last log lines of flow run {run.name}:", *last_log_lines(run), sep="\n  ", flush=True)
    if text is not None:
        path = save(text, request, run)
        print(f"report: {path}", flush=True)
        set_output("report", str(path))
    if to := rollback_target(request, run, report):
        set_output("rollback_to", to)
    if summary_path := os.environ.get("GITHUB_STEP_SUMMARY"):
        with open(summary_path, "a") as out:
            out.write(summary(request, run, report, outcome))
    return 0 if completed else 1


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in REQUESTS:
        print(f"usage: prefect_run.py {'|'.join(REQUESTS)}", file=sys.stderr)
        return 2
    # What the run prints (its messages, its log) is not ours: GitHub must not read it as workflow commands.
    print(f"::stop-commands::{secrets.token_hex(16)}", flush=True)
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, interrupted)
    run = None
    try:
        request = REQUESTS[argv[0]](os.environ)
        run = start(request)
        print(f"flow run {run.name} ({run.id}) of {request.deployment}: {ui_link(run) or 'no UI address known'}",
              f"parameters: {json.dumps(request.parameters)}", sep="\n", flush=True)
        set_output("flow_run_id", str(run.id))
        timeout_s = float(os.environ.get("WATCH_TIMEOUT", WATCH_TIMEOUT_S))
        finished = wait(run.id, timeout_s)
        timed_out = not finished.state.is_final()
        if timed_out:
            cancel(run.id, f"no final state within {timeout_s:g}s")
            finished = wait(run.id, 60)
        return finish(request, finished, timed_out)
    except Refused as exc:
        print(f"{argv[0]}: error: {exc}", flush=True)
        return 2
    except Interrupted as exc:
        for signum in (signal.SIGINT, signal.SIGTERM):  # GitHub follows SIGINT with SIGTERM: let the cancel finish
            signal.signal(signum, signal.SIG_IGN)
        if run is not None:
            cancel(run.id, f"the GitHub job was stopped ({exc})")
        return 128 + exc.signum


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
