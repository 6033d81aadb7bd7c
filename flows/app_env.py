"""db-migrate through the application environment's own ``dbmigrate`` (the deployment's
``dbmigrate_executable`` parameter): for an application whose pins conflict with Prefect's.

env.py imports the application, so the migration must run where the application is installed;
there the plain command line is installed without Prefect (``pip install dbmigrate``). The worker
keeps what Prefect is for: the blocks, the policy, approval in the UI, one run per environment,
the report artifact. The subprocess runs the same pipeline with ``--json``; it gets the database
URL in its environment (DATABASE_URL), never on its command line, and the policy as options.
What it cannot do without Prefect: an ``s3-bucket/BLOCK`` storage (give ``s3://BUCKET`` or a
directory) and the automatic rollback (a failed run reports where the database is; db-rollback).
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass

from prefect import get_run_logger, runtime
from prefect.artifacts import create_markdown_artifact

from dbmigrate.errors import ConfigError, ConfirmationRefused, MigrationFailed
from dbmigrate.lint import Excepted, Finding, LintBlocked, LintResult, RevisionLint, blocked_message
from dbmigrate.storage import S3_PREFIX
from flows.artifacts import report_key
from flows.common import Environment, ask_in_ui

TIMEOUT_S = 24 * 3600  # the subprocess's own limits (guard wait, lock timeouts, approval) end it sooner


@dataclass(frozen=True)
class ApplicationDbmigrate:
    """The application environment's ``dbmigrate`` executable, run for one environment."""

    executable: str
    env: Environment
    alembic_config: str | None = None

    def run(self, *args: str) -> dict:
        """``dbmigrate ARGS --json``: its JSON, else MigrationFailed with its error line; what it
        printed on stderr goes to the run log."""
        settings = self.env.settings
        options = ["--json", "--timeout", f"{settings.connect_timeout:g}"]
        if self.alembic_config:
            options += ["--alembic-config", self.alembic_config]
        if settings.storage_spec:
            options += ["--storage", settings.storage_spec]
        environ = {**os.environ, "DATABASE_URL": self.env.target.sqlalchemy_url(),
                   "DBMIGRATE_ENVIRONMENT": self.env.target.environment,
                   "DBMIGRATE_RUN_URL": runtime.flow_run.ui_url or ""}  # the report's link to this run
        try:
            done = subprocess.run([self.executable, *args, *options], env=environ, stdin=subprocess.DEVNULL,
                                  capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
        except OSError as exc:
            raise ConfigError(f"cannot run the application's dbmigrate {self.executable!r}: {exc.strerror}") from None
        stderr = [self.env.target.redact(line) for line in done.stderr.splitlines()]
        logger = get_run_logger()
        for line in stderr:
            logger.info("%s", line)
        try:
            return json.loads(done.stdout)
        except json.JSONDecodeError:
            errors = [line for line in stderr if line.startswith("dbmigrate: error: ")]
            raise MigrationFailed(f"the application's dbmigrate {args[0]} exited {done.returncode}: "
                                  + (errors[-1].removeprefix("dbmigrate: error: ") if errors
                                     else "no JSON and no error line (see the run log)")) from None


def migrate(env: Environment, executable: str, alembic_config: str | None, target_revision: str, backup: bool,
            dry_run: bool, skip_health_checks: bool, skip_validation: bool, requested_by: str) -> dict:
    """The db-migrate run, the migration in a subprocess: its report (as a dict), or MigrationFailed."""
    if (env.settings.storage_spec or "").startswith(S3_PREFIX):
        raise ConfigError(f"the application's dbmigrate has no Prefect for the storage {env.settings.storage_spec}: "
                          "give backup_storage as s3://BUCKET[/FOLDER] (AWS_* on the worker) or a directory")
    app = ApplicationDbmigrate(executable, env, alembic_config)
    revision = ["-r", target_revision]
    if not dry_run:
        _lint(app, revision)
    approver = requested_by if dry_run else _approver(app, revision, requested_by)
    report = app.run("upgrade", *revision, "--approver", approver, *_policy_options(env, backup, dry_run),
                     *(["--skip-health-checks"] if skip_health_checks else []),
                     *(["--skip-validation"] if skip_validation else []))
    create_markdown_artifact(f"## db-migrate {env.name}: report\n\nWritten by the application's dbmigrate "
                             f"(`{executable}`).\n\n```json\n{json.dumps(report, indent=2)}\n```\n",
                             key=report_key(env.name, "db-migrate"), description=f"db-migrate {env.name}: the JSON report")
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
    return options + (["--backup"] if backup else []) + (["--rehearse"] if policy.rehearse else [])


def _lint(app: ApplicationDbmigrate, revision: list[str]) -> None:
    """The policy's lint: the application's ``dbmigrate lint``, blocking here at the policy's level."""
    level = app.env.policy.lint_blocking_level
    if level is None:
        return
    found = app.run("lint", *revision)
    result = LintResult(found["pg_version"], [
        RevisionLint(r["revision"], r["message"], [Finding(**f) for f in r["findings"]],
                     [Excepted(**e) for e in r["excepted"]], r["not_linted"]) for r in found["revisions"]],
        tuple(found["rules_off"]), level)
    if result.blocking():
        raise LintBlocked(blocked_message(result, app.env.target.environment))


def _approver(app: ApplicationDbmigrate, revision: list[str], requested_by: str) -> str:
    """Who approves: the policy's approval in the UI, on the plan of a dry run; else who asked for the run."""
    if not app.env.policy.approval_required:
        return requested_by

    def describe() -> tuple[str, str]:
        plan = app.run("upgrade", *revision, "--approver", requested_by, "--dry-run")
        if plan.get("error"):
            raise MigrationFailed(f"the application's dbmigrate could not plan the run: {plan['error']['message']}")
        steps = "".join(f"- `{step['revision']}` {step['message']}\n" for step in plan["migrations_planned"])
        change = f"{plan['revision_before'] or 'base'} → {plan['target_revision']} in {app.env.target.environment}"
        return change, f"### {change}\n\n{steps}\n```sql\n{plan['sql']}\n```\n"

    answer = ask_in_ui(app.env.policy, requested_by, describe)
    if not answer.approved:
        raise ConfirmationRefused(f"rejected by {answer.approver}: nothing was changed")
    return answer.approver
