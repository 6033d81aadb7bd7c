"""Lock-safe execution: GitLab's "lock retries" for any Alembic project.

A migration waiting for a lock queues every query of the application behind its request, so
a long ``lock_timeout`` stalls the application while a long transaction holds the table. Under
a :class:`LockRetries` schedule each attempt waits only a short, growing ``lock_timeout``; an
attempt that times out (or that PostgreSQL cancels to break a deadlock) is rolled back and tried
again after a pause, until the total time is spent. While an attempt runs, a :class:`Watcher` (a
second session of ours) records whom the migrating backend waits for, so a failure names the
blocking sessions.
"""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Iterator

from sqlalchemy import text

from dbmigrate import db
from dbmigrate.target import DatabaseTarget

SUCCEEDED, LOCK_TIMEOUT, DEADLOCK, FAILED = "succeeded", "lock_timeout", "deadlock", "failed"
_RETRIED = {db.LOCK_NOT_AVAILABLE: LOCK_TIMEOUT, "40P01": DEADLOCK}  # SQLSTATE 40P01: deadlock_detected
WATCH_INTERVAL_S = 0.02  # an attempt of 0.1 s must be seen waiting


@dataclass(frozen=True)
class LockRetries:
    """The schedule: the ``lock_timeout`` of each attempt (the last repeats), the pause between
    attempts, and the total time after which the run gives up. No timeouts: one attempt under
    the plain ``lock_timeout``, as without this feature."""

    timeouts_s: tuple[float, ...] = ()
    pause_s: float = 1.0
    total_s: float = 60.0

    @property
    def enabled(self) -> bool:
        return bool(self.timeouts_s)

    def lock_timeouts(self) -> Iterator[float]:
        yield from self.timeouts_s
        while True:
            yield self.timeouts_s[-1]

    def describe(self) -> str:
        if not self.enabled:
            return "off: one attempt under the plain lock_timeout"
        return (f"lock_timeout {', '.join(f'{t:g}' for t in self.timeouts_s)} s (the last repeats), "
                f"{self.pause_s:g} s between attempts, giving up after {self.total_s:g} s")


@dataclass(frozen=True)
class Blocker:
    """A session our migration waited for, and the lock it wanted."""

    pid: int
    application_name: str
    state: str
    query_start: datetime | None
    query: str  # its first line
    relation: str  # the lock ours wanted: the table, or the lock type when it is not a table's
    mode: str

    def describe(self) -> str:
        since = f", query since {self.query_start:%H:%M:%S}" if self.query_start else ""
        return f"pid {self.pid} ('{self.application_name or 'unknown'}', {self.state}{since}): {self.query}"

    def as_dict(self) -> dict:
        return {**asdict(self), "query_start": self.query_start.isoformat() if self.query_start else None}


@dataclass(frozen=True)
class LockAttempt:
    """One attempt of the migration: its lock_timeout, how long it ran, how it ended, whom it waited for."""

    number: int
    lock_timeout_s: float
    waited_s: float
    outcome: str  # succeeded | lock_timeout | deadlock | failed
    blockers: tuple[Blocker, ...] = ()

    def as_dict(self) -> dict:
        return {"number": self.number, "lock_timeout_s": self.lock_timeout_s, "waited_s": round(self.waited_s, 3),
                "outcome": self.outcome, "blockers": [b.as_dict() for b in self.blockers]}


def lock_failure(exc: BaseException) -> str | None:
    """LOCK_TIMEOUT or DEADLOCK when PostgreSQL cancelled a statement because its lock_timeout ran out
    (SQLSTATE 55P03) or it was chosen to break a deadlock (40P01): either way its transaction is
    rolled back, and the attempt may be tried again. None for any other failure."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        orig = getattr(exc, "orig", None)
        state = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
        if state in _RETRIED:
            return _RETRIED[state]
        exc = exc.__cause__ or exc.__context__
    return None


# The sessions a backend of ours (by application_name) waits for, and the lock it wants.
_BLOCKERS = text("""
    SELECT b.pid, coalesce(b.application_name, '') AS application_name, coalesce(b.state, '') AS state,
           b.query_start, coalesce(b.query, '') AS query,
           coalesce(l.relation::regclass::text, l.locktype) AS relation, l.mode
    FROM pg_stat_activity w
    JOIN pg_locks l ON l.pid = w.pid AND NOT l.granted
    CROSS JOIN LATERAL unnest(pg_blocking_pids(w.pid)) AS blocking(pid)
    JOIN pg_stat_activity b ON b.pid = blocking.pid
    WHERE w.application_name = :name AND w.wait_event_type = 'Lock' AND w.datname = current_database()
    ORDER BY b.pid
""")


class Watcher:
    """A second session that, while an attempt runs, polls whom the sessions named
    ``application_name`` wait for; :attr:`blockers` is the last it saw waiting."""

    def __init__(self, target: DatabaseTarget, timeout: float, application_name: str):
        self.blockers: tuple[Blocker, ...] = ()
        self._name = application_name
        self._stop = threading.Event()
        self._session = db.connect(target, timeout, connect_args={"application_name": "dbmigrate-lock-watch"})
        self._thread = threading.Thread(target=self._poll, name="dbmigrate-lock-watch", daemon=True)

    def __enter__(self) -> Watcher:
        self._conn = self._session.__enter__()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._session.__exit__(None, None, None)

    def _poll(self) -> None:
        while not self._stop.wait(WATCH_INTERVAL_S):
            try:
                rows = self._conn.execute(_BLOCKERS, {"name": self._name}).all()
                self._conn.rollback()  # each poll its own snapshot
            except Exception:  # diagnosis is a courtesy: the attempt's own outcome is what counts
                return
            if rows:
                self.blockers = tuple(Blocker(r.pid, r.application_name, r.state, r.query_start,
                                              (r.query.strip().splitlines() or [""])[0], r.relation, r.mode)
                                      for r in rows)


def blocked_by(attempts: list[LockAttempt]) -> str:
    """The lock the last attempts wanted and the sessions holding it, from the latest attempt that saw them."""
    seen = next((a.blockers for a in reversed(attempts) if a.blockers), ())
    if not seen:
        return "the blocking session was not seen (it had gone, or each wait was too short to catch)"
    wanted = f"{seen[0].mode} on {seen[0].relation}"
    return f"it wanted {wanted}, blocked by " + "; ".join(b.describe() for b in seen)
