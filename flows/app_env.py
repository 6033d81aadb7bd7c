"""db-migrate through the application environment's own ``dbmigrate`` (the deployment's
``dbmigrate_executable`` parameter): for an application whose pins conflict with Prefect's.

env.py imports the application, so the migration must run where the application is installed;
there the plain command line is installed without Prefect (``pip install dbmigrate``). The worker
keeps what Prefect is for: the blocks, the policy, approval in the UI, one run per environment,
the report artifact. The subprocess runs the same pipeline with ``--json``; it gets the database
URL and the policy's scratch server in its environment (DATABASE_URL, DBMIGRATE_SCRATCH_URL), never
on its command line, and the policy as options. What runs is what was planned, linted and approved:
the run is pinned to the plan's last revision and refuses a database no longer where the plan started.
Stopped (a cancel, the timeout), it gets SIGTERM and a grace period for its own cleanup.
What it cannot do without Prefect: an ``s3-bucket/BLOCK`` storage (give ``s3://BUCKET`` or a
directory) and the automatic rollback (a failed run reports where the database is; db-rollback).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
from dataclasses import dataclass

from prefect import get_run_logger, runtime
from prefect.artifacts import create_markdown_artifact

from dbmigrate import __version__
from dbmigrate.errors import ConfigError, ConfirmationRefused, MigrationFailed
from dbmigrate.lint import Excepted, Finding, LintBlocked, LintResult, RevisionLint, blocked_message
from dbmigrate.phases import Phase
from dbmigrate.settings import SCRATCH_VARIABLE
from dbmigrate.storage import S3_PREFIX
from flows.alerts import flow_run_url
from flows.artifacts import artifact_key
from flows.common import Environment, approval_in_ui
from flows.recovery import Journal

TIMEOUT_S = 24 * 3600  # the subprocess's own limits (guard wait, lock timeouts, approval) end it sooner
# A stopped subprocess's own cleanup (its scratch copy dropped, its report written) within this; well inside
# the 30 s a Prefect worker gives a cancelled flow-run process before it kills it.
GRACE_S = 20


@dataclass(frozen=True)
class ApplicationDbmigrate:
    """The application environment's ``dbmigrate`` executable, run for one environment."""

    executable: str
    env: Environment
    alembic_config: str | None = None

    def run(self, *args: str) -> dict:
        """``dbmigrate ARGS --json``: its JSON, else MigrationFailed with its error line; what it
        printed on stderr goes to the run log. Stopped (any exception here, a cancel's among them),
        it is sent SIGTERM and given GRACE_S to clean up before it is killed."""
        settings = self.env.settings
        options = ["--json", "--timeout", f"{settings.connect_timeout:g}"]
        if self.alembic_config:
            options += ["--alembic-config", self.alembic_config]
        if settings.storage_spec:
            options += ["--storage", settings.storage_spec]
        environ = {**os.environ, "DATABASE_URL": self.env.target.sqlalchemy_url(),
                   "DBMIGRATE_ENVIRONMENT": self.env.target.environment,
                   "DBMIGRATE_RUN_URL": flow_run_url(runtime.flow_run.id)}  # the report's link to this run
        environ.pop(SCRATCH_VARIABLE, None)  # the settings resolved it: the policy's block, else the worker's variable
        if settings.scratch_server is not None:
            environ[SCRATCH_VARIABLE] = settings.scratch_server.sqlalchemy_url()
        try:
            child = subprocess.Popen([self.executable, *args, *options], env=environ, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        except OSError as exc:
            raise ConfigError(f"cannot run the application's dbmigrate {self.executable!r}: {exc.strerror}") from None
        try:
            stdout, stderr = child.communicate(timeout=TIMEOUT_S)
        except BaseException:
            self._log(_stopped(child))
            raise
        lines = self._log(stderr)
        try:
            return json.loads(stdout)
        except json.JSONDecodeError:
            errors = [line for line in lines if line.startswith("dbmigrate: error: ")]
            raise MigrationFailed(f"the application's dbmigrate {args[0]} exited {child.returncode}: "
                                  + (errors[-1].removeprefix("dbmigrate: error: ") if errors
                                     else "no JSON and no error line (see the run log)")) from None

    def _log(self, stderr: str) -> list[str]:
        """The subprocess's stderr into the run log, neither password in it."""
        scratch = self.env.settings.scratch_server
        lines = [self.env.target.redact(scratch.redact(line) if scratch else line) for line in stderr.splitlines()]
        logger = get_run_logger()
        for line in lines:
            logger.info("%s", line)
        return lines


def _stopped(child: subprocess.Popen) -> str:
    """SIGTERM (its own handler drops its scratch copies and writes its report), GRACE_S, then SIGKILL; its stderr."""
    child.send_signal(signal.SIGTERM)
    try:
        return child.communicate(timeout=GRACE_S)[1] or ""
    except subprocess.TimeoutExpired:
        child.kill()
        return child.communicate()[1] or ""
    except BaseException:  # this process is being stopped harder: the child must not outlive it
        child.kill()
        raise


def migrate(env: Environment, journal: Journal, executable: str, alembic_config: str | None, target_revision: str,
            backup: bool, dry_run: bool, skip_health_checks: bool, skip_validation: bool, requested_by: str) -> dict:
    """The db-migrate run, the migration in a subprocess: its report (as a dict), or MigrationFailed.
    ``journal``: the run's in-flight journal, kept current for whoever outlives the run."""
    if (env.settings.storage_spec or "").startswith(S3_PREFIX):
        raise ConfigError(f"the application's dbmigrate has no Prefect for the storage {env.settings.storage_spec}: "
                          "give backup_storage as s3://BUCKET[/FOLDER] (AWS_* on the worker) or a directory")
    app = ApplicationDbmigrate(executable, env, alembic_config)
    checks = [*(["--skip-health-checks"] if skip_health_checks else []),
              *(["--skip-validation"] if skip_validation else [])]
    plan = app.run("upgrade", "-r", target_revision, "--approver", requested_by, *checks,
                   *_policy_options(env, backup, dry_run=True))
    if dry_run or plan.get("error") or not plan["migrations_planned"]:
        report = plan  # the dry run, a failure to plan, or nothing to do: its report is the run's
    else:
        # What runs is what was planned: up to its last revision, from where it started (checked under the guard).
        last, before = plan["migrations_planned"][-1]["revision"], plan["revision_before"]
        pinned = ["-r", target_revision if target_revision == "heads" else last,
                  "--expect-current", before or "base"]
        journal.phase(Phase.PLANNED, revision_before=before, target=last, upgrade=True)
        _lint(app, pinned[:2])
        approver = _approver(app, plan, requested_by)
        journal.phase(Phase.APPLICATION)
        report = app.run("upgrade", *pinned, "--approver", approver, *checks, *_policy_options(env, backup, False))
    create_markdown_artifact(f"## db-migrate {env.name}: report\n\nWritten by the application's dbmigrate "
                             f"(`{executable}`).\n\n```json\n{json.dumps(report, indent=2)}\n```\n",
                             key=artifact_key(env.name, kind="report"), description=f"db-migrate {env.name}: the JSON report")
    if report.get("error"):
        raise MigrationFailed(f"{report['error']['phase']} failed: {report['error']['message']}")
    return report


def _policy_options(env: Environment, backup: bool, dry_run: bool) -> list[str]:
    policy, retries = env.policy, env.settings.lock_retries
    options = ["--guard-wait", f"{policy.guard_wait_s:g}", "--lock-timeout", f"{policy.lock_timeout_s:g}",
               "--statement-timeout", f"{policy.statement_timeout_s:g}"]
    if dry_run:
        return [*options, "--dry-run"]
    if retries.enabled:
        options += ["--lock-retries", ",".join(f"{t:g}" for t in retries.timeouts_s),
                    "--lock-retry-pause", f"{retries.pause_s:g}", "--lock-retry-total", f"{retries.total_s:g}"]
    if policy.lint_blocking_level:  # its own lint blocks too: on what it runs
        options += ["--lint-level", policy.lint_blocking_level]
    return options + (["--backup"] if backup else []) + (["--rehearse"] if policy.rehearse else [])


def _lint(app: ApplicationDbmigrate, revision: list[str]) -> None:
    """The policy's lint before the approval: the application's ``dbmigrate lint``, blocking here at the
    policy's level (what its run then lints blocks there too, at the same level)."""
    level = app.env.policy.lint_blocking_level
    if level is None:
        return
    found = app.run("lint", *revision)
    try:
        result = LintResult(found["pg_version"], [
            RevisionLint(r["revision"], r["message"], [_known(Finding, f) for f in r["findings"]],
                         [_known(Excepted, e) for e in r["excepted"]], r["not_linted"]) for r in found["revisions"]],
            tuple(found["rules_off"]), level, found.get("duration_s"))
    except (KeyError, TypeError):
        raise ConfigError(f"the application's dbmigrate ({app.executable}) wrote a lint this worker's dbmigrate "
                          f"{__version__} cannot read: install the same version of dbmigrate in both") from None
    if result.blocking():
        raise LintBlocked(blocked_message(result, app.env.target.environment))


def _known(kind: type, data: dict):
    """``kind(**data)`` without the fields another version of dbmigrate added."""
    return kind(**{f.name: data[f.name] for f in dataclasses.fields(kind) if f.name in data})


def _approver(app: ApplicationDbmigrate, plan: dict, requested_by: str) -> str:
    """Who approves: the policy's approval in the UI, on the plan of the dry run; else who asked for the run."""
    if not app.env.policy.approval_required:
        return requested_by

    def describe(plan: dict) -> tuple[str, str]:
        steps = "".join(f"- `{step['revision']}` {step['message']}\n" for step in plan["migrations_planned"])
        last = plan["migrations_planned"][-1]["revision"]
        change = f"{plan['revision_before'] or 'base'} → {last} in {app.env.target.environment}"
        return change, f"### {change}\n\n{steps}\n```sql\n{plan['sql']}\n```\n"

    answer = approval_in_ui(app.env, requested_by, describe)(plan)
    if not answer.approved:
        raise ConfirmationRefused(f"rejected by {answer.approver}: nothing was changed")
    return answer.approver
