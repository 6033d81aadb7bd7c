"""The db-migrate flow: what operators run from the Prefect UI, a schedule or GitHub Actions.

The pipeline's phases (health checks, plan, backup, migrate, validate) run as
Prefect tasks through :class:`dbmigrate.pipeline.Hooks`; this module only adds
what Prefect is for: the environment's policy, approval in the UI, automatic
rollback, a concurrency limit per environment, and artifacts so the flow-run
history is the audit trail.
"""

from __future__ import annotations

import functools
import logging

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.exceptions import FailedRun, FlowPauseTimeout
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput
from prefect.states import Failed
from pydantic import Field

from blocks import load_policy, load_target
from dbmigrate import auto_rollback, migrate, phases, pipeline, revisions
from dbmigrate.errors import (
    ConfigError,
    ConfirmationRefused,
    ConnectionFailed,
    DbMigrateError,
    MigrationFailed,
    StorageFailed,
)
from dbmigrate.migrate import SessionLimits
from dbmigrate.policy import Policy
from dbmigrate.report import Approval
from dbmigrate.settings import Settings
from dbmigrate.target import DatabaseTarget
from flows import audit, recovery

# Phases that only connect or upload: safe to retry. The migration itself never is.
TRANSIENT_PHASES = ("health_checks", "backup")
# Steps that run in the flow itself, not as tasks: the approval pauses the flow run, the
# guard is held for the rest of the run, and loading the project only reads files.
IN_FLOW_PHASES = ("load", "approval", "guard")


class ApprovalForm(RunInput):
    approve: bool = Field(default=False, description="Go ahead with the change described above, now?")
    approver: str = Field(default="", description="Your name. It is recorded in the audit report.")
    comment: str = Field(default="", description="Optional: ticket, reason, change window.")


def _transient(task_, task_run, state) -> bool:
    return isinstance(state.result(raise_on_failure=False), (ConnectionFailed, StorageFailed))


def _expected_failures_in_one_line(record: logging.LogRecord) -> bool:
    """A log filter: an expected failure (a DbMigrateError) is logged as its one line, without
    a traceback (Prefect logs a failed task's exception with one). Where a worker runs a flow
    (``python -m prefect.engine``) the engine raises the run's final Failed state again as
    FailedRun and logs it as an "unexpected exception": that only repeats the state and message
    already recorded, so it is dropped. An exception a flow or task raised that is not a
    DbMigrateError, a bug, keeps its traceback."""
    exc = record.exc_info[1] if record.exc_info else None
    if isinstance(exc, FailedRun):
        return False
    if isinstance(exc, DbMigrateError):
        record.exc_info = record.exc_text = None
    return True


def ends_failed_on_error(body):
    """Expected failures end the flow run Failed with exactly their one-line message:
    what an operator reads in the run history, without a traceback to dig through."""
    for logger in ("prefect.flow_runs", "prefect.task_runs"):
        logging.getLogger(logger).addFilter(_expected_failures_in_one_line)  # once: a logger's filters are a set

    @functools.wraps(body)
    def run(*args, **kwargs):
        try:
            return body(*args, **kwargs)
        except DbMigrateError as exc:
            get_run_logger().error(str(exc))
            return Failed(message=str(exc))

    return run


def phase_runner(rules: Policy):
    """Run each pipeline phase as a Prefect task named after it (but those IN_FLOW_PHASES)."""

    def run_phase(name: str, fn, *args):
        if name in IN_FLOW_PHASES:
            return fn(*args)
        options = {"name": name, "cache_policy": NO_CACHE, "persist_result": False}
        if name in TRANSIENT_PHASES:
            options.update(retries=rules.transient_retries, retry_delay_seconds=rules.retry_delay_s,
                           retry_condition_fn=_transient)
        return task(fn, **options)(*args)

    return run_phase


def ask_in_ui(rules: Policy, requested_by: str, describe) -> Approval:
    """Where the policy asks for it, pause the run until someone approves or rejects
    in the Prefect UI; ``describe()`` is the markdown the approver reads."""
    if not rules.approval_required:
        return Approval(True, requested_by, "policy")
    form = ApprovalForm.with_initial_data(description=describe())
    try:
        answer = pause_flow_run(wait_for_input=form, timeout=int(rules.approval_timeout_s),
                                poll_interval=rules.approval_poll_s)
    except FlowPauseTimeout:
        audit.take_back_expired_pause()
        raise ConfirmationRefused(f"nobody approved within {rules.approval_timeout_s:g}s: nothing was changed") from None
    approver = answer.approver.strip()
    if answer.approve and not approver:
        return Approval(False, "unknown", "prefect-ui", "approved without a name: refused")
    return Approval(answer.approve, approver or "unknown", "prefect-ui", answer.comment)


def approval_in_ui(rules: Policy, settings: Settings, target, requested_by: str):
    """The pipeline's confirm hook: the approver sees the pending revisions and their SQL."""

    def describe_plan(plan: phases.Plan) -> str:
        sql = migrate.render_sql(settings.project(target), plan.current, plan.target, upgrade=plan.upgrade)
        return audit.approval_request(target, plan, sql)

    return lambda plan: ask_in_ui(rules, requested_by, lambda: describe_plan(plan))


def database_for(environment: str, credentials_block: str | None) -> DatabaseTarget:
    """The database a run of this environment's deployment changes. The policy, tags, artifacts
    and concurrency limit follow the environment the credentials block records, so a block
    of another environment is refused before anything is touched."""
    name = credentials_block or environment
    target = load_target(name)
    for claimed in (audit.deployed_environment() or environment, environment):
        if target.environment != claimed:
            raise ConfigError(f"deployment for {claimed} refuses the {target.environment} database (block '{name}')")
    return target


def settings_for(rules: Policy, alembic_config: str | None, backup_storage: str | None) -> Settings:
    return Settings.from_env(
        alembic_config=alembic_config,
        guard_wait_s=rules.guard_wait_s,
        limits=SessionLimits(rules.lock_timeout_s, rules.statement_timeout_s),
        storage_spec=backup_storage,
        project_logging=False,  # the flow-run log is the audit trail: env.py must not shut it down
    )


@flow(name="db-migrate", flow_run_name="{environment}-{target_revision}",
      on_crashed=[recovery.on_interrupted], on_cancellation=[recovery.on_interrupted])
@ends_failed_on_error
def db_migrate(
    environment: str,
    target_revision: str = "head",
    backup: bool = True,
    dry_run: bool = False,
    skip_health_checks: bool = False,
    skip_validation: bool = False,
    credentials_block: str | None = None,
    backup_storage: str | None = None,
    alembic_config: str | None = None,
    requested_by: str = "",
) -> dict:
    """Migrate one environment's database safely: health checks, backup, approval,
    migrate, validate, report; roll back automatically where the policy allows.

    Args:
        environment: development, staging or production: the deployment's. Picks the policy and, by default, the
            credentials block; a block recording another environment is refused.
        target_revision: Alembic revision to migrate to; 'head' for the latest.
        backup: Back the database up first. Production refuses false.
        dry_run: Only show the SQL of the pending revisions; change nothing.
        skip_health_checks: Skip the pre-flight checks (not recommended).
        skip_validation: Skip the post-migration checks (not recommended).
        credentials_block: Name of the DatabaseCredentials block; default the environment name. Never the password.
        backup_storage: Where backups go: s3-bucket/BLOCK or a directory; default DBMIGRATE_BACKUP_STORAGE.
        alembic_config: Path of alembic.ini; default ALEMBIC_CONFIG or ./alembic.ini.
        requested_by: Who asked for this run (recorded in the report); default the worker's user.
    """
    logger = get_run_logger()
    target = database_for(environment, credentials_block)
    rules = load_policy(target.environment)
    if not dry_run:
        rules.check(backup)
    audit.tag_run(environment)
    settings = settings_for(rules, alembic_config, backup_storage)
    request = pipeline.Request(
        operation="upgrade", revision=target_revision, dry_run=dry_run, backup=backup,
        skip_health_checks=skip_health_checks, skip_validation=skip_validation,
        **({"operator": requested_by} if requested_by else {}),
    )
    progress = audit.BackupProgress(environment)
    hooks = pipeline.Hooks(
        confirm=approval_in_ui(rules, settings, target, request.operator),
        on_progress=progress,
        run_phase=phase_runner(rules),
        auto_rollback=auto_rollback.restore_starting_state if rules.auto_rollback else None,  # the task "rollback"
    )
    logger.info("%s %s: %s to %s", environment, target.where, "dry run" if dry_run else "upgrade", target_revision)
    with (audit.one_run_per_environment(environment, rules.guard_wait_s),
          recovery.in_flight(environment, target, credentials_block or environment,
                             settings if rules.auto_rollback else None) as journal):
        hooks.run_phase = journal.tracking(hooks.run_phase)
        outcome = pipeline.execute(target, settings, request, hooks)
    audit.publish(outcome, environment, progress)
    report = outcome.report
    if outcome.error is not None:
        rolled = f"; rollback: {report.rollback.detail}" if report.rollback else ""
        raise MigrationFailed(f"{report.error.phase} failed: {report.error.message}{rolled}")
    logger.info("%s: %s -> %s (%s)", report.status, revisions.shown(report.revision_before),
                revisions.shown(report.revision_after), outcome.report_path)
    return report.as_dict()
