"""Restore a backup into a new database, or over the original.

Over the original, everything happens in one transaction that only dbmigrate commits.
psql reads its input from us: our prelude (BEGIN, bounded lock waits, the user schemas
dropped), then pg_restore's ``--single-transaction`` script, but for its last bytes,
which hold the script's COMMIT. Those follow only once pg_restore exited 0 and the whole
stored object was read and matched its sha256; just before the COMMIT, a check in the same
transaction compares every table's row count with the manifest's. Any other end (a tool
killed, the storage failing, dbmigrate itself dying, a count that differs) ends psql without
that COMMIT, and the server rolls the transaction back. A safety backup of the current state is taken first unless the
operator declines it.

Into a new database, the copy is checked against the manifest's row counts, and a
failed or mismatching copy is dropped.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

from sqlalchemy import text

from dbmigrate import backup, catalogue, db, fingerprint, guard, pgrestore, pgtools, revisions
from dbmigrate.backup import DumpOptions, ProgressFn
from dbmigrate.catalogue import Manifest
from dbmigrate.errors import BackupFailed, BackupUnreadable, ConfigError, RestoreFailed
from dbmigrate.migrate import SessionLimits
from dbmigrate.storage import CHUNK, Storage
from dbmigrate.target import DatabaseTarget

# Held back from psql until every check passed. pg_restore writes only a few comment lines
# and psql's \unrestrict after its COMMIT; _ends_with_commit proves the COMMIT was held.
TAIL_BYTES = 64 << 10
LOCK_NOT_AVAILABLE = "55P03"  # the SQLSTATE of a lock_timeout


@dataclass
class RestoreResult:
    database: str
    safety_backup: Manifest | None


@dataclass(frozen=True)
class RestorePlan:
    """A restore before it runs: the backup, the database's revision(s) and row counts now, and the
    tables the restore writes (over the database: those whose rows differ from the backup's)."""

    manifest: Manifest
    revisions_now: tuple[str, ...]
    row_counts_now: dict[str, int]  # into a new database: not read (counting every table costs)
    tables_changing: list[str]


def plan(target: DatabaseTarget, storage: Storage, backup_id: str, timeout: float,
         over_original: bool = True) -> RestorePlan:
    """Find the backup (ConfigError if there is no valid one) and, for a restore over the database,
    compare it with the database; touches nothing."""
    manifest = catalogue.find(storage, target, backup_id)
    with db.connect(target, timeout) as conn:
        now = revisions.current_revisions(conn)
        if not over_original:
            return RestorePlan(manifest, now, {}, sorted(manifest.row_counts))
        counts = fingerprint.row_counts(conn)
    return RestorePlan(manifest, now, counts, fingerprint.tables_differing(counts, manifest.row_counts))


def _user_schemas(conn) -> list[str]:
    return list(conn.execute(text(
        "SELECT nspname FROM pg_namespace WHERE nspname NOT LIKE 'pg\\_%' AND nspname <> 'information_schema' "
        "ORDER BY 1"
    )).scalars())


def _check_new_name(name: str) -> None:
    # PostgreSQL would truncate a longer name; a '?' does not survive the connection URL.
    if not name or len(name.encode()) > 63 or "?" in name or "\0" in name:
        raise ConfigError(f"cannot use {name!r} as a database name: 1 to 63 bytes, without '?'")


def into_new_database(
    target: DatabaseTarget, storage: Storage, manifest: Manifest, name: str, timeout: float, jobs: int = 1
) -> RestoreResult:
    _check_new_name(name)
    with db.connect(target, timeout) as conn:
        major, _ = db.server_version(conn)
        if conn.execute(text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": name}).first():
            raise ConfigError(f"database '{name}' already exists: choose another --target-db")
    db.create_database(target, name, timeout)
    try:
        pgrestore.restore_checked(target.with_database(name), storage, manifest, pgtools.find("pg_restore", major),
                                  timeout, jobs)
    except BaseException:
        db.drop_database(target, name, timeout)
        raise
    return RestoreResult(name, None)


def over_original(
    target: DatabaseTarget,
    storage: Storage,
    manifest: Manifest,
    timeout: float,
    take_safety_backup: Callable[[], Manifest] | None,
    lock_timeout_s: float = SessionLimits.lock_timeout_s,
) -> RestoreResult:
    with db.connect(target, timeout) as conn:
        major, _ = db.server_version(conn)
    pg_restore, psql = pgtools.find("pg_restore", major), pgtools.find("psql", major)
    # Fail before the safety backup and before any lock is taken if the backup is unreadable.
    pgrestore.check_stored(storage, manifest, pg_restore)
    safety = take_safety_backup() if take_safety_backup else None
    with db.connect(target, timeout) as conn:
        prelude = _prelude(_user_schemas(conn), lock_timeout_s)
    with _Psql.start(psql, target, lock_timeout_s, timeout) as applier:
        try:
            _replay(applier, prelude, pg_restore, storage, manifest, target)
        except BackupFailed as exc:
            raise RestoreFailed(f"restore failed, database left as it was: {exc}") from None
    return RestoreResult(target.database, safety)


def _prelude(schemas: list[str], lock_timeout_s: float) -> bytes:
    drops = "".join(f"DROP SCHEMA {db.identifier(s)} CASCADE;\n" for s in schemas)
    return (
        "BEGIN;\n"
        # These lock waits queue the application's queries behind them: bounded. (The script's own
        # SET lock_timeout = 0 comes later, once every object it replaces is locked.)
        f"SET LOCAL lock_timeout = {int(lock_timeout_s * 1000)};\n"
        "SET LOCAL client_min_messages = warning;\n"  # no NOTICE per object dropped
        f"{drops}"
        # pg_dump omits CREATE SCHEMA public (initdb makes it), so recreate it as initdb would.
        "CREATE SCHEMA public AUTHORIZATION pg_database_owner;\n"
        # Large objects belong to no schema; the backup brings its own.
        "SELECT pg_catalog.lo_unlink(oid) FROM pg_catalog.pg_largeobject_metadata;\n"
    ).encode()


@dataclass
class _Psql:
    """psql reading a script from us, and how to say why it failed."""

    proc: subprocess.Popen
    stderr: BinaryIO  # a file, not a pipe: psql never waits for us to read its warnings
    target: DatabaseTarget
    lock_timeout_s: float
    timeout: float

    @classmethod
    @contextmanager
    def start(cls, psql: Path, target: DatabaseTarget, lock_timeout_s: float, timeout: float) -> Iterator[_Psql]:
        # libpq_env's PGOPTIONS has the server check the client: a psql that died is noticed mid-statement.
        env = {**os.environ, **target.libpq_env(), "PGAPPNAME": "dbmigrate restore"}
        with tempfile.TemporaryFile() as stderr:
            proc = subprocess.Popen(
                [str(psql), "--no-psqlrc", "--quiet", "--set=ON_ERROR_STOP=1", "--set=VERBOSITY=verbose",
                 "--no-password", "--file=-"],
                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=stderr, env=env,
            )
            yield cls(proc, stderr, target, lock_timeout_s, timeout)

    def failure(self) -> str:
        """Why psql ended on its own: a signal, a lock not granted in time (naming its holders), an error."""
        self.proc.wait()
        self.stderr.seek(0)
        stderr = self.stderr.read().decode(errors="replace")
        if self.proc.returncode > 0 and LOCK_NOT_AVAILABLE in stderr:
            return (f"a lock was not granted within the lock timeout ({self.lock_timeout_s:g}s); "
                    f"held by {_lock_holders(self.target, self.timeout)}")
        return pgrestore.stderr_tail(self.proc, self.target, stderr)


def _replay(applier: _Psql, prelude: bytes, pg_restore: Path, storage: Storage, manifest: Manifest,
            target: DatabaseTarget) -> None:
    """Feed psql the prelude and the backup's script; send the COMMIT only if nothing failed."""
    psql = applier.proc
    try:
        with pgrestore.pg_restore_process(pg_restore, ["--single-transaction", "--file=-"], storage, manifest,
                                          stdout=subprocess.PIPE) as restoring:
            forwarded = pgrestore.in_background(lambda: _forward(prelude, restoring.proc, psql))
        tail = forwarded()
        if tail is None or psql.poll() is not None:
            raise RestoreFailed(applier.failure())
        if restoring.proc.returncode != 0:
            raise RestoreFailed(pgrestore.stderr_tail(restoring.proc, target))
        if restoring.sha256 != manifest.sha256:
            raise BackupUnreadable(f"{manifest.location} does not match its sha256")
        if not _ends_with_commit(tail):
            raise RestoreFailed("pg_restore's script does not end with its COMMIT")
        try:
            psql.stdin.write(_row_counts_checked(tail, manifest.row_counts))
            psql.stdin.close()
        except BrokenPipeError:
            pass  # psql ended first: its own reason follows
    except BaseException:
        psql.kill()  # SIGKILL: psql never reads an end of input it could take for the end of the script
        psql.wait()
        raise
    if psql.wait() != 0:
        raise RestoreFailed(applier.failure())


def _forward(prelude: bytes, restoring: subprocess.Popen, psql: subprocess.Popen) -> bytes | None:
    """Copy the prelude and pg_restore's output into psql, all but the last TAIL_BYTES,
    which are returned. None: psql stopped reading (it failed), and pg_restore is stopped."""
    held = bytearray()  # pg_restore writes in small pieces: gather them, forward a CHUNK at a time
    try:
        psql.stdin.write(prelude)
        while piece := restoring.stdout.read1(CHUNK):
            held += piece
            if len(held) >= TAIL_BYTES + CHUNK:
                psql.stdin.write(memoryview(held)[:-TAIL_BYTES])
                del held[:-TAIL_BYTES]
        psql.stdin.flush()
    except BrokenPipeError:
        restoring.kill()
        return None
    return bytes(held)


def _ends_with_commit(tail: bytes) -> bool:
    """The tail holds the script's COMMIT and, after it, nothing but comments and \\unrestrict."""
    _, commit, rest = tail.rpartition(b"\nCOMMIT;\n")
    return bool(commit) and all(not line.strip() or line.startswith((b"--", b"\\unrestrict "))
                                for line in rest.splitlines())


def _row_counts_checked(tail: bytes, expected: dict[str, int]) -> bytes:
    """The tail with a check of every user table's row count against ``expected`` (the manifest's)
    just before the script's COMMIT, in its transaction: a mismatch raises, psql stops
    (ON_ERROR_STOP) and the server rolls everything back, as a restore into a new database is
    dropped. Tables are named as :func:`dbmigrate.fingerprint.row_counts` names them."""
    script, commit, rest = tail.rpartition(b"\nCOMMIT;\n")
    literal = "'" + json.dumps(expected).replace("'", "''") + "'"  # the script sets standard_conforming_strings
    check = f"""
DO $dbmigrate$
DECLARE
    expected jsonb := {literal};
    restored jsonb := '{{}}';
    t record;
    counted bigint;
    differ text;
BEGIN
    FOR t IN SELECT pg_catalog.format('%I.%I', schemaname, tablename) AS qualified,
                    schemaname || '.' || tablename AS relation
             FROM pg_catalog.pg_tables WHERE schemaname NOT IN ('pg_catalog', 'information_schema') LOOP
        EXECUTE 'SELECT count(*) FROM ' || t.qualified INTO counted;
        restored := restored || jsonb_build_object(t.relation, counted);
    END LOOP;
    SELECT string_agg(relation, ', ' ORDER BY relation) INTO differ
    FROM (SELECT jsonb_object_keys(restored) AS relation UNION SELECT jsonb_object_keys(expected)) AS tables
    WHERE restored -> relation IS DISTINCT FROM expected -> relation;
    IF differ IS NOT NULL THEN
        RAISE EXCEPTION 'row counts after the restore differ from the manifest in %', differ;
    END IF;
END
$dbmigrate$;"""
    return script + check.encode() + commit + rest


def _lock_holders(target: DatabaseTarget, timeout: float) -> str:
    """The sessions holding locks on user tables: pid, application, state and first line of query."""
    with db.connect(target, timeout) as conn:
        rows = conn.execute(text(
            "SELECT DISTINCT a.pid, a.application_name, a.state, split_part(a.query, E'\\n', 1) AS query "
            "FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
            "JOIN pg_class c ON c.oid = l.relation JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE l.granted AND l.pid <> pg_backend_pid() "
            "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
            "AND n.nspname NOT LIKE 'pg\\_%' AND n.nspname <> 'information_schema' ORDER BY a.pid"
        )).all()
    sessions = [f"pid {r.pid} (application '{r.application_name}', {r.state}: {r.query[:100]})" for r in rows]
    return ", ".join(sessions) or "a session that has finished since"


def replace_with_backup(
    target: DatabaseTarget,
    storage: Storage,
    manifest: Manifest,
    timeout: float,
    guard_wait_s: float,
    safety_backup: DumpOptions | None,
    on_progress: ProgressFn | None = None,
    lock_timeout_s: float = SessionLimits.lock_timeout_s,
) -> RestoreResult:
    """Restore over the original as an operator asks for it: holding the migration guard,
    after a backup of the current state (``safety_backup`` None: without one)."""

    def take_safety_backup() -> Manifest:
        return backup.take(target, storage, safety_backup, on_progress, timeout)

    with guard.hold(target, "restore", guard_wait_s, timeout):
        return over_original(target, storage, manifest, timeout, take_safety_backup if safety_backup else None,
                             lock_timeout_s)
