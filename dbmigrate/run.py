"""One run of a database-changing operation: what its steps share and how it ends (:class:`Run`),
what was asked (:class:`Request`), how a caller takes part (:class:`Hooks`), and what it leaves
(:class:`Outcome`). :mod:`dbmigrate.pipeline` holds the operations, each read top to bottom
through a Run.
"""

from __future__ import annotations

import getpass
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Protocol, Self, TypeVar

from dbmigrate import __version__, backup, catalogue, guard, phases
from dbmigrate import lint as linting
from dbmigrate.catalogue import Manifest
from dbmigrate.errors import DatabaseMoved, DbMigrateError, ReportNotWritten, StepFailed
from dbmigrate.fingerprint import Fingerprint
from dbmigrate.migrate import AppliedStep
from dbmigrate.phases import Phase, Plan
from dbmigrate.report import Approval, AutoRollbackResult, Report
from dbmigrate.restore import RestorePlan
from dbmigrate.revisions import Project
from dbmigrate.settings import Settings
from dbmigrate.storage import LocalStorage, Storage
from dbmigrate.target import DatabaseTarget

T = TypeVar("T")
UPGRADE, DOWNGRADE, REHEARSE, RESTORE = "upgrade", "downgrade", "rehearse", "restore"


@dataclass(frozen=True)
class Request:
    """What a run is asked to do: an ``operation`` (UPGRADE, DOWNGRADE; REHEARSE: the pending revisions
    on a copy restored from a new backup, the database only read; RESTORE: the backup ``revision``
    names, over the database or into ``new_database``) and how."""

    operation: str
    revision: str  # the revision to reach; a restore's: the backup's id
    dry_run: bool = False
    backup: bool = False  # back the database up first (a restore over the database: the safety backup)
    skip_health_checks: bool = False
    skip_validation: bool = False
    json_report: Path | None = None
    operator: str = field(default_factory=getpass.getuser)
    requested_by: str | None = None  # who asked, where not the operator (the flows: see flows.common.who_asked)
    lint_blocking_level: str | None = None  # lint findings from this level stop the run (Policy); None: they warn
    rehearse: bool = False  # run the revisions on a copy restored from the run's backup first (implies backup)
    run_url: str | None = None  # the Prefect flow run's page, recorded in the report (history's link)
    expect_current: str | None = None  # refuse unless the database is at this revision ("base": none) when planned
    new_database: str | None = None  # a restore into this new database, the database itself untouched
    jobs: int = 1  # a restore into a new database: pg_restore's parallel jobs

    @property
    def upgrade(self) -> bool:
        return self.operation in (UPGRADE, REHEARSE)


@dataclass
class Outcome:
    report: Report
    report_path: Path | None  # None: the report could not be written (see report_error)
    error: DbMigrateError | None = None
    sql: str | None = None
    report_error: ReportNotWritten | None = None
    plan: Plan | RestorePlan | None = None  # what the run set out to do, once it knew


class Suspended(BaseException):
    """Raised by a hook to stop the run here, to be started again from the beginning later (the
    Prefect flow waiting for approval with no process of its own): not an end, so no report."""


class Confirm(Protocol):
    """Ask whoever approves the change (the migration's plan, or the restore's); an Approval that
    says no stops the run, nothing changed."""

    def __call__(self, plan: Plan | RestorePlan, /) -> Approval: ...


class Progress(Protocol):
    """Told how the backup is going: bytes written so far, bytes per second."""

    def __call__(self, size: int, rate: float, /) -> None: ...


class RunPhase(Protocol):
    """Run one step: ``run_phase(name, fn, *args)`` returns ``fn(*args)``, however it runs it."""

    def __call__(self, name: Phase, fn: Callable[..., T], /, *args: Any) -> T: ...


class Interrupted(Protocol):
    """The report's words for a run cut short from outside (a signal, Ctrl-C, the Prefect flow
    cancelled): what stopped it during ``phase`` and where the database is; None: the exception's own."""

    def __call__(self, phase: Phase, exc: BaseException, /) -> str | None: ...


class AutoRollback(Protocol):
    """Put the database back where the run found it (:func:`dbmigrate.auto_rollback.restore_starting_state`):
    ``before`` is its state then, ``backup`` the backup this run took, if any, in ``storage``."""

    def __call__(self, target: DatabaseTarget, project: Project, settings: Settings, before: Fingerprint,
                 backup: Manifest | None, storage: Storage | None, /) -> AutoRollbackResult: ...


def _no_questions(plan: Plan | RestorePlan) -> Approval:
    return Approval(True, getpass.getuser(), "--yes")


def _someone_can_approve() -> None:
    """The default: confirm always has someone to ask (the flows pause for the UI)."""


def _call(name: Phase, fn: Callable[..., T], *args: Any) -> T:
    return fn(*args)


@dataclass
class Hooks:
    """How a caller takes part in a run. The command line asks on the terminal; the Prefect
    flow pauses for approval, runs each step as a task, and rolls back automatically."""

    confirm: Confirm = _no_questions
    # Raises ConfirmationRefused when confirm could only refuse (no terminal, no approver given): the run
    # stops before its backup and rehearsal.
    require_approver: Callable[[], None] = _someone_can_approve
    on_progress: Progress | None = None
    run_phase: RunPhase = _call
    auto_rollback: AutoRollback | None = None  # run_phase runs it as the step "rollback"
    interrupted: Interrupted | None = None


class Run:
    """What the steps of one run share, and how the run ends.

    :meth:`step` names the phase and runs the step through ``hooks.run_phase``. The guard is a
    step too: :meth:`hold_guard` takes it and the run keeps it (not the step) until the run
    ends, so the backup, the migration and any automatic rollback all happen under it.

    As a context manager the run ends itself: after a failure in a step that may have changed
    the database, the automatic rollback runs (still holding the guard); then the guard is
    released, the failure recorded in the report under the phase it happened in, and the report
    written. An expected failure (a DbMigrateError) ends there, in the outcome; anything else
    (a bug, Ctrl-C) is recorded too and goes on up.
    """

    def __init__(self, target: DatabaseTarget, settings: Settings, request: Request, hooks: Hooks):
        self.target, self.settings, self.request, self.hooks = target, settings, request, hooks
        self.report = Report(
            operation=request.operation,
            environment=target.environment,
            database=target.describe(),
            target_revision=request.revision,
            operator=request.operator,
            requested_by=request.requested_by or request.operator,
            tool_version=__version__,
            run_url=request.run_url,
        )
        self.outcome = Outcome(self.report, None)
        self.phase = Phase.LOAD
        self.may_have_changed = False
        self.project: Project | None = None
        self.storage: Storage | None = None
        self.manifest: Manifest | None = None
        self.before: Fingerprint | None = None  # the state the automatic rollback returns to
        self.ran: list[AppliedStep] = []  # the migration's steps as they ran (committed or not)
        self.validated_at: str | None = None  # the revision validation found, under the guard, when it passed
        self._held = ExitStack()

    def step(self, name: Phase, fn: Callable[..., T], *args: Any) -> T:
        self.phase = name
        self.may_have_changed = self.may_have_changed or name.changes_database
        return self.hooks.run_phase(name, fn, *args)

    def require_approver(self) -> None:
        """Before anything is done for a change nobody could approve: under the phase APPROVAL."""
        self.phase = Phase.APPROVAL
        self.hooks.require_approver()

    def approve(self, plan: Plan | RestorePlan) -> None:
        """Step APPROVAL: refuse the run unless whoever approves says yes."""
        self.report.approval = self.hooks.confirm(plan)
        self.report.approval.require(RESTORE if self.request.operation == RESTORE else "")

    def lint(self, plan: Plan) -> Plan:
        """Step LINT: the report records the findings; those at or above the blocking level stop
        the run here, before anything changes. The plan goes on with them for the approver."""
        result = self.report.lint = phases.lint(self.target, self.project, self.settings, plan,
                                                self.request.lint_blocking_level)
        if result.blocking():
            raise linting.LintBlocked(linting.blocked_message(result, self.target.environment))
        return replace(plan, lint=result)

    def hold_guard(self, plan: Plan) -> None:
        """Step GUARD: take the guard for the rest of the run, then make sure the plan still
        holds (the database may have moved while the approver read it)."""
        conn = self._held.enter_context(guard.hold(self.target, self.request.operation, self.settings.guard_wait_s,
                                                   self.settings.connect_timeout))
        if phases.plan_on(conn, self.project, self.request.revision, self.request.upgrade).current != plan.current:
            raise DatabaseMoved("the database changed while waiting for approval: run again")

    def back_up(self) -> Manifest:
        """Step BACKUP. The report is copied beside the backups (S3) however the run ends."""
        self.phase = Phase.BACKUP  # opening the storage is part of it (a step a resumed flow reuses does not)
        self.storage = self.settings.storage()
        self.manifest = self.step(Phase.BACKUP, backup.take, self.target, self.storage, self.settings.dump,
                                  self.hooks.on_progress, self.settings.connect_timeout, self.settings.scratch_server)
        return self.manifest

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind, exc: BaseException | None, traceback) -> bool:
        if isinstance(exc, Suspended):
            self._held.close()
            return False
        failed_in = self.phase  # the step that failed, not the automatic rollback after it
        if isinstance(exc, StepFailed):
            self.report.migrations_applied, self.report.lock_attempts = exc.applied, exc.attempts
        try:
            with self._held:
                if isinstance(exc, DbMigrateError) and self.may_have_changed and self.hooks.auto_rollback:
                    self._auto_rollback()
        except BaseException as late:  # a bug in the rollback, Ctrl-C, the guard's release: that ended the run
            self._end(failed_in, late)
            raise
        self._end(failed_in, exc)
        return isinstance(exc, DbMigrateError)

    def _auto_rollback(self) -> None:
        """Step ROLLBACK; if it cannot even run (the database went away), the report says so
        without hiding the failure that called for it."""
        try:
            result = self.step(Phase.ROLLBACK, self.hooks.auto_rollback, self.target, self.project, self.settings,
                               self.before, self.manifest, self.storage)
            self.report.rollback = result
        except DbMigrateError as exc:
            self.report.rollback = AutoRollbackResult.could_not_run(self.target.redact(str(exc)))

    def _end(self, phase: Phase, exc: BaseException | None) -> None:
        report = self.report
        if exc is not None:
            message = self.target.redact(str(exc))
            if not isinstance(exc, Exception):  # cut short from outside: not a failure of the run's own
                self._record_kept(phase)
                message = (self.hooks.interrupted and self.hooks.interrupted(phase, exc)) or message
            report.fail(phase, exc, message)
            if isinstance(exc, DbMigrateError):
                self.outcome.error = exc
        if self.may_have_changed:  # read back, unless a passed validation just read it
            report.revision_after = self.validated_at if exc is None and self.validated_at else self._revision_after()
        if self.storage is not None and not isinstance(self.storage, LocalStorage):
            self._copy_report_beside_backups()
        try:
            self.outcome.report_path = report.write(self.settings.reports_dir, self.request.json_report)
        except ReportNotWritten as unwritten:  # the run's own outcome (perhaps a committed migration) still stands
            self.outcome.report_path, self.outcome.report_error = unwritten.written, unwritten

    def _record_kept(self, phase: Phase) -> None:
        """A migration cut short may still have committed (all of it, or a revision per transaction):
        the report lists what the database kept of the steps that ran."""
        if phase == Phase.MIGRATE and self.ran:
            try:
                self.report.migrations_applied = phases.kept_steps(self.target, self.settings, self.ran)
            except DbMigrateError:  # revision_after then says the database could not be read
                pass

    def _revision_after(self) -> str | None:
        """The revision the run left; None, and the report says why, when the database cannot say."""
        try:
            return phases.current_revision(self.target, self.settings)
        except DbMigrateError as exc:
            self.report.revision_after_unknown = self.target.redact(str(exc))
            return None

    def _copy_report_beside_backups(self) -> None:
        """Keep the audit record with the backups in S3 too; the local copy is written regardless."""
        key = f"reports/{catalogue.prefix(self.target)}{self.report.file_name()}"
        try:
            self.storage.write_text(key, self.report.to_json())
            self.report.copies.append(self.storage.location(key))
        except Exception as exc:  # the storage may be what failed the run
            self.report.warnings.append(f"could not copy this report to {self.storage.location(key)}: "
                                        f"{type(exc).__name__}")
