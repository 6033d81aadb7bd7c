"""Restore a backup into a new database, or over the original.

Over the original, everything happens in one transaction: the user schemas are
dropped and the backup's script replayed by psql with ON_ERROR_STOP, so a failed
restore rolls back and leaves the database as it was. A safety backup of the
current state is taken first unless the operator declines it.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from typing import Callable

from sqlalchemy import text

from dbmigrate import backup, db, guard, pgtools, revisions
from dbmigrate.backup import DumpOptions, Manifest, ProgressFn
from dbmigrate.errors import BackupFailed, ConfigError
from dbmigrate.storage import Storage
from dbmigrate.target import DatabaseTarget


@dataclass
class RestoreResult:
    backup_id: str
    database: str
    safety_backup: Manifest | None


def _user_schemas(conn) -> list[str]:
    return list(conn.execute(text(
        "SELECT nspname FROM pg_namespace WHERE nspname NOT LIKE 'pg\\_%' AND nspname <> 'information_schema' "
        "ORDER BY 1"
    )).scalars())


def into_new_database(
    target: DatabaseTarget, storage: Storage, manifest: Manifest, name: str, timeout: float, jobs: int = 1
) -> RestoreResult:
    with db.connect(target, timeout, isolation_level="AUTOCOMMIT") as conn:
        major, _ = db.server_version(conn)
        if conn.execute(text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": name}).first():
            raise ConfigError(f"database '{name}' already exists: choose another --target-db")
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        backup.restore_into(target.with_database(name), storage, manifest, pgtools.find("pg_restore", major), jobs)
    except BaseException:
        backup.drop_database(target, name, timeout)
        raise
    return RestoreResult(manifest.id, name, None)


def over_original(
    target: DatabaseTarget,
    storage: Storage,
    manifest: Manifest,
    timeout: float,
    take_safety_backup: Callable[[], Manifest] | None,
) -> RestoreResult:
    with db.connect(target, timeout) as conn:
        major, _ = db.server_version(conn)
    pg_restore, psql = pgtools.find("pg_restore", major), pgtools.find("psql", major)
    # psql commits at the end of its input: prove the object intact before replaying any of it.
    backup.check_stored(storage, manifest, pg_restore)
    safety = take_safety_backup() if take_safety_backup else None
    with db.connect(target, timeout) as conn:
        schemas = _user_schemas(conn)
    drops = "".join(f'DROP SCHEMA "{s}" CASCADE; ' for s in schemas)
    # pg_dump omits CREATE SCHEMA public (initdb makes it), so recreate it as initdb would.
    prelude = drops + "CREATE SCHEMA public AUTHORIZATION pg_database_owner;"
    psql_command = [str(psql), "--no-psqlrc", "--quiet", "--single-transaction", "--set=ON_ERROR_STOP=1",
                    f"--command={prelude}", "--file=-", "--no-password"]
    # Checked above: psql commits before a checksum taken during the replay could be compared.
    with backup.pg_restore_process(pg_restore, ["--file=-"], storage, manifest, stdout=subprocess.PIPE,
                                   checksum=False) as r:
        applier = subprocess.Popen(psql_command, stdin=r.proc.stdout, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE, env={**os.environ, **target.libpq_env()})
        r.proc.stdout.close()  # psql owns the read end now
    applier.wait()
    if applier.returncode != 0 or r.proc.returncode != 0:
        failed = applier if applier.returncode != 0 else r.proc
        raise BackupFailed(f"restore failed, database left as it was: {backup.stderr_tail(failed, target)}")
    return RestoreResult(manifest.id, target.database, safety)


def replace_with_backup(
    target: DatabaseTarget,
    storage: Storage,
    manifest: Manifest,
    timeout: float,
    guard_wait_s: float,
    safety_backup: DumpOptions | None,
    on_progress: ProgressFn | None = None,
) -> RestoreResult:
    """Restore over the original as an operator asks for it: holding the migration guard,
    after a backup of the current state (``safety_backup`` None: without one)."""

    def take_safety_backup() -> Manifest:
        with db.connect(target, timeout) as conn:
            revision = revisions.current_label(conn)
        return backup.take(target, storage, revision, safety_backup, on_progress, timeout)

    with guard.hold(target, "restore", guard_wait_s, timeout):
        return over_original(target, storage, manifest, timeout, take_safety_backup if safety_backup else None)
