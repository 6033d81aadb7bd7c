"""One migration per database at a time.

A session-level advisory lock held on a connection of our own for the whole run
(backup included). It does not depend on the project's env.py, and PostgreSQL
releases it by itself if the process dies.
"""

from __future__ import annotations

import getpass
import socket
import time
from contextlib import contextmanager
from typing import Iterator

from sqlalchemy import text
from sqlalchemy.engine import Connection

from dbmigrate import db
from dbmigrate.errors import GuardBusy
from dbmigrate.target import DatabaseTarget

# Advisory locks are per database, so one fixed key serves every database.
# Two int4 halves: 'dbmg' (0x64626d67) and a version of this protocol.
LOCK_CLASS, LOCK_ID = 0x64626D67, 1
POLL_INTERVAL_S = 0.25


def holder_name(operation: str) -> str:
    """application_name of the guard connection: how a waiting run names the holder."""
    return f"dbmigrate {operation} by {getpass.getuser()}@{socket.gethostname()}"[:63]


def _describe_holder(conn) -> str:
    row = conn.execute(
        text(
            "SELECT a.application_name, a.pid, a.backend_start FROM pg_locks l "
            "JOIN pg_stat_activity a ON a.pid = l.pid "
            "WHERE l.locktype = 'advisory' AND l.classid = :c AND l.objid = :o AND l.granted "
            "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        ),
        {"c": LOCK_CLASS, "o": LOCK_ID},
    ).first()
    if row is None:
        return "another migration"
    return f"'{row.application_name or 'unknown'}' (backend pid {row.pid}, since {row.backend_start:%Y-%m-%d %H:%M:%S %Z})"


@contextmanager
def hold(target: DatabaseTarget, operation: str, wait_s: float, timeout: float) -> Iterator[Connection]:
    """Hold the guard; wait up to ``wait_s`` for it, then raise GuardBusy naming the holder. Yields
    the guard's connection (autocommit), which may read the database meanwhile."""
    with db.connect(target, timeout, connect_args={"application_name": holder_name(operation)}) as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT")
        deadline = time.monotonic() + max(0.0, wait_s)
        params = {"c": LOCK_CLASS, "o": LOCK_ID}
        while not conn.execute(text("SELECT pg_try_advisory_lock(:c, :o)"), params).scalar_one():
            if time.monotonic() >= deadline:
                raise GuardBusy(
                    f"another migration holds the guard on {target.where}: {_describe_holder(conn)}; "
                    f"waited {wait_s:g}s (raise --guard-wait to wait longer)"
                )
            time.sleep(POLL_INTERVAL_S)
        try:
            yield conn
        finally:
            _release(conn, params)


def _release(conn, params: dict) -> None:
    try:
        conn.execute(text("SELECT pg_advisory_unlock(:c, :o)"), params)
    except Exception:
        if not db.is_lost(conn):
            raise
        # The server released the lock with the session: nothing to do, and the error
        # that ended the run (if any) is the one to report.
