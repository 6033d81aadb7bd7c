"""The phases of a run: their names (:class:`Phase`), and each a plain function over a few
objects: the health checks before it, the plan, applying it, and the checks after it.

:mod:`dbmigrate.pipeline` runs them in order; the automatic rollback
(:mod:`dbmigrate.auto_rollback`) reuses :func:`apply` to downgrade.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Callable

from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError

from dbmigrate import db, health, isolation, lockretry, migrate, revisions, schema
from dbmigrate import lint as linting
from dbmigrate.errors import (
    ConnectionLost,
    DbMigrateError,
    HealthFailed,
    LockRetriesExhausted,
    RevisionError,
    StepFailed,
    first_line,
)
from dbmigrate.health import FAIL, OK, Check
from dbmigrate.lint import LintResult
from dbmigrate.lockretry import LockAttempt
from dbmigrate.migrate import AppliedStep
from dbmigrate.report import KEPT_UNKNOWN, Rehearsal
from dbmigrate.revisions import PlannedStep, Project
from dbmigrate.settings import Settings
from dbmigrate.target import DatabaseTarget

CHANGES, RETRIED, IN_FLOW = "changes the database", "may be retried", "runs in the flow"


class Phase(StrEnum):
    """Where a run is: each step by the name reports, Prefect tasks and the in-flight journal use
    (a ``str``, so the JSON keeps its strings), the words a message names it with, and what it may do.
    ``HOLDING``, ``PLANNED`` and ``APPLICATION`` are where the in-flight journal (flows/recovery.py)
    finds a run between steps: before its plan, waiting for approval, inside the application's dbmigrate."""

    def __new__(cls, value: str, words: str | None = None, *traits: str) -> Phase:
        member = str.__new__(cls, value)
        member._value_ = value
        member.words, member.traits = words, frozenset(traits)
        return member

    LOAD = "load", None, IN_FLOW  # only reads the project's files
    HEALTH_CHECKS = "health_checks", None, RETRIED  # connects: retried when it could not
    PLAN = "plan"
    LINT = "lint"
    APPROVAL = "approval", None, IN_FLOW  # the flow pauses for it
    GUARD = "guard", None, IN_FLOW  # held by the flow for the rest of the run
    BACKUP = "backup", "the backup", RETRIED  # connects and uploads: retried when it could not
    REHEARSAL = "rehearsal", "the rehearsal on a restored copy"
    MIGRATE = "migrate", "the migration", CHANGES
    VALIDATE = "validate"
    ROLLBACK = "rollback", "the automatic rollback", CHANGES
    RESTORE = "restore", "the restore", CHANGES
    DRIFT = "drift"  # db-health's replay of the migrations on a scratch copy
    HOLDING = "holding", "the checks before migrating"
    PLANNED = "planned", "approval, before migrating"
    APPLICATION = "application", "the application's dbmigrate (backup, rehearsal, migration)"

    @property
    def changes_database(self) -> bool:
        """After this step the database may no longer be as the run found it."""
        return CHANGES in self.traits

    @property
    def retried(self) -> bool:
        """The step only connects or uploads: safe to run again when that failed. A migration never is."""
        return RETRIED in self.traits

    @property
    def in_flow(self) -> bool:
        """The Prefect flow runs this step itself, not as a task."""
        return IN_FLOW in self.traits


@dataclass(frozen=True)
class Plan:
    """From which revision(s), to which, through which steps, and in which direction."""

    current: tuple[str, ...]
    target: str
    steps: list[PlannedStep]
    upgrade: bool
    expected: tuple[str, ...] = ()  # the revision(s) the database is at once the steps have run
    lint: LintResult | None = None  # the lint of its revisions, once the run has it (approvers read it)
    rehearsal: Rehearsal | None = None  # how the steps ran on a restored copy, for whoever approves them
    invalid_indexes: tuple[str, ...] = ()  # before the run: validation fails only for those it leaves
    server_version: str | None = None  # PostgreSQL's, as planned: what the lint checks the SQL for

    @property
    def revision_before(self) -> str | None:
        return revisions.label(self.current)


def preflight(target: DatabaseTarget, project: Project, settings: Settings, revision: str,
              upgrade: bool = True, scratch_for: str | None = None) -> list[Check]:
    """Health checks (for a run to ``revision``, up or down; with ``scratch_for``, whether it can make
    its scratch database: see :func:`health.run`); raises the refusal of a failed check that has one
    (ConnectionFailed when the database cannot be reached), else HealthFailed naming every failed
    check."""
    checks = health.run(target, project, settings.backup_dir, settings.connect_timeout, revision, upgrade,
                        scratch_for, settings.scratch_server)
    failed = [c for c in checks if c.status == FAIL]
    # Unreachable: the same error (type, so a flow retries it, and exit code) as every other command.
    if refusal := next((c.refusal for c in failed if c.refusal), None):
        raise refusal
    if failed:
        raise HealthFailed("health checks failed: " + "; ".join(f"{c.name}: {c.detail}" for c in failed))
    return checks


def plan(target: DatabaseTarget, project: Project, settings: Settings, revision: str, upgrade: bool) -> Plan:
    """Read the database's revision and work out the steps; touches nothing."""
    project.resolve(revision)  # a bad target is refused before connecting
    with db.connect(target, settings.connect_timeout) as conn:
        return plan_on(conn, project, revision, upgrade)


def plan_on(conn: Connection, project: Project, revision: str, upgrade: bool) -> Plan:
    """:func:`plan` on a connection the caller holds (the guard's, when the plan is checked again)."""
    resolved = project.resolve(revision)
    current = revisions.current_revisions(conn)
    invalid = tuple(schema.invalid_indexes(conn))
    _, version = db.server_version(conn)
    project.require_one_row(current)
    project.require_known(current)
    return planned(project, current, resolved, upgrade, invalid, version)


def planned(project: Project, current: tuple[str, ...], target: str, upgrade: bool,
            invalid_indexes: tuple[str, ...] = (), server_version: str | None = None) -> Plan:
    """The plan from ``current`` to the resolved revision ``target``, with the revision(s) it ends at."""
    steps = project.plan_upgrade(current, target) if upgrade else project.plan_downgrade(current, target)
    return Plan(current, target, steps, upgrade, _expected_revisions(project, current, target, steps, upgrade),
                invalid_indexes=invalid_indexes, server_version=server_version)


def lint(target: DatabaseTarget, project: Project, settings: Settings, plan: Plan,
         blocking_level: str | None) -> LintResult:
    """Lint the plan's revisions for PostgreSQL as the database runs it; changes nothing."""
    version = plan.server_version
    if version is None:  # a plan made without reading it
        with db.connect(target, settings.connect_timeout) as conn:
            _, version = db.server_version(conn)
    with isolation.rendering(target):
        result = linting.lint(project, plan.steps, linting.pg_version(version))
    result.blocking_level = blocking_level
    return result


def render_sql(target: DatabaseTarget, project: Project, plan: Plan) -> str:
    """The plan's SQL, rendered offline; a revision that connects on its own meanwhile only reads, and
    one that cannot be rendered so is a RevisionError."""
    with isolation.rendering(target):
        try:
            return migrate.render_sql(project, plan.current, plan.target, upgrade=plan.upgrade)
        except DbMigrateError:
            raise
        except Exception as exc:  # a revision can fail with anything: say why, in one line
            raise RevisionError(f"the SQL cannot be rendered offline: {target.redact(first_line(exc))}") from None


def _expected_revisions(project: Project, current: tuple[str, ...], target: str, steps: list[PlannedStep],
                        upgrade: bool) -> tuple[str, ...]:
    """The revision(s) the database must be at once ``steps`` have run, sorted."""
    if not steps:
        return tuple(sorted(current))
    last = project.script.get_revision(steps[-1].revision)
    if upgrade:
        return tuple(sorted(project.heads)) if target == "heads" else (last.revision,)
    below = last.down_revision
    return tuple(sorted(below)) if isinstance(below, tuple) else ((below,) if below else ())


@dataclass
class Applied:
    """What the migrate phase did: the steps applied, and the attempts under a lock-retry schedule."""

    steps: list[AppliedStep]
    attempts: list[LockAttempt]


def apply(target: DatabaseTarget, project: Project, settings: Settings, plan: Plan,
          on_step: Callable[[AppliedStep], None] | None = None) -> Applied:
    """Run the plan (``on_step`` hears of each step as it ran). On failure, raises StepFailed; the steps reported as applied are only
    those the database really kept (see :func:`kept_steps`).

    Under a lock-retry schedule (``settings.lock_retries``) an attempt that ran out of its
    ``lock_timeout`` is run again, from the revision the database kept, as long as what
    failed changed nothing a rollback did not undo (see :class:`migrate.Effects`)."""
    if not settings.lock_retries.enabled:
        return Applied(_attempt(target, project, settings, plan, settings.limits, [], on_step), [])
    schedule = settings.lock_retries
    deadline = time.monotonic() + schedule.total_s
    application_name = f"dbmigrate-{uuid.uuid4().hex[:8]}"  # how our watcher finds the migrating backend
    applied: list[AppliedStep] = []
    attempts: list[LockAttempt] = []
    for number, lock_timeout in enumerate(schedule.lock_timeouts(), start=1):
        limits = replace(settings.limits, lock_timeout_s=lock_timeout)
        effects, started = migrate.Effects(), time.monotonic()
        try:
            with lockretry.Watcher(target, settings.connect_timeout, application_name) as watcher:
                applied += _attempt(target, project, settings, plan, limits, applied, on_step, effects,
                                    application_name)
        except StepFailed as failed:
            lock_failure = lockretry.lock_failure(failed.__cause__)  # a lock timeout or a deadlock: rolled back
            attempts.append(LockAttempt(number, lock_timeout, time.monotonic() - started,
                                        lock_failure or lockretry.FAILED, watcher.blockers))
            failed.attempts = attempts
            if not lock_failure or failed.kept_unknown:
                raise
            _require_undone(failed, effects, plan.steps[len(applied):], attempts)
            applied = failed.applied
            if time.monotonic() + schedule.pause_s >= deadline:
                raise _gave_up(failed, schedule, attempts) from None
            time.sleep(schedule.pause_s)
            continue
        attempts.append(LockAttempt(number, lock_timeout, time.monotonic() - started, lockretry.SUCCEEDED,
                                    watcher.blockers))
        return Applied(applied, attempts)
    raise AssertionError("the schedule repeats its last lock_timeout")


def _require_undone(failed: StepFailed, effects: migrate.Effects, attempted: list[PlannedStep],
                    attempts: list[LockAttempt]) -> None:
    """Refuse to run again what changed the database outside a transaction in the failed attempt: a
    step whose revision the database did not keep (``attempted``: the plan's steps from where the attempt began)."""
    kept = {step.revision for step in failed.applied}
    unstamped = [(f"revision {attempted[index].revision}" if index < len(attempted) else "env.py after them", what)
                 for index, what in sorted(effects.outside.items())
                 if index >= len(attempted) or attempted[index].revision not in kept]
    if unstamped:
        ran = ", ".join(f"{who} ran outside a transaction ({what})" for who, what in unstamped)
        raise LockRetriesExhausted(
            f"{failed}; not retried: {ran} and may have changed the database before the attempt failed, which no "
            "rollback undoes: check what it left (an INVALID index, a half-done change) before running it again",
            failed.applied, attempts)


def _gave_up(failed: StepFailed, schedule: lockretry.LockRetries, attempts: list[LockAttempt]) -> StepFailed:
    """The schedule is spent: which revision, how hard it tried, whom it waited for, and what the database kept."""
    kept = (f"revisions kept: {', '.join(step.revision for step in failed.applied)}" if failed.applied
            else "nothing was changed")
    return LockRetriesExhausted(
        f"{failed.blamed}: could not get its lock in {len(attempts)} attempts over {schedule.total_s:g}s "
        f"(lock_timeout {schedule.timeouts_s[0]:g}s to {max(schedule.timeouts_s):g}s): "
        f"{lockretry.blocked_by(attempts)}; {kept}", failed.applied, attempts)


def _attempt(target: DatabaseTarget, project: Project, settings: Settings, plan: Plan,
             limits: migrate.SessionLimits, before: list[AppliedStep],
             on_step: Callable[[AppliedStep], None] | None = None, effects: migrate.Effects | None = None,
             application_name: str = "dbmigrate") -> list[AppliedStep]:
    """One run of Alembic from wherever the database is (``before`` are the steps of the plan
    already applied); StepFailed, with the steps the database kept, when it fails."""
    ran: list[AppliedStep] = []

    def ran_one(step: AppliedStep) -> None:
        ran.append(step)
        if on_step:
            on_step(step)

    commits = migrate.Commits()
    try:
        migrate.run(project, plan.target, upgrade=plan.upgrade, limits=limits, on_step=ran_one,
                    effects=effects, application_name=application_name, commits=commits)
    except Exception as exc:
        line = str(ConnectionLost(target.where)) if getattr(exc, "connection_invalidated", False) else first_line(exc)
        done = before + ran
        try:
            kept = kept_steps(target, settings, done)
        except DbMigrateError:  # the database cannot be asked: what a returned COMMIT covered, never a guess
            committed = ran[:commits.committed]
            blamed = _what_failed(exc, plan, done, before + committed)
            so_far = f"revisions committed before: {', '.join(s.revision for s in committed)}; " if committed else ""
            raise StepFailed(f"{blamed}: {target.redact(line)}; {so_far}{KEPT_UNKNOWN}", before + committed, blamed,
                             kept_unknown=True) from exc
        blamed = _what_failed(exc, plan, done, kept)
        raise StepFailed(f"{blamed}: {target.redact(line)}", kept, blamed) from exc
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


def validate(target: DatabaseTarget, project: Project, settings: Settings, expected: set[str],
             invalid_before: tuple[str, ...] = ()) -> list[Check]:
    """The checks after a run: the database answers, is at the revision(s) expected, and has no
    invalid index the run left (a ``CREATE INDEX CONCURRENTLY`` that failed without failing its
    revision); ``invalid_before`` are those it already had (the plan's), named but not failed."""
    checks = []
    start = time.monotonic()
    with db.connect(target, settings.connect_timeout) as conn:
        answered = conn.execute(text("SELECT 1")).scalar_one() == 1
        checks.append(Check("database_answers", OK if answered else FAIL, "SELECT 1 answered",
                            time.monotonic() - start))
        start = time.monotonic()
        invalid = schema.invalid_indexes(conn)
        checks.append(_invalid_indexes(invalid, invalid_before, time.monotonic() - start))
        start = time.monotonic()
        current = set(revisions.current_revisions(conn))
    at = revisions.shown(sorted(current))
    if current == expected:
        checks.append(Check("revision", OK, f"database at {at}", time.monotonic() - start))
    else:
        want = revisions.shown(sorted(expected))
        checks.append(Check("revision", FAIL, f"database at {at}, expected {want}", time.monotonic() - start))
    return checks


def _invalid_indexes(invalid: list[str], before: tuple[str, ...], duration_s: float) -> Check:
    left = [index for index in invalid if index not in before]
    if left:
        return Check("invalid_indexes", FAIL, f"invalid index(es) left by the run: {', '.join(left)} (a CREATE INDEX "
                     "CONCURRENTLY failed): drop and build again", duration_s, {"invalid_indexes": invalid})
    if invalid:
        return Check("invalid_indexes", health.WARN, f"invalid index(es) from before the run: {', '.join(invalid)}",
                     duration_s, {"invalid_indexes": invalid})
    return Check("invalid_indexes", OK, "no invalid index", duration_s)


def current_revision(target: DatabaseTarget, settings: Settings) -> str | None:
    with db.connect(target, settings.connect_timeout) as conn:
        return revisions.current_label(conn)
