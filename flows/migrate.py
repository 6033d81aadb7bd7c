"""The db-migrate flow: what operators run from the Prefect UI, a schedule or GitHub Actions.

The pipeline's phases (health checks, plan, backup, migrate, validate) run as
Prefect tasks through :class:`dbmigrate.pipeline.Hooks`; the flow only adds what
Prefect is for: the environment's policy and approval in the UI (:mod:`flows.common`),
the automatic rollback where the policy allows it, one run per environment
(:mod:`flows.concurrency`), and artifacts (:mod:`flows.artifacts`) so the flow-run
history is the audit trail.
"""

from __future__ import annotations

import getpass

from prefect import flow, get_run_logger, runtime

from dbmigrate import auto_rollback, pipeline, revisions
from dbmigrate.errors import MigrationFailed
from flows import alerts, app_env, recovery
from flows.artifacts import BackupProgress, publish
from flows.common import alert_failure, approval_in_ui, ends_failed_on_error, open_environment, phase_runner, who_asked


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
    dbmigrate_executable: str | None = None,
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
        requested_by: Who asked for this run (the report's requested_by); default the run's creator in Prefect.
        dbmigrate_executable: The application environment's own dbmigrate (installed there without Prefect), for an
            application whose pins conflict with Prefect's: the migration runs as that subprocess (flows/app_env.py).
    """
    logger = get_run_logger()
    env = open_environment(environment, credentials_block, alembic_config, backup_storage)
    requester = who_asked(requested_by)
    if not dry_run:
        env.policy.check(backup)
        env.policy.check_requester(requester)
    if dbmigrate_executable:  # no automatic rollback there: the journal has nothing to undo
        with recovery.holding(env) as journal:
            return app_env.migrate(env, journal, dbmigrate_executable, alembic_config, target_revision, backup,
                                   dry_run, skip_health_checks, skip_validation, requester or getpass.getuser())
    request = pipeline.Request(
        operation="upgrade", revision=target_revision, dry_run=dry_run, backup=backup,
        skip_health_checks=skip_health_checks, skip_validation=skip_validation,
        lint_blocking_level=env.policy.lint_blocking_level,
        rehearse=env.policy.rehearse,
        run_url=alerts.flow_run_url(runtime.flow_run.id) or None,
        requested_by=requester or "unknown",
    )
    progress = BackupProgress(environment)
    hooks = pipeline.Hooks(
        confirm=approval_in_ui(env, requester),
        on_progress=progress,
        run_phase=phase_runner(env.policy),
        # the automatic rollback, run as the task "rollback"
        auto_rollback=auto_rollback.restore_starting_state if env.policy.auto_rollback else None,
    )
    logger.info("%s %s: %s to %s", environment, env.target.where, "dry run" if dry_run else "upgrade", target_revision)
    with recovery.holding(env, env.settings if env.policy.auto_rollback else None) as journal:
        hooks.run_phase, hooks.interrupted = journal.tracking(hooks.run_phase), journal.interrupted
        outcome = pipeline.execute(env.target, env.settings, request, hooks)
        # Still in flight: a run cut short while publishing says in its final state where the database is.
        publish(outcome, environment, progress)
    report = outcome.report
    if outcome.error is not None:
        raise MigrationFailed(alert_failure(outcome, environment))
    logger.info("%s: %s -> %s (%s)", report.status, revisions.shown(report.revision_before),
                revisions.shown(report.revision_after), outcome.report_path)
    return report.as_dict()
