"""The db-rollback flow, which an operator runs: back to a revision (a downgrade through
the pipeline) or to a backup (restored over the database), with a dry run that shows what
would change and a backup of the current state first. Not the automatic rollback inside a
failed db-migrate run (:mod:`dbmigrate.auto_rollback`)."""

from __future__ import annotations

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from dbmigrate import pipeline, revisions
from dbmigrate.errors import ConfigError, MigrationFailed
from dbmigrate.restore import RestorePlan
from dbmigrate.run import DOWNGRADE, RESTORE
from flows import alerts, recovery
from flows.artifacts import artifact_key, how_to_approve, publish
from flows.common import (
    Environment,
    alert_failure,
    approval_in_ui,
    ends_failed_on_error,
    open_environment,
    phase_runner,
    who_asked,
)


FLOW = "db-rollback"


@flow(name=FLOW, flow_run_name="{environment}-rollback",
      on_crashed=[recovery.on_interrupted], on_cancellation=[recovery.on_interrupted])
@ends_failed_on_error
def db_rollback(
    environment: str,
    to_revision: str | None = None,
    backup_id: str | None = None,
    dry_run: bool = True,
    credentials_block: str | None = None,
    backup_storage: str | None = None,
    alembic_config: str | None = None,
    requested_by: str = "",
) -> dict:
    """Roll a database back to a revision or to a backup. Dry run by default.

    Args:
        environment: development, staging or production.
        to_revision: Downgrade to this revision ('base', '-1', or an id). Give this or backup_id.
        backup_id: Restore this backup (see 'dbmigrate backups list') over the database.
        dry_run: Only show what would change (true by default: set false to act).
        credentials_block: Name of the DatabaseCredentials block; default the environment name.
        backup_storage: s3-bucket/BLOCK or a directory; default DBMIGRATE_BACKUP_STORAGE.
        alembic_config: Path of alembic.ini; default ALEMBIC_CONFIG or ./alembic.ini.
        requested_by: Who asked for this run (the report's requested_by); default the run's creator in Prefect.
    """
    if bool(to_revision) == bool(backup_id):
        raise ConfigError("give exactly one of to_revision and backup_id")
    env = open_environment(environment, credentials_block, alembic_config, backup_storage)
    requester = who_asked(requested_by)
    if not dry_run:
        env.policy.check_requester(requester)
    # No settings for the journal: a db-rollback killed mid-downgrade is left to the operator, not rolled back.
    with recovery.holding(env) as journal:
        if to_revision:
            return _downgrade(env, to_revision, dry_run, requester, journal)
        return _restore(env, backup_id, dry_run, requester, journal)


def _downgrade(env: Environment, revision: str, dry_run: bool, requested_by: str | None,
               journal: recovery.Journal) -> dict:
    """The Alembic downgrade to ``revision``, through the pipeline like an upgrade (health checks,
    backup, approval, validate); a dry run only shows its SQL."""
    request = pipeline.Request(DOWNGRADE, revision, dry_run=dry_run, backup=True,
                               requested_by=requested_by or "unknown")
    hooks = pipeline.Hooks(confirm=approval_in_ui(env, requested_by),
                           run_phase=journal.tracking(phase_runner(env.policy)), interrupted=journal.interrupted)
    outcome = pipeline.execute(env.target, env.settings, request, hooks)
    publish(outcome, env.name, flow=FLOW)
    if outcome.error is not None:
        raise MigrationFailed(alert_failure(outcome, env.name))
    if not dry_run:
        alerts.rolled_back(env.name, outcome.report, f"downgrade to {revision}")
    if outcome.sql is not None:
        create_markdown_artifact(f"## db-rollback {env.name}: dry run\n\n```sql\n{outcome.sql}\n```",
                                 key=artifact_key(env.name, FLOW, "sql"))
    return outcome.report.as_dict()


def _restore(env: Environment, backup_id: str, dry_run: bool, requested_by: str | None,
             journal: recovery.Journal) -> dict:
    """Restore a backup over the database through the pipeline (:func:`dbmigrate.pipeline.restore`),
    after a backup of its current state; like every schema-changing path it leaves a JSON report
    and a summary artifact, refused, failed or done."""
    request = pipeline.Request(RESTORE, backup_id, dry_run=dry_run, backup=True, requested_by=requested_by or "unknown")

    def describe(plan: RestorePlan) -> tuple[str, str]:
        return (f"the restore of backup {plan.manifest.id} over {env.name}",
                "\n".join([*_restore_lines(env.name, plan, dry_run), "", how_to_approve(
                    "replace the database with this backup (a backup of its current state is taken first)")]))

    hooks = pipeline.Hooks(confirm=approval_in_ui(env, requested_by, describe), run_phase=journal.tracking(phase_runner(env.policy)),
                           interrupted=journal.interrupted)
    outcome = pipeline.restore(env.target, env.settings, request, hooks)
    publish(outcome, env.name, flow=FLOW)
    report = outcome.report
    if outcome.error is not None:
        alert_failure(outcome, env.name)
        raise outcome.error
    lines = _restore_lines(env.name, outcome.plan, dry_run)
    if not dry_run:
        lines += ["", f"Approved by {report.approval.approver} ({report.approval.via}).", "",
                  f"Restored. Safety backup of the previous state: `{report.restore.safety_backup}`."]
        alerts.rolled_back(env.name, report, f"restore of backup {report.restore.backup_id}")
    create_markdown_artifact("\n".join(lines), key=artifact_key(env.name, FLOW, "restore"))
    data = report.as_dict()
    return {**data["restore"], "dry_run": dry_run, "approval": data["approval"], "report": data}


def _restore_lines(environment: str, plan: RestorePlan, dry_run: bool) -> list[str]:
    """The restore's markdown: the revision it goes to, and the tables whose rows it changes."""
    manifest, now = plan.manifest, plan.row_counts_now
    return [f"## db-rollback {environment}: {'dry run' if dry_run else 'restore'} of backup `{manifest.id}`", "",
            f"Revision `{revisions.shown(revisions.label(plan.revisions_now))}` → "
            f"`{revisions.shown(manifest.revision)}`.", "",
            "| table | rows now | rows in the backup |", "|---|---|---|",
            *(f"| {t} | {now.get(t, '-')} | {manifest.row_counts.get(t, '-')} |" for t in plan.tables_changing)]
