"""GitHub Actions in miniature, to run a workflow's own shell steps in the tests: the `${{ }}`
expressions our workflows use, evaluated against a context (inputs, github, secrets, steps,
needs) as GitHub does, and a `run:` step executed the way the runner executes it: its text in a
file run by `bash --noprofile --norc -eo pipefail`, with the `env:` GitHub sets and the files
behind $GITHUB_OUTPUT and $GITHUB_STEP_SUMMARY; a job's steps one after the other (`run_job`)."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

EXPRESSION = re.compile(r"\$\{\{(.*?)\}\}", re.DOTALL)
STATUS_FUNCTIONS = ("success", "failure", "always", "cancelled")


def _split(expression: str, operator: str) -> list[str]:
    """``expression`` split at ``operator`` outside 'quoted literals'."""
    parts, start, quoted, i = [], 0, False, 0
    while i < len(expression):
        if expression[i] == "'":
            quoted = not quoted
        elif not quoted and expression.startswith(operator, i):
            parts.append(expression[start:i])
            start = i = i + len(operator)
            continue
        i += 1
    return [*parts, expression[start:]]


def _truthy(value) -> bool:
    return value not in (None, False, 0, "") and not (isinstance(value, float) and math.isnan(value))


def _number(value) -> float:
    if value is None:
        return 0.0
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    try:
        return float(value.strip() or 0)
    except (ValueError, AttributeError):
        return math.nan


def _equal(a, b) -> bool:
    """GitHub's loose equality: strings case-insensitively, other mixes as numbers (null is 0)."""
    if isinstance(a, str) and isinstance(b, str):
        return a.lower() == b.lower()
    if type(a) is type(b):
        return a == b
    return _number(a) == _number(b)


def evaluate(expression: str, context: dict, job_status: str = "success"):
    """The expressions our workflows use: context paths (a missing one is null), 'literals',
    toJSON(path), the status functions, ==, !=, && and || (which return an operand, as GitHub's do)."""
    expression = expression.strip()
    for operator, stop in (("||", _truthy), ("&&", lambda v: not _truthy(v))):
        parts = _split(expression, operator)
        if len(parts) > 1:
            for part in parts:
                value = evaluate(part, context, job_status)
                if stop(value):
                    return value
            return value
    for operator in ("!=", "=="):
        parts = _split(expression, operator)
        if len(parts) == 2:
            same = _equal(*(evaluate(p, context, job_status) for p in parts))
            return same if operator == "==" else not same
    if expression.startswith("'"):
        return expression[1:-1].replace("''", "'")
    if call := re.fullmatch(r"(\w+)\((.*)\)", expression):
        name, argument = call.groups()
        if name.lower() == "tojson":
            return json.dumps(evaluate(argument, context, job_status), indent=2)
        assert name in STATUS_FUNCTIONS and not argument, f"unsupported function {expression}"
        return {"success": job_status == "success", "failure": job_status == "failure",
                "always": True, "cancelled": job_status == "cancelled"}[name]
    assert re.fullmatch(r"[A-Za-z_][\w.-]*", expression), f"unsupported expression {expression!r}"
    value = context
    for key in expression.split("."):
        value = value.get(key) if isinstance(value, dict) else None
    return value


def as_string(value) -> str:
    """A value as GitHub writes it into a string (an env value, an output)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list)):
        return json.dumps(value, indent=2)
    return str(value)


def render(text, context: dict, job_status: str = "success") -> str:
    return EXPRESSION.sub(lambda m: as_string(evaluate(m.group(1), context, job_status)), str(text))


def condition(text: str, context: dict, job_status: str) -> bool:
    """A job's or step's ``if:``, with or without ``${{ }}``."""
    inner = EXPRESSION.fullmatch(text.strip())
    return _truthy(evaluate(inner.group(1) if inner else text, context, job_status))


def parse_outputs(text: str) -> dict[str, str]:
    """$GITHUB_OUTPUT: ``name=value`` lines and ``name<<DELIMITER`` blocks."""
    outputs, lines = {}, iter(text.splitlines())
    for line in lines:
        if "<<" in line and ("=" not in line or line.index("<<") < line.index("=")):
            name, delimiter = line.split("<<", 1)
            body = []
            for inner in lines:
                if inner == delimiter:
                    break
                body.append(inner)
            outputs[name] = "\n".join(body)
        elif "=" in line:
            name, value = line.split("=", 1)
            outputs[name] = value
    return outputs


@dataclass
class Workflow:
    path: Path

    @property
    def data(self) -> dict:
        return yaml.safe_load(self.path.read_text())

    @property
    def triggers(self) -> dict:
        return self.data[True]  # YAML 1.1 reads the key `on` as true

    def job(self, name: str) -> dict:
        return self.data["jobs"][name]

    def step(self, job: str, step_id: str) -> dict:
        [step] = [s for s in self.job(job)["steps"] if s.get("id") == step_id]
        return step

    def run_steps(self) -> list[dict]:
        return [s for job in self.data["jobs"].values() for s in job["steps"] if "run" in s]


@dataclass
class StepRun:
    """One `run:` step started as the runner starts it; ``process`` is bash, the step's entry process."""

    process: subprocess.Popen
    workdir: Path
    ended_at: float = 0.0  # time.time() when the step's output closed

    def finish(self, timeout: float) -> subprocess.CompletedProcess:
        try:
            out, _ = self.process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:  # as the runner does in the end: the step's whole process tree
            os.killpg(self.process.pid, signal.SIGKILL)
            raise
        self.ended_at = time.time()
        return subprocess.CompletedProcess(self.process.args, self.process.returncode, out, "")

    @property
    def outputs(self) -> dict[str, str]:
        return parse_outputs((self.workdir / "github_output").read_text())

    @property
    def summary(self) -> str:
        return (self.workdir / "step_summary").read_text()


def start_step(workflow: Workflow, job_name: str, step_id: str, context: dict, workspace: Path,
               workdir: Path, tools: Path | None = None, **changed_env: str) -> StepRun:
    """Start the step with the environment GitHub gives it: the workflow's, job's and step's
    ``env:`` rendered against ``context``, the runner's own variables, and a PATH whose
    ``python`` is this one (the job's setup-python). Nothing else of this process's environment;
    ``changed_env`` replaces values the workflow sets (a shorter timeout, say); ``tools``, a directory
    whose commands are found first (a fault injected into one of them)."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "home").mkdir(exist_ok=True)
    for name in ("github_output", "step_summary"):
        (workdir / name).write_text("")
    job = workflow.job(job_name)
    step = workflow.step(job_name, step_id)
    env = {
        "PATH": ":".join([*([str(tools)] if tools else []), str(Path(sys.executable).parent), "/usr/bin", "/bin"]),
        "HOME": str(workdir / "home"),
        "LANG": "C.UTF-8",
        "CI": "true",
        "GITHUB_ACTIONS": "true",
        "GITHUB_EVENT_NAME": context["github"]["event_name"],
        "GITHUB_ACTOR": context["github"]["actor"],
        "GITHUB_RUN_ID": str(context["github"]["run_id"]),
        "GITHUB_WORKSPACE": str(workspace),
        "GITHUB_OUTPUT": str(workdir / "github_output"),
        "GITHUB_STEP_SUMMARY": str(workdir / "step_summary"),
        "RUNNER_TEMP": str(runner_temp(workdir.parent)),
    }
    for scope in (workflow.data, job, step):
        env.update({name: render(value, context) for name, value in scope.get("env", {}).items()})
    assert set(changed_env) <= set(env), "only a value the workflow sets can be changed"
    env.update(changed_env)
    script = workdir / "step.sh"
    script.write_text(step["run"])
    process = subprocess.Popen(["bash", "--noprofile", "--norc", "-eo", "pipefail", str(script)], cwd=workspace,
                               env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    return StepRun(process, workdir)


@dataclass
class JobRun:
    """The `run:` steps of a job, run one after the other as the runner runs them: each step's
    ``if:`` (``success()`` when it has none) against the job's status and the outputs of the
    steps before it."""

    steps: dict[str, StepRun]
    results: dict[str, subprocess.CompletedProcess]
    status: str

    @property
    def stdout(self) -> str:
        return "".join(result.stdout for result in self.results.values())

    @property
    def summary(self) -> str:
        return "".join(step.summary for step in self.steps.values())

    def outputs(self, step_id: str) -> dict[str, str]:
        return self.steps[step_id].outputs if step_id in self.steps else {}

    def output(self, name: str) -> str | None:
        """An output of whichever step set it."""
        return next((step.outputs[name] for step in self.steps.values() if name in step.outputs), None)


def run_job(workflow: Workflow, job_name: str, context: dict, workspace: Path, workdir: Path, timeout: float = 240,
            interrupt=None, tools: Path | None = None, **changed_env: str) -> JobRun:
    """The job's `run:` steps that have an id (not the setup ones), each in ``workdir/<id>`` with its
    own $GITHUB_OUTPUT and $GITHUB_STEP_SUMMARY. ``interrupt(step_id, step, steps)``, called as each
    step starts with the outputs of those before it, returns True once it has signalled the step as
    GitHub does when the job is cancelled: the job's status is then ``cancelled`` for the steps after it."""
    steps, results, status = {}, {}, "success"
    for step in workflow.job(job_name)["steps"]:
        if "run" not in step or "id" not in step:
            continue
        step_context = {**context, "steps": {name: {"outputs": run.outputs} for name, run in steps.items()}}
        if not condition(step.get("if", "success()"), step_context, status):
            continue
        run = start_step(workflow, job_name, step["id"], step_context, workspace, workdir / step["id"], tools,
                         **changed_env)
        cancelled = bool(interrupt and interrupt(step["id"], run, step_context["steps"]))
        steps[step["id"]], results[step["id"]] = run, run.finish(timeout)
        if cancelled:
            status = "cancelled"
        elif results[step["id"]].returncode != 0 and status == "success":
            status = "failure"
    return JobRun(steps, results, status)


def runner_temp(directory: Path) -> Path:
    """$RUNNER_TEMP: the job's temporary directory, shared by its steps (GitHub empties it per job)."""
    (directory / "runner-temp").mkdir(parents=True, exist_ok=True)
    return directory / "runner-temp"


def workspace(directory: Path) -> Path:
    """$GITHUB_WORKSPACE of a job (the workflow checks nothing out: its steps need only Prefect's CLI and jq)."""
    (directory / "workspace").mkdir(parents=True, exist_ok=True)
    return directory / "workspace"


def event_context(environment: str, event: str = "workflow_dispatch", payload=None, **inputs) -> dict:
    """The expression context of a run of the workflow: a workflow_dispatch with ``inputs`` (as
    GitHub fills in defaults), or a deployment event with ``payload``."""
    github = {"event_name": event, "actor": "octocat", "run_id": 4242}
    if event == "deployment":
        github["event"] = {"deployment": {"environment": environment, "payload": payload or {}}}
        return {"github": github, "inputs": {}}
    inputs = {"environment": environment, "target_revision": "head", "backup": True, "dry_run": False, **inputs}
    github["event"] = {"inputs": {k: str(v).lower() if isinstance(v, bool) else v for k, v in inputs.items()}}
    return {"github": github, "inputs": inputs}
