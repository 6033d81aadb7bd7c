"""The rehearsal: the pending revisions run first on a copy of the database restored from the
run's own backup, so that a revision that fails only on real data fails there, and whoever
approves the real run sees how long each revision took and which locks it held.

The copy is a scratch database beside the original or on a server of its own
(``db.scratch_database``, ``Settings.scratch_server``), restored with
``pgrestore.restore_into`` and migrated by ``phases.apply``: the project's own env.py, pointed
at the copy (its ``sqlalchemy.url``). It is dropped afterwards whatever happens (a failure,
Ctrl-C, SIGTERM). While the revisions run, :func:`dbmigrate.isolation.confined` keeps them to the
copy: the environment's URLs of the database name the copy, a statement sent through SQLAlchemy to
any other database is refused, and any change to the real database or the server's roles, role
settings, tablespaces and databases fails the rehearsal, before anyone is asked to approve.

What each revision did is read from the migration's own session, so it works with any env.py
that uses SQLAlchemy (every Alembic one does): after each statement, the table locks its backend
holds (``pg_locks``), first seen at that statement's start and held until its transaction ends;
at the end of each revision, the rows its transaction wrote (``pg_stat_xact_user_tables``) and
the tables whose storage was replaced (``relfilenode``: a rewrite).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

from sqlalchemy import event, text
from sqlalchemy.engine import Connection, Engine

from dbmigrate import db, isolation, pgrestore, pgtools, phases, revisions
from dbmigrate.catalogue import Manifest
from dbmigrate.errors import StepFailed
from dbmigrate.lockretry import LockRetries
from dbmigrate.migrate import AppliedStep
from dbmigrate.phases import Plan
from dbmigrate.report import HeldLock, Rehearsal, RehearsedStep
from dbmigrate.settings import Settings
from dbmigrate.storage import Storage
from dbmigrate.target import DatabaseTarget

LOCK_RESOLUTION = ("per statement: the table locks the migration's session held after each statement, "
                   "from that statement's start to its transaction's end; a statement run outside a "
                   "transaction (an autocommit block) holds its locks only while it runs and is not seen")
# The schema's tables; the version table is Alembic's bookkeeping, written by every revision.
_USER_TABLES = ("c.relkind IN ('r', 'p', 'm') AND n.nspname NOT IN ('pg_catalog', 'information_schema') "
                f"AND n.nspname NOT LIKE 'pg_toast%' AND c.relname <> '{revisions.VERSION_TABLE}'")
_TABLE = "n.nspname || '.' || c.relname"
_FROM_TABLES = "pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
# The locks of the session running the query.
_LOCKS = (f"SELECT {_TABLE}, l.mode FROM pg_locks l JOIN {_FROM_TABLES} ON c.oid = l.relation "
          f"WHERE l.pid = pg_backend_pid() AND l.granted AND l.locktype = 'relation' AND {_USER_TABLES}")
_WRITES = (f"SELECT {_TABLE}, s.n_tup_ins + s.n_tup_upd + s.n_tup_del FROM pg_stat_xact_user_tables s "
           f"JOIN {_FROM_TABLES} ON c.oid = s.relid WHERE {_USER_TABLES}")
_STORAGE = f"SELECT {_TABLE}, c.relfilenode FROM {_FROM_TABLES} WHERE {_USER_TABLES}"


def rehearse(target: DatabaseTarget, settings: Settings, plan: Plan, storage: Storage, manifest: Manifest) -> Rehearsal:
    """Restore ``manifest`` into a scratch database, run ``plan`` there, drop it. A revision that
    fails is the result's ``failed``; failing to make the copy raises (BackupFailed...)."""
    timeout = settings.connect_timeout
    with db.connect(target, timeout) as conn:
        pg_restore = pgtools.find("pg_restore", db.server_version(conn)[0])
    with db.scratch(target, "rehearsal", timeout, settings.scratch_server) as copy:
        start = time.monotonic()
        # On a server of its own, the production roles may not exist: everything is the rehearsing role's.
        pgrestore.restore_into(copy, storage, manifest, pg_restore, settings.dump.jobs,
                               as_restoring_role=settings.scratch_server is not None)
        restore_s = time.monotonic() - start
        with db.connect(copy, timeout) as conn:
            storage_before = dict(conn.execute(text(_STORAGE)).all())
        watch = _Watch(copy.database, storage_before, manifest.row_counts)
        with isolation.confined(target, copy, timeout, "the rehearsal's copy"), watch.listening():
            try:
                # One attempt: nobody else uses the copy, and a retry's watcher session would be seen as the
                # migration's own (it connects to the copy too).
                phases.apply(copy, settings.project(copy), replace(settings, lock_retries=LockRetries()), plan,
                             watch.step_done)
            except StepFailed as exc:
                return Rehearsal(manifest.id, restore_s, watch.steps, copy.redact(str(exc)), LOCK_RESOLUTION)
    return Rehearsal(manifest.id, restore_s, watch.steps, None, LOCK_RESOLUTION)


def _rows(dbapi_connection, query: str) -> list[tuple]:
    """``query`` on the migration's own DBAPI connection (a raw cursor: no SQLAlchemy event fires)."""
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(query)
        return cursor.fetchall()
    finally:
        cursor.close()


class _Watch:
    """What the migration's session does on the copy, told apart by the copy's database name from
    any other engine in the process; SQLAlchemy's engine events reach whatever engine env.py builds."""

    def __init__(self, database: str, storage_before: dict[str, int], row_counts: dict[str, int]):
        self.database, self.storage, self.row_counts = database, storage_before, row_counts
        self.steps: list[RehearsedStep] = []
        self.open: dict[tuple[str, str], float] = {}  # held now: (relation, mode) -> since
        self.taken: dict[tuple[str, str], float | None] = {}  # by the revision running: -> held_s once released
        self.writes: dict[str, int] = {}  # the transaction's writes so far, per table
        self.connection = None  # the migration's DBAPI connection
        self.statement_start = 0.0

    @contextmanager
    def listening(self) -> Iterator[None]:
        listeners = (("before_cursor_execute", self._before), ("after_cursor_execute", self._after),
                     ("commit", self._ended), ("rollback", self._ended))
        for name, fn in listeners:
            event.listen(Engine, name, fn)
        try:
            yield
        finally:
            for name, fn in listeners:
                event.remove(Engine, name, fn)
            self._release(set(self.open))

    def _ours(self, conn: Connection) -> bool:
        return conn.engine.url.database == self.database

    def _before(self, conn: Connection, *_) -> None:
        if self._ours(conn):
            self.statement_start = time.monotonic()

    def _after(self, conn: Connection, cursor, *_) -> None:
        if not self._ours(conn):
            return
        self.connection = cursor.connection
        now = set(_rows(cursor.connection, _LOCKS))
        for key in now - self.open.keys():
            self.open[key] = self.statement_start
            self.taken.setdefault(key, None)
        self._release(self.open.keys() - now)

    def _ended(self, conn: Connection) -> None:
        if self._ours(conn):
            self._release(set(self.open))
            self.writes = {}

    def _release(self, keys) -> None:
        """Released locks: their hold time goes to the revision that took them (the one running, or
        an earlier one when env.py runs all revisions in one transaction)."""
        at = time.monotonic()
        for key in keys:
            held_s = at - self.open.pop(key)
            if key in self.taken:
                self.taken[key] = held_s
                continue
            for step in reversed(self.steps):
                index = next((i for i, lock in enumerate(step.locks) if (lock.relation, lock.mode) == key), None)
                if index is not None:
                    step.locks[index] = HeldLock(*key, held_s)
                    break

    def step_done(self, step: AppliedStep) -> None:
        """Called as each revision's SQL completes, inside its transaction: what it locked and wrote.
        A lock still held has its hold time so far; :meth:`_release` sets the whole of it."""
        now = time.monotonic()
        locks = [HeldLock(*key, held if held is not None else now - self.open[key])
                 for key, held in sorted(self.taken.items())]
        self.taken = {}
        writes = dict(_rows(self.connection, _WRITES)) if self.connection else {}
        storage = dict(_rows(self.connection, _STORAGE)) if self.connection else self.storage
        written = {table: n - self.writes.get(table, 0) for table, n in sorted(writes.items())
                   if n > self.writes.get(table, 0)}
        rewritten = {table: self.row_counts.get(table, 0) for table, node in sorted(storage.items())
                     if table in self.storage and self.storage[table] != node}
        self.writes, self.storage = writes, storage
        self.steps.append(RehearsedStep(step.revision, step.message, step.duration_s, locks, written, rewritten))
