"""The automatic rollback: put a database back where a failed run found it, and prove it.

Run by the pipeline (its ``auto_rollback`` hook, the step "rollback") when migrate or
validate fails, still holding the guard. Not to be confused with db-rollback, the
operator's flow (flows/db_rollback.py), nor with a downgrade, the Alembic operation this
module tries first.

First choice: downgrade to the starting revision. If that is impossible or fails,
restore the pre-migration backup over the database. Either way, the result is
checked against the fingerprint taken before the migration.
"""

from __future__ import annotations

from dbmigrate import db, fingerprint, phases, restore, revisions
from dbmigrate.catalogue import Manifest
from dbmigrate.fingerprint import Fingerprint
from dbmigrate.report import AutoRollbackResult
from dbmigrate.revisions import Project, label, shown
from dbmigrate.settings import Settings
from dbmigrate.storage import Storage
from dbmigrate.target import DatabaseTarget


def _state(target: DatabaseTarget, timeout: float) -> Fingerprint:
    with db.connect(target, timeout) as conn:
        return fingerprint.take(conn)


def restore_starting_state(
    target: DatabaseTarget,
    project: Project,
    settings: Settings,
    before: Fingerprint,
    backup: Manifest | None,
    storage: Storage | None,
) -> AutoRollbackResult:
    """Downgrade to the revision in ``before``, else restore ``backup`` from ``storage``; the
    result says which, and whether the database now matches ``before``."""
    timeout = settings.connect_timeout
    now = _state(target, timeout)
    if now == before:  # the failed revision's transaction already undid everything
        return AutoRollbackResult(False, None, True, label(now.revisions),
                              "nothing to undo: the database is as the run found it")
    if several := project.several_rows_problem(before.revisions):
        return AutoRollbackResult(False, None, False, label(now.revisions),
                              f"not rolled back: the database started at several revisions ({several}); "
                              "nothing was downgraded")
    start = before.revisions[0] if before.revisions else "base"
    method, problem = "downgrade", ""
    try:
        downgrade_to(target, project, settings, start)
    except Exception as exc:  # a downgrade can fail like any migration: fall back to the backup
        problem = f"downgrade failed ({exc}); "
        if backup is None or storage is None:
            after = _state(target, timeout)
            return AutoRollbackResult(True, method, False, label(after.revisions),
                                  problem + "no backup to restore")
        method = "restore"
        try:
            restore.over_original(target, storage, backup, timeout, None, settings.limits.lock_timeout_s)
        except Exception as exc:
            after = _state(target, timeout)
            return AutoRollbackResult(True, method, False, label(after.revisions),
                                  problem + f"restoring backup {backup.id} failed ({exc})")
    after = _state(target, timeout)
    succeeded = after == before
    detail = problem + (
        "database back at the starting revision with the same schema and row counts" if succeeded
        else f"database differs from before the run: {_difference(before, after)}"
    )
    return AutoRollbackResult(True, method, succeeded, label(after.revisions), detail)


def downgrade_to(target: DatabaseTarget, project: Project, settings: Settings, start: str) -> str | None:
    """Downgrade the database from where it is to the revision ``start`` ("base": none); the revision
    it is at then. Several version rows are refused (RevisionError): the downgrade would plan from each.
    The automatic rollback's first choice, and what recovery does to a run killed between revisions
    (:mod:`dbmigrate.interruption`)."""
    with db.connect(target, settings.connect_timeout) as conn:
        now = revisions.current_revisions(conn)
    project.require_one_row(now)
    phases.apply(target, project, settings, phases.planned(project, now, start, upgrade=False))
    with db.connect(target, settings.connect_timeout) as conn:
        return revisions.current_label(conn)


def _difference(before: Fingerprint, after: Fingerprint) -> str:
    parts = []
    if before.revisions != after.revisions:
        parts.append(f"revision {shown(label(after.revisions))} instead of {shown(label(before.revisions))}")
    if before.schema_sha256 != after.schema_sha256:
        parts.append("schema differs")
    changed = fingerprint.tables_differing(before.row_counts, after.row_counts)
    if changed:
        parts.append(f"row counts differ in {', '.join(changed)}")
    return "; ".join(parts)
