"""The db-rollback flow: back to a revision (a downgrade through the pipeline) or to a
backup (restored over the database), with a dry run that shows what would change
and a backup of the current state first."""

from __future__ import annotations

from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.concurrency.sync import concurrency

from dbmigrate import backup, db, fingerprint, guard, pipeline, restore
from dbmigrate.environments import load_credentials
from dbmigrate.errors import ConfigError, MigrationFailed
from flows import audit
from flows.migrate import approval_in_ui, phase_runner, settings_for


@flow(name="db-rollback", flow_run_name="{environment}-rollback")
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
        requested_by: Who asked for this run (recorded in the report).
    """
    if bool(to_revision) == bool(backup_id):
        raise ConfigError("give exactly one of to_revision and backup_id")
    audit.tag_run(environment)
    rules = audit.policy_for(environment)
    target = load_credentials(credentials_block or environment)
    settings = settings_for(rules, alembic_config, backup_storage)
    limit = audit.ensure_concurrency_limit(environment)
    with concurrency(limit, occupy=1, timeout_seconds=max(rules.guard_wait_s, 1), strict=True):
        if to_revision:
            return _downgrade(target, settings, rules, environment, to_revision, dry_run, requested_by)
        return _restore(target, settings, environment, backup_id, dry_run)


def _downgrade(target, settings, rules, environment, revision, dry_run, requested_by) -> dict:
    request = pipeline.Request("downgrade", revision, dry_run=dry_run, backup=True,
                               **({"operator": requested_by} if requested_by else {}))
    hooks = pipeline.Hooks(confirm=approval_in_ui(rules, settings, target, request.operator),
                           run_phase=phase_runner(rules))
    outcome = pipeline.execute(target, settings, request, hooks)
    audit.publish(outcome, environment)
    if outcome.error is not None:
        raise MigrationFailed(f"{outcome.report.error['phase']} failed: {outcome.report.error['message']}")
    if outcome.sql is not None:
        create_markdown_artifact(f"## db-rollback {environment}: dry run\n\n```sql\n{outcome.sql}\n```",
                                 key=f"{audit.artifact_key(environment)}-rollback")
    return outcome.report.as_dict()


def _restore(target, settings, environment, backup_id, dry_run) -> dict:
    storage = settings.storage()
    manifest = backup.find(storage, target, backup_id)
    with db.connect(target, settings.connect_timeout) as conn:
        now = fingerprint.take(conn)
    changes = sorted(t for t in set(now.row_counts) | set(manifest.row_counts)
                     if now.row_counts.get(t) != manifest.row_counts.get(t))
    lines = [f"## db-rollback {environment}: {'dry run' if dry_run else 'restore'} of backup `{manifest.id}`", "",
             f"Revision `{','.join(now.revisions) or 'base'}` → `{manifest.revision or 'base'}`.", "",
             "| table | rows now | rows in the backup |", "|---|---|---|"]
    lines += [f"| {t} | {now.row_counts.get(t, '-')} | {manifest.row_counts.get(t, '-')} |" for t in changes]
    result = {"backup_id": manifest.id, "dry_run": dry_run, "tables_changing": changes}
    if not dry_run:
        def safety() -> backup.Manifest:
            return backup.take(target, storage, ",".join(now.revisions) or None,
                               timeout=settings.connect_timeout)

        with guard.hold(target, "restore", settings.guard_wait_s, settings.connect_timeout):
            restored = restore.over_original(target, storage, manifest, settings.connect_timeout, safety)
        result["safety_backup"] = restored.safety_backup.id
        lines += ["", f"Restored. Safety backup of the previous state: `{restored.safety_backup.id}`."]
    create_markdown_artifact("\n".join(lines), key=f"{audit.artifact_key(environment)}-rollback")
    return result
