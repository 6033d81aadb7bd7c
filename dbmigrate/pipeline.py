"""The operations that change a database, or back it up to rehearse a change, each read top to
bottom through a :class:`~dbmigrate.run.Run` (which owns the report, the phase, the guard and how
the run ends), so that every one leaves the same report:

- :func:`execute`, an upgrade or downgrade: load -> health checks -> plan -> lint (upgrades) ->
  approval -> guard -> backup -> migrate -> validate -> report, and the automatic rollback when
  migrate or validate fails. A rehearsed run backs up and rehearses before the approval: load ->
  health checks -> plan -> lint -> backup -> rehearsal -> approval -> guard -> migrate -> validate.
- :func:`rehearse`: load -> plan -> backup -> rehearsal -> report; the database is only read.
- :func:`restore`: plan (the backup against the database) -> approval -> restore (under the guard,
  after a safety backup) -> report; or into a new database: plan -> restore -> report.

Every step goes through ``hooks.run_phase`` under its :class:`~dbmigrate.phases.Phase`: the command
line calls the step's function as it is, the Prefect flow runs it as a task named after the
phase (see :class:`~dbmigrate.run.Hooks`).
"""

from __future__ import annotations

from dataclasses import replace

from dbmigrate import db, fingerprint, health, phases, rehearsal, restore as restoring, revisions
from dbmigrate.errors import DatabaseMoved, ValidationFailed
from dbmigrate.fingerprint import Fingerprint
from dbmigrate.health import FAIL
from dbmigrate.phases import Phase
from dbmigrate.report import DRY_RUN, NOOP, SUCCEEDED, BackupSummary, RestoreSummary
from dbmigrate.run import Hooks, Outcome, Request, Run, Suspended
from dbmigrate.settings import Settings
from dbmigrate.target import DatabaseTarget

__all__ = ["Hooks", "Outcome", "Request", "Suspended", "execute", "rehearse", "restore"]


def execute(target: DatabaseTarget, settings: Settings, request: Request, hooks: Hooks | None = None) -> Outcome:
    """An upgrade or a downgrade, the whole run. Never raises for expected failures: the outcome
    carries the error, and the report is always written."""
    hooks = hooks or Hooks()
    run = Run(target, settings, request, hooks)
    report = run.report
    with run:
        project = run.project = run.step(Phase.LOAD, settings.project, target)
        if not request.skip_health_checks:
            report.health_checks = run.step(Phase.HEALTH_CHECKS, phases.preflight, target, project, settings,
                                            request.revision, request.upgrade,
                                            health.REHEARSAL if request.rehearse else None)
        plan = run.outcome.plan = run.step(Phase.PLAN, phases.plan, target, project, settings, request.revision,
                                           request.upgrade)
        report.revision_before = report.revision_after = plan.revision_before
        if request.expect_current is not None and (plan.revision_before or "base") != request.expect_current:
            raise DatabaseMoved(f"the database is at {revisions.shown(plan.revision_before)}, not at "
                                f"{request.expect_current} where the approved plan started: nothing was changed")
        report.migrations_planned = plan.steps
        if not plan.steps:
            report.finish(NOOP)
            return run.outcome
        if request.dry_run:
            run.outcome.sql = phases.render_sql(target, project, plan)
            report.finish(DRY_RUN)
            return run.outcome
        run.require_approver()
        if plan.upgrade:
            plan = run.step(Phase.LINT, run.lint, plan)
        if request.rehearse:  # before the approval, so that whoever approves sees how it went
            plan = _rehearsed(run, plan)
        run.step(Phase.APPROVAL, run.approve, plan)
        run.step(Phase.GUARD, run.hold_guard, plan)
        if request.backup and not request.rehearse:
            report.backup = BackupSummary.of(run.back_up())
        if hooks.auto_rollback:  # as late as possible: what the automatic rollback must return to
            run.before = _fingerprint(target, settings)
        applied = run.step(Phase.MIGRATE, phases.apply, target, project, settings, plan, run.ran.append)
        report.migrations_applied, report.lock_attempts = applied.steps, applied.attempts
        if not request.skip_validation:
            checks = report.validation = run.step(Phase.VALIDATE, phases.validate, target, project, settings,
                                                  set(plan.expected), plan.invalid_indexes)
            if not health.passed(checks):
                raise ValidationFailed(f"validation failed: {'; '.join(c.detail for c in checks if c.status == FAIL)}")
            run.validated_at = revisions.label(sorted(plan.expected))
        report.finish(SUCCEEDED)
    return run.outcome


def rehearse(target: DatabaseTarget, settings: Settings, request: Request, hooks: Hooks | None = None) -> Outcome:
    """The pending revisions up to ``request.revision`` rehearsed on a copy restored from a new
    backup (``dbmigrate rehearse``); the database is only read. The report has the backup and the
    rehearsal; a revision that failed on the copy fails the run (RehearsalFailed)."""
    run = Run(target, settings, request, replace(hooks or Hooks(), auto_rollback=None))
    report = run.report
    with run:
        project = run.project = run.step(Phase.LOAD, settings.project, target)
        plan = run.outcome.plan = run.step(Phase.PLAN, phases.plan, target, project, settings, request.revision,
                                           True)
        report.revision_before = report.revision_after = plan.revision_before
        report.migrations_planned = plan.steps
        if not plan.steps:
            report.finish(NOOP)
            return run.outcome
        run.step(Phase.HEALTH_CHECKS, health.require_scratch_server, health.REHEARSAL, target,
                 settings.scratch_server, settings.connect_timeout)
        _rehearsed(run, plan)
        report.finish(SUCCEEDED)
    return run.outcome


def _rehearsed(run: Run, plan: phases.Plan) -> phases.Plan:
    """Back up, then rehearse ``plan`` on a copy restored from that backup: the plan with how it went
    (for whoever approves it), or RehearsalFailed."""
    report = run.report
    report.backup = BackupSummary.of(run.back_up())
    report.rehearsal = run.step(Phase.REHEARSAL, rehearsal.rehearse, run.target, run.settings, plan, run.storage,
                                run.manifest)
    report.rehearsal.require()
    return replace(plan, rehearsal=report.rehearsal)


def restore(target: DatabaseTarget, settings: Settings, request: Request, hooks: Hooks | None = None) -> Outcome:
    """The backup ``request.revision`` restored over the database (approved, under the guard, after a
    safety backup where ``request.backup``), or into the new database ``request.new_database``,
    which changes nothing that exists. The report's ``restore`` says which backup, the tables whose
    rows change and the safety backup. ``request.dry_run``: only the plan."""
    run = Run(target, settings, request, replace(hooks or Hooks(), auto_rollback=None))
    report = run.report
    with run:
        storage = run.storage = run.step(Phase.LOAD, settings.storage)  # an S3 one has the report copied there too
        plan = run.outcome.plan = run.step(Phase.PLAN, restoring.plan, target, storage, request.revision,
                                           settings.connect_timeout, not request.new_database)
        manifest = plan.manifest
        report.target_revision = manifest.revision or "base"
        report.revision_before = report.revision_after = revisions.label(plan.revisions_now)
        report.restore = RestoreSummary(manifest.id, plan.tables_changing, new_database=request.new_database)
        if request.dry_run:
            report.finish(DRY_RUN)
            return run.outcome
        if request.new_database:
            run.step(Phase.RESTORE, restoring.into_new_database, target, storage, manifest, request.new_database,
                     settings.connect_timeout, request.jobs)
            report.finish(SUCCEEDED)
            return run.outcome
        run.require_approver()
        run.step(Phase.APPROVAL, run.approve, plan)
        # The guard and the safety backup are the restore's own: it checks the stored backup before either.
        restored = run.step(Phase.RESTORE, restoring.replace_with_backup, target, storage, manifest,
                            settings.connect_timeout, settings.guard_wait_s, settings.dump if request.backup else None,
                            run.hooks.on_progress, settings.limits.lock_timeout_s)
        report.restore.safety_backup = restored.safety_backup and restored.safety_backup.id
        report.finish(SUCCEEDED)
    return run.outcome


def _fingerprint(target: DatabaseTarget, settings: Settings) -> Fingerprint:
    with db.connect(target, settings.connect_timeout) as conn:
        return fingerprint.take(conn)
