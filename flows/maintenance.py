"""Scheduled flows: db-health (checks and drift) and db-backup (backup and pruning)."""

from __future__ import annotations

from dataclasses import asdict

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from dbmigrate import backup, catalogue, drift, health
from dbmigrate.backup import DumpOptions
from dbmigrate.errors import HealthFailed
from dbmigrate.phases import Phase
from dbmigrate.report import BackupSummary
from flows import alerts
from flows.artifacts import BackupProgress, artifact_key, backup_line
from flows.common import ends_failed_on_error, open_environment, phase_runner


def checks_of_a_reachable_database(target, project, settings) -> list[health.Check]:
    """The health checks (abandoned scratch databases on the scratch server too); an unreachable
    database raises its error (ConnectionFailed), which the task retries, rather than a failed check
    nobody retries."""
    checks = health.run(target, project, settings.backup_dir, settings.connect_timeout,
                        scratch_server=settings.scratch_server)
    if checks[0].refusal:
        raise checks[0].refusal
    return checks


def health_markdown(environment: str, checks: list[health.Check]) -> str:
    """The checks as a table, then every finding of a check that has some (drift), one line each."""
    table = "\n".join(f"| {c.name} | {c.status} | {c.detail} |" for c in checks)
    findings = "".join(f"\n\n### {c.name}: {len(c.data['findings'])} finding(s)\n\n"
                       + "\n".join(f"- {line}" for line in c.data["findings"])
                       for c in checks if c.data.get("findings"))
    return f"## db-health {environment}\n\n| check | status | detail |\n|---|---|---|\n{table}{findings}"


@flow(name="db-health", flow_run_name="{environment}-health")
@ends_failed_on_error
def db_health(environment: str, credentials_block: str | None = None, alembic_config: str | None = None,
              check_drift: bool = True) -> list[dict]:
    """Health checks, plus drift: is the database at head, and does its schema match the migrations?

    Args:
        environment: development, staging or production.
        credentials_block: Name of the DatabaseCredentials block; default the environment name.
        alembic_config: Path of alembic.ini; default ALEMBIC_CONFIG or ./alembic.ini.
        check_drift: Replay the migrations into a scratch database and compare schemas.
    """
    env = open_environment(environment, credentials_block, alembic_config)
    run = phase_runner(env.policy)
    project = env.settings.project(env.target)
    checks = run(Phase.HEALTH_CHECKS, checks_of_a_reachable_database, env.target, project, env.settings)
    if health.passed(checks):
        pending = next((c for c in checks if c.name == "pending_revisions"), None)
        if pending is not None and pending.data.get("pending"):
            pending.status = health.WARN  # not at head: worth a look, not an outage
        if check_drift:
            checks.append(run(Phase.DRIFT, drift.check, env.target, env.settings))
            alerts.drift_found(environment, checks)
    create_markdown_artifact(health_markdown(environment, checks), key=artifact_key(environment, kind="health"))
    failed = [c for c in checks if c.status == health.FAIL]
    if failed:
        raise HealthFailed("health failed: " + "; ".join(f"{c.name}: {c.detail}" for c in failed))
    get_run_logger().info("%s healthy: %s", environment, ", ".join(f"{c.name} {c.status}" for c in checks))
    return [c.as_dict() for c in checks]


@flow(name="db-backup", flow_run_name="{environment}-backup")
@ends_failed_on_error
def db_backup(environment: str, credentials_block: str | None = None, backup_storage: str | None = None,
              verify_restore: bool = True, keep_last: int | None = None, keep_days: float | None = None) -> dict:
    """Back the database up (verified), then optionally prune old backups.

    Args:
        environment: development, staging or production.
        credentials_block: Name of the DatabaseCredentials block; default the environment name.
        backup_storage: s3-bucket/BLOCK or a directory; default DBMIGRATE_BACKUP_STORAGE.
        verify_restore: Restore into a scratch database and compare row counts before calling it verified.
        keep_last: Then delete all but the newest N backups (the newest verified one always stays).
        keep_days: With keep_last, delete only backups older than this many days.
    """
    env = open_environment(environment, credentials_block, backup_storage=backup_storage)
    storage = env.settings.storage()
    progress = BackupProgress(environment)
    manifest = phase_runner(env.policy)(Phase.BACKUP, backup.take, env.target, storage,
                                        DumpOptions(verify_restore=verify_restore), progress,
                                        env.settings.connect_timeout, env.settings.scratch_server)
    progress.done()
    pruned = catalogue.prune(storage, env.target, keep_last, keep_days) if keep_last is not None else []
    create_markdown_artifact(
        f"## db-backup {environment}\n\nBackup {backup_line(BackupSummary.of(manifest))}; "
        f"sha256 `{manifest.sha256}`.\n\nPruned: {', '.join(m.id for m in pruned) or 'nothing'}.",
        key=artifact_key(environment, kind="backup-summary"),
    )
    return asdict(BackupSummary.of(manifest))
