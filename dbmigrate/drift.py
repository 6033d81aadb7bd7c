"""Drift: does the database's schema still equal what its migrations build?

The revisions the database claims are replayed into a scratch database on the same
server and the two schema hashes compared, so any hand-made change (an index added
in a hurry, a column dropped outside Alembic) shows up, whatever the project.
"""

from __future__ import annotations

import time

from dbmigrate import db, fingerprint, migrate, revisions
from dbmigrate.health import FAIL, OK, WARN, Check
from dbmigrate.target import DatabaseTarget


def check(target: DatabaseTarget, settings) -> Check:
    started = time.monotonic()
    timeout = settings.connect_timeout
    with db.connect(target, timeout) as conn:
        current = revisions.current_revisions(conn)
        actual = fingerprint.take(conn).schema_sha256
    if len(current) > 1:
        return Check("drift", WARN, f"not checked: the database has several revisions ({', '.join(current)})",
                     time.monotonic() - started)
    scratch = db.scratch_database(target, "drift", timeout)
    try:
        if current:
            project = settings.project(scratch)
            migrate.run(project, current[0], upgrade=True, limits=settings.limits, on_step=lambda step: None)
        with db.connect(scratch, timeout) as conn:
            expected = fingerprint.take(conn).schema_sha256
    finally:
        db.drop_database(target, scratch.database, timeout)
    at = current[0] if current else "base"
    if actual == expected:
        return Check("drift", OK, f"schema matches the migrations at {at}", time.monotonic() - started)
    return Check("drift", FAIL, f"schema differs from what the migrations build at {at}: changed outside Alembic",
                 time.monotonic() - started, {"actual_sha256": actual, "expected_sha256": expected})
