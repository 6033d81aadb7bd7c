"""One run of the pipeline: health checks -> plan -> backup -> migrate -> validate -> report.

Each phase is a plain function over a few objects, so the command line calls
:func:`execute` and the Prefect flow wraps the same phases as tasks.
"""

from __future__ import annotations

import dataclasses
import getpass
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from dbmigrate import __version__, backup, catalogue, db, fingerprint, guard, health, migrate, revisions
from dbmigrate.errors import (
    ConfirmationRefused,
    ConnectionLost,
    DbMigrateError,
    MigrationFailed,
    ReportNotWritten,
    RevisionError,
    StepFailed,
    first_line,
)
from dbmigrate.backup import DumpOptions, ProgressFn
from dbmigrate.health import FAIL, OK, Check
from dbmigrate.migrate import AppliedStep, SessionLimits
from dbmigrate.report import DRY_RUN, NOOP, SUCCEEDED, Report
from dbmigrate.revisions import PlannedStep, Project
from dbmigrate.fingerprint import Fingerprint
from dbmigrate.storage import LocalStorage, Storage, local_directory, open_storage
from dbmigrate.target import DatabaseTarget


@dataclass(frozen=True)
class Settings:
    """Where state lives and how long to wait; the same for every command."""

    home: Path
    alembic_config: str | None = None
    connect_timeout: float = db.DEFAULT_CONNECT_TIMEOUT
    guard_wait_s: float = 0.0
    limits: SessionLimits = field(default_factory=SessionLimits)
    storage_spec: str | None = None  # None: <home>/backups; a directory; or s3-bucket/BLOCK
    dump: DumpOptions = field(default_factory=DumpOptions)
    project_logging: bool = True  # let the project's env.py configure logging (see revisions.load)

    @property
    def backup_dir(self) -> Path | None:
        """The local directory backups go to; None when they go to S3."""
        return local_directory(self.storage_spec, self.home)

    def storage(self) -> Storage:
        return open_storage(self.storage_spec, self.home)

    @property
    def reports_dir(self) -> Path:
        return self.home / "reports"

    def project(self, target: DatabaseTarget | None = None) -> Project:
        return revisions.load(self.alembic_config, target, self.connect_timeout, self.project_logging)


@dataclass(frozen=True)
class Request:
    operation: str  # "upgrade" | "downgrade"
    revision: str
    dry_run: bool = False
    backup: bool = False
    skip_health_checks: bool = False
    skip_validation: bool = False
    json_report: Path | None = None
    operator: str = field(default_factory=getpass.getuser)

    @property
    def upgrade(self) -> bool:
        return self.operation == "upgrade"


@dataclass(frozen=True)
class Plan:
    current: tuple[str, ...]
    target: str
    steps: list[PlannedStep]

    @property
    def revision_before(self) -> str | None:
        return ",".join(self.current) or None


@dataclass
class Outcome:
    report: Report
    report_path: Path | None  # None: the report could not be written (see report_error)
    error: DbMigrateError | None = None
    sql: str | None = None
    report_error: ReportNotWritten | None = None


def preflight(target: DatabaseTarget, project: Project, settings: Settings, revision: str) -> list[Check]:
    """Health checks; raises the refusal of a failed check that has one (ConnectionFailed
    when the database cannot be reached), else MigrationFailed naming every failed check."""
    checks = health.run(target, project, settings.backup_dir, settings.connect_timeout, revision)
    failed = [c for c in checks if c.status == FAIL]
    # Unreachable: the same error (type, so a flow retries it, and exit code) as every other command.
    if refusal := next((c.refusal for c in failed if c.refusal), None):
        raise refusal
    if failed:
        raise MigrationFailed("health checks failed: " + "; ".join(f"{c.name}: {c.detail}" for c in failed))
    return checks


def plan(target: DatabaseTarget, project: Project, settings: Settings, request: Request) -> Plan:
    """Read the database's revision and work out the steps; touches nothing."""
    resolved = project.resolve(request.revision)
    with db.connect(target, settings.connect_timeout) as conn:
        current = revisions.current_revisions(conn)
    project.require_one_row(current)
    if unknown := project.check_known(current):
        raise RevisionError(f"the database is at revision {', '.join(unknown)}, which the migration scripts do not know")
    if request.upgrade:
        steps = project.plan_upgrade(current, resolved)
    else:
        steps = project.plan_downgrade(current, resolved)
    return Plan(current, resolved, steps)


def expected_revisions(project: Project, plan: Plan, upgrade: bool) -> set[str]:
    """The revision(s) the database must be at once the plan has run."""
    if not plan.steps:
        return set(plan.current)
    last = project.script.get_revision(plan.steps[-1].revision)
    if upgrade:
        return set(project.heads) if plan.target == "heads" else {last.revision}
    below = last.down_revision
    return set(below) if isinstance(below, tuple) else ({below} if below else set())


KEPT_UNKNOWN = "could not read which revisions the database kept: run `dbmigrate status`"


def apply(target: DatabaseTarget, project: Project, settings: Settings, plan: Plan, upgrade: bool) -> list[AppliedStep]:
    """Run the plan. On failure, raises MigrationFailed; the steps reported as
    applied are only those the database really kept (see :func:`kept_steps`)."""
    ran: list[AppliedStep] = []
    try:
        migrate.run(project, plan.target, upgrade=upgrade, limits=settings.limits, on_step=ran.append)
    except Exception as exc:
        line = str(ConnectionLost(target.where)) if getattr(exc, "connection_invalidated", False) else first_line(exc)
        try:
            kept = kept_steps(target, settings, ran)
        except DbMigrateError:  # the database cannot be asked: say so, never guess
            raise StepFailed(f"{_what_failed(exc, plan, ran, [])}: {target.redact(line)}; {KEPT_UNKNOWN}", []) from exc
        raise StepFailed(f"{_what_failed(exc, plan, ran, kept)}: {target.redact(line)}", kept) from exc
    return ran


def _what_failed(exc: Exception, plan: Plan, ran: list[AppliedStep], kept: list[AppliedStep]) -> str:
    """The revision to blame. A statement fails in the revision after those that ran. An
    error without a statement comes from COMMIT (a deferred constraint): it fails the steps
    that ran but the database did not keep, all of them (one transaction) or the last one."""
    if isinstance(exc, DBAPIError) and exc.statement is None and ran:
        committed = [step.revision for step in ran[len(kept):] or ran[-1:]]
        return f"commit of revision{'s' if len(committed) > 1 else ''} {', '.join(committed)} failed"
    return f"revision {plan.steps[len(ran)].revision if len(ran) < len(plan.steps) else '?'} failed"


def kept_steps(target: DatabaseTarget, settings: Settings, ran: list[AppliedStep]) -> list[AppliedStep]:
    """Steps whose effect survived a failure: env.py may run all in one transaction
    (everything rolled back) or one per revision (a prefix kept)."""
    with db.connect(target, settings.connect_timeout) as conn:
        now = set(revisions.current_revisions(conn))
    for index in range(len(ran), 0, -1):
        if ran[index - 1].revision in now:
            return ran[:index]
    return []


def validate(target: DatabaseTarget, project: Project, settings: Settings, expected: set[str]) -> list[Check]:
    checks = []
    start = time.monotonic()
    with db.connect(target, settings.connect_timeout) as conn:
        answered = conn.execute(text("SELECT 1")).scalar_one() == 1
        checks.append(Check("database_answers", OK if answered else FAIL, "SELECT 1 answered",
                            time.monotonic() - start))
        start = time.monotonic()
        current = set(revisions.current_revisions(conn))
    shown = ", ".join(sorted(current)) or "base"
    if current == expected:
        checks.append(Check("revision", OK, f"database at {shown}", time.monotonic() - start))
    else:
        want = ", ".join(sorted(expected)) or "base"
        checks.append(Check("revision", FAIL, f"database at {shown}, expected {want}", time.monotonic() - start))
    return checks


def current_revision(target: DatabaseTarget, settings: Settings) -> str | None:
    with db.connect(target, settings.connect_timeout) as conn:
        return revisions.current_label(conn)


@dataclass(frozen=True)
class Approval:
    approved: bool
    approver: str
    via: str  # "--yes", "terminal", "prefect-ui"
    comment: str = ""


def _no_questions(plan: Plan) -> Approval:
    return Approval(True, getpass.getuser(), "--yes")


def _call(phase: str, fn: Callable, *args):
    return fn(*args)


@dataclass
class Hooks:
    """How a caller takes part in a run. The command line asks on the terminal; the
    Prefect flow pauses for approval, runs each phase as a task, and rolls back."""

    confirm: Callable[[Plan], Approval] = _no_questions
    on_progress: ProgressFn | None = None
    run_phase: Callable = _call  # run_phase(name, fn, *args) -> fn(*args)
    # recover(target, project, settings, fingerprint_before, backup_manifest, storage) -> RollbackResult
    recover: Callable | None = None


def execute(target: DatabaseTarget, settings: Settings, request: Request, hooks: Hooks | None = None) -> Outcome:
    """The whole run. Never raises for expected failures: the outcome carries the
    error, and the report is always written."""
    hooks = hooks or Hooks()
    report = Report(
        operation=request.operation,
        environment=target.environment,
        database=target.describe(),
        target_revision=request.revision,
        operator=request.operator,
        tool_version=__version__,
    )
    outcome = Outcome(report, None)
    phase, touched = "load", False
    run = hooks.run_phase
    manifest = before = storage = None
    try:
        project = settings.project(target)
        if not request.skip_health_checks:
            phase = "health_checks"
            checks = run(phase, preflight, target, project, settings, request.revision)
            report.health_checks = [c.as_dict() for c in checks]
        phase = "plan"
        the_plan = run(phase, plan, target, project, settings, request)
        report.revision_before = report.revision_after = the_plan.revision_before
        report.migrations_planned = [s.as_dict() for s in the_plan.steps]
        if not the_plan.steps:
            report.finish(NOOP)
        elif request.dry_run:
            outcome.sql = migrate.render_sql(project, the_plan.current, the_plan.target, upgrade=request.upgrade)
            report.finish(DRY_RUN)
        else:
            phase = "approval"
            approval = hooks.confirm(the_plan)
            report.approval = dataclasses.asdict(approval)
            if not approval.approved:
                raise ConfirmationRefused(f"not approved by {approval.approver}: nothing was changed")
            phase = "guard"
            with guard.hold(target, request.operation, settings.guard_wait_s, settings.connect_timeout):
                if plan(target, project, settings, request).current != the_plan.current:
                    raise MigrationFailed("the database changed while waiting for approval: run again")
                if request.backup:
                    phase, storage = "backup", settings.storage()
                    manifest = run(phase, backup.take, target, storage, settings.dump,
                                   hooks.on_progress, settings.connect_timeout)
                    report.backup = manifest.summary()
                if hooks.recover:
                    before = _fingerprint(target, settings)
                phase, touched = "migrate", True
                try:
                    applied = run(phase, apply, target, project, settings, the_plan, request.upgrade)
                    report.migrations_applied = [s.as_dict() for s in applied]
                    if not request.skip_validation:
                        phase = "validate"
                        expected = expected_revisions(project, the_plan, request.upgrade)
                        checks = run(phase, validate, target, project, settings, expected)
                        report.validation = [c.as_dict() for c in checks]
                        if not health.passed(checks):
                            failed = "; ".join(c.detail for c in checks if c.status == FAIL)
                            raise MigrationFailed(f"validation failed: {failed}")
                except DbMigrateError as exc:
                    if isinstance(exc, StepFailed):
                        report.migrations_applied = [s.as_dict() for s in exc.applied]
                    if hooks.recover:  # still holding the guard: nobody else migrates in between
                        report.rollback = _recover(hooks, target, project, settings, before, manifest, storage)
                    raise
            report.finish(SUCCEEDED)
    except DbMigrateError as exc:
        report.fail(phase, exc)
        report.error["message"] = target.redact(str(exc))
        outcome.error = exc
    except BaseException as exc:  # a bug: record it, then let the traceback through
        report.fail(phase, exc)
        report.error["message"] = target.redact(str(exc))
        raise
    finally:
        if touched:
            report.revision_after = _revision_after(target, settings, report)
        if storage is not None and not isinstance(storage, LocalStorage):
            _copy_report_beside_backups(report, storage, target)
        try:
            outcome.report_path = report.write(settings.reports_dir, request.json_report)
        except ReportNotWritten as exc:  # the run's own outcome (perhaps a committed migration) still stands
            outcome.report_path, outcome.report_error = exc.written, exc
    return outcome


def _recover(hooks: Hooks, target: DatabaseTarget, *args) -> dict:
    """Run the rollback hook; if it cannot even run (the database went away), say so
    in the report without hiding the failure that called for it."""
    try:
        return hooks.run_phase("rollback", hooks.recover, target, *args).as_dict()
    except DbMigrateError as exc:
        return {"performed": None, "method": None, "succeeded": False, "revision_after": None,
                "detail": f"rollback could not run: {target.redact(str(exc))}"}


def _copy_report_beside_backups(report: Report, storage: Storage, target: DatabaseTarget) -> None:
    """Keep the audit record with the backups in S3 too; the local copy is written regardless."""
    key = f"reports/{catalogue.prefix(target)}{report.file_name()}"
    try:
        storage.write_text(key, report.to_json())
        report.copies.append(storage.location(key))
    except Exception as exc:  # the storage may be what failed the run
        report.warnings.append(f"could not copy this report to {storage.location(key)}: {type(exc).__name__}")


def _fingerprint(target: DatabaseTarget, settings: Settings) -> Fingerprint:
    with db.connect(target, settings.connect_timeout) as conn:
        return fingerprint.take(conn)


def _revision_after(target: DatabaseTarget, settings: Settings, report: Report) -> str | None:
    """The revision the run left; None and a warning when the database cannot say."""
    try:
        return current_revision(target, settings)
    except DbMigrateError as exc:
        report.warnings.append(f"{KEPT_UNKNOWN} ({target.redact(str(exc))})")
        return None
