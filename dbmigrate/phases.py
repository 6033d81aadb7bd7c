"""The phases of a run, each a plain function over a few objects: the health checks
before it, the plan, applying it, and the checks after it.

:mod:`dbmigrate.pipeline` runs them in order; the automatic rollback
(:mod:`dbmigrate.auto_rollback`) reuses :func:`apply` to downgrade.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from dbmigrate import db, health, migrate, revisions
from dbmigrate.errors import ConnectionLost, DbMigrateError, MigrationFailed, StepFailed, first_line
from dbmigrate.health import FAIL, OK, Check
from dbmigrate.migrate import AppliedStep
from dbmigrate.report import KEPT_UNKNOWN, Rehearsal
from dbmigrate.revisions import PlannedStep, Project
from dbmigrate.settings import Settings
from dbmigrate.target import DatabaseTarget

@dataclass(frozen=True)
class Plan:
    """From which revision(s), to which, through which steps, and in which direction."""

    current: tuple[str, ...]
    target: str
    steps: list[PlannedStep]
    upgrade: bool
    rehearsal: Rehearsal | None = None  # how the steps ran on a restored copy, for whoever approves them

    @property
    def revision_before(self) -> str | None:
        return revisions.label(self.current)


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


def plan(target: DatabaseTarget, project: Project, settings: Settings, revision: str, upgrade: bool) -> Plan:
    """Read the database's revision and work out the steps; touches nothing."""
    resolved = project.resolve(revision)
    with db.connect(target, settings.connect_timeout) as conn:
        current = revisions.current_revisions(conn)
    project.require_one_row(current)
    project.require_known(current)
    steps = project.plan_upgrade(current, resolved) if upgrade else project.plan_downgrade(current, resolved)
    return Plan(current, resolved, steps, upgrade)


def expected_revisions(project: Project, plan: Plan) -> set[str]:
    """The revision(s) the database must be at once the plan has run."""
    if not plan.steps:
        return set(plan.current)
    last = project.script.get_revision(plan.steps[-1].revision)
    if plan.upgrade:
        return set(project.heads) if plan.target == "heads" else {last.revision}
    below = last.down_revision
    return set(below) if isinstance(below, tuple) else ({below} if below else set())


def apply(target: DatabaseTarget, project: Project, settings: Settings, plan: Plan,
          on_step: Callable[[AppliedStep], None] | None = None) -> list[AppliedStep]:
    """Run the plan (``on_step`` hears of each step as it ran). On failure, raises MigrationFailed;
    the steps reported as applied are only those the database really kept (see :func:`kept_steps`)."""
    ran: list[AppliedStep] = []

    def ran_one(step: AppliedStep) -> None:
        ran.append(step)
        if on_step:
            on_step(step)

    try:
        migrate.run(project, plan.target, upgrade=plan.upgrade, limits=settings.limits, on_step=ran_one)
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
    at = revisions.shown(sorted(current))
    if current == expected:
        checks.append(Check("revision", OK, f"database at {at}", time.monotonic() - start))
    else:
        want = revisions.shown(sorted(expected))
        checks.append(Check("revision", FAIL, f"database at {at}, expected {want}", time.monotonic() - start))
    return checks


def current_revision(target: DatabaseTarget, settings: Settings) -> str | None:
    with db.connect(target, settings.connect_timeout) as conn:
        return revisions.current_label(conn)
