"""Run Alembic upgrades and downgrades in-process, timing each revision.

Nothing here depends on the project's env.py beyond the stock contract (read
``sqlalchemy.url``, call ``context.configure`` and ``context.run_migrations``):
timeouts reach env.py's own connections through libpq's ``PGOPTIONS``, and the
per-revision timing is a callback added to whatever env.py configures.
"""

from __future__ import annotations

import io
import os
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Callable, Iterator

from alembic import util as alembic_util
from alembic.runtime.environment import EnvironmentContext
from alembic.runtime.migration import MigrationStep
from sqlalchemy import event
from sqlalchemy.pool import Pool

from dbmigrate.errors import RevisionError
from dbmigrate.revisions import Project
from dbmigrate.target import pgoptions


@dataclass(frozen=True)
class SessionLimits:
    """Server-side limits for every statement a migration runs (0 = no limit)."""

    lock_timeout_s: float = 10.0
    statement_timeout_s: float = 0.0

    def pgoptions(self) -> str:
        """PGOPTIONS for the migration's sessions: the user's own, plus ours."""
        return pgoptions(f"-c lock_timeout={int(self.lock_timeout_s * 1000)}",
                         f"-c statement_timeout={int(self.statement_timeout_s * 1000)}")


@dataclass(frozen=True)
class AppliedStep:
    revision: str
    message: str
    duration_s: float

    def as_dict(self) -> dict:
        return {"revision": self.revision, "message": self.message, "duration_s": round(self.duration_s, 3)}


_COMMIT = "a commit inside the revision"  # an autocommit_block commits the run's transaction too


class Effects:
    """Which steps (by index in the run) changed the database where no rollback undoes it, and how
    (:attr:`outside`): any statement run in autocommit (an ``autocommit_block``, ``CREATE INDEX
    CONCURRENTLY``, a ``SELECT`` of a function that writes), a commit in the middle of a step, or a
    connection of its own (any SQLAlchemy engine's, checked out while the steps run in this thread).
    Only those make a failed step unsafe to run again. Alembic's own version table changes nothing
    that matters here. Not seen: a connection opened without SQLAlchemy (``psycopg.connect``), in
    another thread, or by another program the revision starts."""

    def __init__(self) -> None:
        self.step = 0
        self.outside: dict[int, str] = {}  # step -> what it ran outside the run's transaction (the first seen)
        self._pending = False  # a statement of this step inside the open transaction
        self._watched = False

    def watch(self, connection) -> None:
        event.listen(connection, "before_cursor_execute", self._executing)
        event.listen(connection, "commit", self._committed)
        event.listen(connection, "rollback", self._rolled_back)
        self._watched = True

    @contextmanager
    def own_connections(self) -> Iterator[None]:
        """While inside, a connection checked out in this thread once env.py's is watched is the revision's own."""
        thread = threading.get_ident()

        def checked_out(*_) -> None:
            if self._watched and threading.get_ident() == thread:
                self._ran_outside("a connection of its own")

        event.listen(Pool, "checkout", checked_out)
        try:
            yield
        finally:
            event.remove(Pool, "checkout", checked_out)

    def step_done(self) -> None:
        self.step += 1
        self._pending = False  # stamped with its revision: committed or rolled back together

    def _ran_outside(self, what: str) -> None:
        if self.outside.get(self.step, _COMMIT) == _COMMIT:  # the most telling account of the step's first
            self.outside[self.step] = what

    def _executing(self, conn, cursor, statement, *_) -> None:
        if getattr(cursor.connection, "autocommit", False):  # whatever it is: a SELECT may call a function that writes
            shown = (statement.strip().splitlines() or [""])[0]
            self._ran_outside(f"autocommit: {shown[:80]}")
        elif "alembic_version" not in statement:
            self._pending = True

    def _committed(self, conn) -> None:
        if self._pending:
            self.outside.setdefault(self.step, _COMMIT)
        self._pending = False

    def _rolled_back(self, conn) -> None:
        self._pending = False


class Commits:
    """How many steps env.py's connection committed for sure: a COMMIT counts once the connection
    is used again after it (the COMMIT returned), so a server lost during one is never taken as kept.
    Whatever env.py does (one transaction, one per revision, an ``autocommit_block``), a COMMIT
    covers the steps done before it."""

    def __init__(self) -> None:
        self.steps_done = 0
        self.committed = 0  # the first steps of the run that a returned COMMIT covered
        self._sent: int | None = None

    def watch(self, connection) -> None:
        event.listen(connection, "commit", self._commit)
        event.listen(connection, "begin", self._returned)
        event.listen(connection, "before_cursor_execute", self._returned)

    def step_done(self) -> None:
        self.steps_done += 1

    def _commit(self, conn) -> None:  # SQLAlchemy calls this before it sends the COMMIT
        self._sent = self.steps_done

    def _returned(self, *_) -> None:
        if self._sent is not None:
            self.committed, self._sent = self._sent, None


def _timed_environment(project: Project, on_step: Callable[[AppliedStep], None], effects: Effects | None = None,
                       commits: Commits | None = None, **kwargs) -> EnvironmentContext:
    """An EnvironmentContext that times each step, whatever env.py passes to configure(),
    and tells ``effects`` of what env.py's connection runs.

    Alembic's module proxy (``alembic.context``) is registered for EnvironmentContext
    itself, not subclasses, so the two methods are wrapped on the instance instead.
    """
    env = EnvironmentContext(project.config, project.script, **kwargs)
    configure, run_migrations = env.configure, env.run_migrations
    mark = time.monotonic()

    def step_done(*, step, **_) -> None:
        nonlocal mark
        now = time.monotonic()
        on_step(AppliedStep(step.up_revision_id, step.up_revision.doc or "", now - mark))
        mark = now
        for tracker in (effects, commits):
            if tracker is not None:
                tracker.step_done()

    def timed_configure(*args, on_version_apply=None, **kw) -> None:
        for tracker in (effects, commits):
            if tracker is not None and kw.get("connection") is not None:
                tracker.watch(kw["connection"])
        configure(*args, on_version_apply=(*alembic_util.to_tuple(on_version_apply, default=()), step_done), **kw)

    def timed_run_migrations(**kw) -> None:
        nonlocal mark
        mark = time.monotonic()
        run_migrations(**kw)

    env.configure, env.run_migrations = timed_configure, timed_run_migrations
    return env


@contextmanager
def session_limits(limits: SessionLimits, application_name: str = "dbmigrate") -> Iterator[None]:
    """Apply limits to every libpq connection opened inside, including env.py's own engine."""
    saved = {key: os.environ.get(key) for key in ("PGOPTIONS", "PGAPPNAME")}
    os.environ["PGOPTIONS"] = limits.pgoptions()
    os.environ["PGAPPNAME"] = application_name
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _steps_fn(project: Project, target: str, upgrade: bool):
    # The same step functions alembic.command.upgrade/downgrade hand to the environment.
    script = project.script
    if upgrade:
        return lambda rev, context: script._upgrade_revs(target, rev)
    return lambda rev, context: script._downgrade_revs(target, rev)


def run(
    project: Project,
    target: str,
    *,
    upgrade: bool,
    limits: SessionLimits,
    on_step: Callable[[AppliedStep], None],
    effects: Effects | None = None,
    application_name: str = "dbmigrate",
    commits: Commits | None = None,
) -> None:
    """Migrate the database online. ``on_step`` hears of each revision as its SQL
    completes (before env.py commits: a later failure may still roll it back; ``commits``
    counts those a returned COMMIT covered)."""
    env = _timed_environment(project, on_step, effects, commits, fn=_steps_fn(project, target, upgrade),
                             destination_rev=target)
    with session_limits(limits, application_name), env, effects.own_connections() if effects else nullcontext():
        project.script.run_env()


def render_sql(project: Project, current: tuple[str, ...], target: str, *, upgrade: bool) -> str:
    """The SQL Alembic would run from ``current`` to ``target`` (offline mode: no connection)."""
    if len(current) > 1:
        raise RevisionError("--dry-run needs a single current revision; the database has several")
    return _offline(project, _steps_fn(project, target, upgrade), current[0] if current else None, target)


def render_revision(project: Project, revision: str) -> str:
    """The SQL of one revision's upgrade alone, from the revision(s) below it, as env.py
    renders it offline (its BEGIN/COMMIT included)."""
    script = project.script
    below = alembic_util.to_tuple(script.get_revision(revision).down_revision, default=())

    def only_this(rev, context):  # not the revisions it depends_on that are not below it
        return [step for step in script._upgrade_revs(revision, below) if step.revision.revision == revision]

    return _offline(project, only_this, list(below) or None, revision)


def render_revisions(project: Project, revisions: list[str]) -> dict[str, str | Exception]:
    """What :func:`render_revision` gives for each of ``revisions`` (its SQL, or the exception it
    raised), with env.py run once per chain instead of once per revision (over a hundred revisions,
    that is most of the lint's time). In a chain each revision's down_revision is the one before it,
    so one offline pass renders each revision exactly as alone: from the revision below it, between
    the pass's prologue and epilogue (env.py's BEGIN and COMMIT)."""
    rendered: dict[str, str | Exception] = {}
    for chain in _chains(project, revisions):
        _render_chain(project, chain, rendered)
    return rendered


def _chains(project: Project, revisions: list[str]) -> Iterator[list[str]]:
    chain: list[str] = []
    for revision in revisions:
        if chain and project.script.get_revision(revision).down_revision != chain[-1]:
            yield chain
            chain = []
        chain.append(revision)
    if chain:
        yield chain


class _PassFailed(Exception):
    def __init__(self, failed_at: int, prologue: str, parts: list[str]):
        # failed_at: the index of the step that raised (-1 or len(chain): env.py, around the steps);
        # prologue and parts: what the pass wrote before it
        self.failed_at, self.prologue, self.parts = failed_at, prologue, parts


def _render_chain(project: Project, chain: list[str], rendered: dict[str, str | Exception]) -> None:
    """A revision that raises ends its pass: it is rendered alone (its own error, as before); those
    before it keep their parts, closed with what env.py writes after the last step (a pass of no
    step from the revision before it says what that is); the next pass starts after it."""
    while chain:
        if len(chain) == 1:
            rendered[chain[0]] = _alone(project, chain[0])
            return
        below = alembic_util.to_tuple(project.script.get_revision(chain[0]).down_revision, default=())
        try:
            prologue, parts, epilogue = _one_pass(project, chain, below)
        except _PassFailed as failed:
            if not 0 <= failed.failed_at < len(chain):  # env.py itself, around the steps: each alone says how
                rendered.update((revision, _alone(project, revision)) for revision in chain)
                return
            done, failing, chain = chain[:failed.failed_at], chain[failed.failed_at], chain[failed.failed_at + 1:]
            rendered[failing] = _alone(project, failing)
            if done:
                try:
                    epilogue = _one_pass(project, [], (done[-1],))[2]
                except _PassFailed:
                    rendered.update((revision, _alone(project, revision)) for revision in done)
                    continue
                rendered.update(zip(done, (failed.prologue + part + epilogue for part in failed.parts)))
            continue
        rendered.update(zip(chain, (prologue + part + epilogue for part in parts)))
        return


def _alone(project: Project, revision: str) -> str | Exception:
    try:
        return render_revision(project, revision)
    except Exception as exc:  # a revision can fail with anything offline: the caller says so
        return exc


def _one_pass(project: Project, chain: list[str], below: tuple[str, ...]) -> tuple[str, list[str], str]:
    """One offline run of env.py over ``chain`` from ``below``: what it wrote before the first step,
    each step's part, and what it wrote after the last one."""
    script = project.script
    buffer = io.StringIO()
    marks: list[int] = []  # where each step's part starts, and where the last one ends
    at = -1

    def steps(rev, context):  # a generator: Alembic asks for a step once the one before is written
        nonlocal at
        for at, revision in enumerate(chain):
            marks.append(buffer.tell())
            yield MigrationStep.upgrade_from_script(script.revision_map, script.get_revision(revision))
        marks.append(buffer.tell())
        at = len(chain)

    env = _timed_environment(project, lambda step: None, fn=steps, as_sql=True, starting_rev=list(below) or None,
                             destination_rev=chain[-1] if chain else below[0], output_buffer=buffer)
    try:
        with env:
            script.run_env()
    except Exception as exc:
        text = buffer.getvalue()
        raise _PassFailed(at, text[:marks[0]] if marks else "",
                          [text[start:end] for start, end in zip(marks, marks[1:])]) from exc
    text = buffer.getvalue()
    return text[:marks[0]], [text[start:end] for start, end in zip(marks, marks[1:])], text[marks[-1]:]


def _offline(project: Project, fn, starting_rev, destination_rev: str) -> str:
    buffer = io.StringIO()
    env = _timed_environment(project, lambda step: None, fn=fn, as_sql=True, starting_rev=starting_rev,
                             destination_rev=destination_rev, output_buffer=buffer)
    with env:
        project.script.run_env()
    return buffer.getvalue()
