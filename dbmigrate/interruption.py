"""A run cut short from outside (its process killed, its flow run cancelled): the record it keeps
while it may change the database (:class:`InFlight`), and, read by whoever outlives it, where it
left the database, in words an operator acts on, and putting it back (:func:`where_left`).

Plain code: the Prefect flows keep the record in a Variable (``flows/recovery.py``); nothing
here needs Prefect. A database left between revisions by a run whose policy rolls back
automatically is downgraded to where the run started through :mod:`dbmigrate.auto_rollback`.

A restore over the database commits all or nothing: its record keeps the revision and row counts
before it and the backup's, and comparing what is there with both tells which.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from sqlalchemy import text

from dbmigrate import auto_rollback, db, fingerprint, guard, revisions
from dbmigrate.errors import DbMigrateError, first_line
from dbmigrate.migrate import SessionLimits
from dbmigrate.phases import Phase
from dbmigrate.settings import Settings
from dbmigrate.target import DatabaseTarget


@dataclass(frozen=True)
class Undo:
    """What putting back a run killed between revisions needs: the project and the session limits."""

    alembic_config: str  # absolute: whoever reads the record has its own working directory
    lock_timeout_s: float
    statement_timeout_s: float

    @classmethod
    def of(cls, settings: Settings) -> Undo:
        config = settings.alembic_config or os.environ.get("ALEMBIC_CONFIG") or revisions.DEFAULT_CONFIG
        return cls(str(Path(config).resolve()), settings.limits.lock_timeout_s, settings.limits.statement_timeout_s)

    def settings(self) -> Settings:
        return Settings.from_env(alembic_config=self.alembic_config, project_logging=False,
                                 limits=SessionLimits(self.lock_timeout_s, self.statement_timeout_s))


@dataclass
class InFlight:
    """The record of the run that holds an environment: which run, where it is (``phase``), the
    revision it started from and the one it goes to; a restore's row-count digests."""

    flow_run: str
    name: str
    environment: str
    credentials_block: str
    lease: str | None  # the lease of the environment's concurrency slot (flows/concurrency.py)
    since: float  # when it took the slot (time.time())
    present: bool  # it holds a presence connection (flows/recovery.py), which ends with its process
    phase: Phase = Phase.HOLDING
    revision_before: str | None = None
    target: str | None = None  # the revision(s) it goes to (a restore: the backup's)
    upgrade: bool = True
    undo: Undo | None = None  # where the policy rolls back automatically
    backup: str | None = None  # a restore's backup id
    rows_before: str | None = None  # a restore's: the digest of the row counts before it
    rows_backup: str | None = None  # and of the backup's

    def as_dict(self) -> dict:
        return {**asdict(self), "phase": self.phase.value}

    @classmethod
    def from_dict(cls, data: dict) -> InFlight:
        known = {f.name for f in fields(cls)}
        values = {name: value for name, value in data.items() if name in known}
        undo = values.get("undo")
        return cls(**{**values, "phase": Phase(values.get("phase", Phase.HOLDING)),
                      "undo": Undo(**undo) if isinstance(undo, dict) else None})


def digest(row_counts: dict[str, int]) -> str:
    # The record keeps digests, not the counts: a Prefect Variable holds 5000 characters at most.
    return hashlib.sha256(json.dumps(row_counts, sort_keys=True).encode()).hexdigest()[:16]


def where_left(target: DatabaseTarget, entry: InFlight) -> str:
    """Where the interrupted run left the database, in words an operator acts on; a database left
    between revisions by a run with ``undo`` is first downgraded to where it started."""
    start, goal = entry.revision_before, entry.target
    if entry.phase in (Phase.HOLDING, Phase.PLANNED):
        return f"the database was not changed (interrupted before migrating, at {start or 'its starting revision'})"
    try:
        with guard.hold(target, "recovery", 0, db.DEFAULT_CONNECT_TIMEOUT):
            _end_orphans(target)
            with db.connect(target) as conn:
                if entry.phase == Phase.RESTORE:
                    return _restore_state(entry, revisions.current_label(conn), fingerprint.row_counts(conn))
                now = revisions.current_label(conn)
            if now not in (start, goal) and entry.undo:
                return _downgraded_to_start(target, entry, now)
    except DbMigrateError as exc:
        return f"the database could not be read to tell where it is ({exc}); check it before running again"
    if now == start:
        return f"database at {revisions.shown(now)}, its starting revision: nothing was applied"
    if now == goal:
        return f"database at {now}, the target revision: the migration had completed"
    back, forward = ("db-rollback", "db-migrate") if entry.upgrade else ("db-migrate", "db-rollback")
    return (f"database left at {revisions.shown(now)}, between the starting revision {revisions.shown(start)} "
            f"and the target {goal}: run {back} to {revisions.shown(start)}, or {forward} again to finish")


def _restore_state(entry: InFlight, now: str | None, row_counts: dict[str, int]) -> str:
    """Whether the interrupted restore committed, told by the database's revision and row counts
    against those before it and the backup's (a backup often has the revision of the database now)."""
    seen = (now, digest(row_counts))
    before, restored = (entry.revision_before, entry.rows_before), (entry.target, entry.rows_backup)
    backup, at = entry.backup, revisions.shown(now)
    if seen == before != restored:
        return f"the restore did not commit: database as it was (revision {at} and row counts as before the restore)"
    if seen == restored != before:
        return f"the restore had committed: database now matches backup {backup} (revision {at} and its row counts)"
    if seen == before:
        return (f"database at {at} with the row counts both before the restore and of backup {backup}: these cannot "
                f"tell whether the restore (all or nothing) committed; run it again if in doubt")
    return (f"database at {at}, matching by revision and row counts neither its state before the restore nor backup "
            f"{backup}: check it before running again")


def _downgraded_to_start(target: DatabaseTarget, entry: InFlight, now: str | None) -> str:
    """The policy rolls back automatically: take a database left between revisions back to where
    the run started, as the automatic rollback downgrades (called holding the guard)."""
    start = entry.revision_before
    left = (f"database left at {revisions.shown(now)}, between the starting revision {revisions.shown(start)} "
            f"and the target {entry.target}")
    try:
        settings = entry.undo.settings()
        after = auto_rollback.downgrade_to(target, settings.project(target), settings, start or "base")
    except Exception as exc:  # a downgrade runs the project's code: any failure is reported, not raised
        reason = target.redact(first_line(exc))
        return f"{left}; the automatic rollback failed ({reason}): run db-rollback to {revisions.shown(start)}"
    if after != start:
        return (f"{left}; the automatic rollback ended at {revisions.shown(after)}: "
                f"run db-rollback to {revisions.shown(start)}")
    return f"{left}; rolled back automatically to {revisions.shown(start)}, its starting revision"


def _end_orphans(target: DatabaseTarget, wait_s: float = 10.0) -> None:
    """Terminate the dead run's statements (its restore's psql too), which PostgreSQL would otherwise
    go on running (holding their locks) until they next write to the vanished client. Called holding
    the guard: no live migration or restore is running, so every dbmigrate session without it is an orphan."""
    with db.connect(target) as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT")
        query = text("SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                     "AND application_name IN ('dbmigrate', 'dbmigrate restore') AND pid <> pg_backend_pid()")
        for pid in conn.execute(query).scalars():
            conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        deadline = time.monotonic() + wait_s
        while conn.execute(query).first() and time.monotonic() < deadline:
            time.sleep(0.2)
