"""Backups: ``pg_dump`` streamed into storage, checksummed, verified, with a manifest
(its format and naming: :mod:`dbmigrate.catalogue`; the read-back checks: :mod:`dbmigrate.pgrestore`).

A backup is valid only once its manifest exists: the manifest is written last,
after the stored object was read back, its sha256 checked and ``pg_restore --list``
run on it (and, with ``verify_restore``, after a restore into a scratch database
reproduced the row counts). Any failure before that removes the object.

The password reaches pg_dump/pg_restore through their environment, never argv.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import BinaryIO, Callable

import psycopg
from sqlalchemy import text

from dbmigrate import db, fingerprint, pgtools, revisions
from dbmigrate.catalogue import Manifest, backup_id, backup_key
from dbmigrate.errors import BackupFailed, ConfigError, DumpFailed, first_line
from dbmigrate.pgrestore import (
    check_stored,
    directory_digest,
    stderr_tail,
    verify_restore,
)
from dbmigrate.storage import LocalStorage, Storage
from dbmigrate.target import DatabaseTarget

ProgressFn = Callable[[int, float], None]  # (bytes so far, bytes per second)


@dataclass(frozen=True)
class DumpOptions:
    compression: str = "auto"  # auto | zstd[:LEVEL] | gzip[:LEVEL] | none
    verify_restore: bool = False
    # pg_dump's wait for a table lock (--lock-wait-timeout), not the guard's nor a statement's lock_timeout
    table_lock_wait_s: float = 60.0
    progress_interval_s: float = 5.0
    jobs: int = 1  # > 1: pg_dump's parallel directory format (local storage only)


class _Tap:
    """A read-only stream that hashes, counts and reports progress as it is read."""

    def __init__(self, stream: BinaryIO, interval_s: float, on_progress: ProgressFn | None):
        self.stream, self.interval_s, self.on_progress = stream, interval_s, on_progress
        self.digest, self.size = hashlib.sha256(), 0
        self.started = self.reported = time.monotonic()

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.digest.update(data)
        self.size += len(data)
        now = time.monotonic()
        if self.on_progress and now - self.reported >= self.interval_s:
            self.reported = now
            self.on_progress(self.size, self.size / max(now - self.started, 1e-6))
        return data

    def readable(self) -> bool:
        return True


def _supports(pg_dump: Path, method: str) -> bool:
    # pg_dump validates --compress before connecting; the socket path below does not exist.
    probe = subprocess.run(
        [str(pg_dump), f"--compress={method}", "--schema-only", "--dbname=postgresql:///x?host=/nonexistent"],
        capture_output=True, text=True, timeout=30,
    )
    return "does not support compression" not in probe.stderr


def compression_for(pg_dump: Path, pg_dump_major: int, requested: str) -> str:
    """The --compress value: zstd when this pg_dump has it, gzip otherwise."""
    if pg_dump_major < 16:  # before 16 pg_dump takes only a gzip level
        return {"auto": "6", "none": "0"}.get(requested, requested.removeprefix("gzip:"))
    if requested == "auto":
        return "zstd:3" if _supports(pg_dump, "zstd") else "gzip:6"
    if not re.fullmatch(r"(zstd|gzip|lz4|none)(:\d+)?", requested):
        raise ConfigError(f"unknown compression '{requested}': use auto, zstd[:LEVEL], gzip[:LEVEL] or none")
    if not _supports(pg_dump, requested):
        raise ConfigError(f"{pg_dump} does not support compression '{requested}'")
    return requested


def take(
    target: DatabaseTarget,
    storage: Storage,
    options: DumpOptions = DumpOptions(),
    on_progress: ProgressFn | None = None,
    timeout: float = db.DEFAULT_CONNECT_TIMEOUT,
    scratch_server: DatabaseTarget | None = None,
) -> Manifest:
    """Dump, store, verify (a verify-restore on ``scratch_server``, else beside the database);
    returns the manifest once written. The manifest's revision and row counts are read in the
    snapshot pg_dump dumps."""
    parallel = options.jobs > 1
    if parallel and not isinstance(storage, LocalStorage):
        raise ConfigError(f"--jobs needs a local directory: {storage!r} takes a single stream")
    started = time.monotonic()
    created = datetime.now(timezone.utc)
    with db.connect(target, timeout) as conn:
        server_major, server_version = db.server_version(conn)
        pg_dump = pgtools.find("pg_dump", server_major)
        pg_restore = pgtools.find("pg_restore", server_major)
        dump_major = pgtools.major_version(pg_dump) or server_major
        compression = compression_for(pg_dump, dump_major, options.compression)
        # The revision, the row counts and pg_dump read one snapshot, so the manifest describes
        # exactly what is dumped, whatever commits meanwhile.
        conn.commit()  # SET TRANSACTION must open a fresh transaction
        conn.execute(text("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY"))
        snapshot = conn.execute(text("SELECT pg_export_snapshot()")).scalar_one()
        conn.execute(text(f"SET LOCAL lock_timeout = {int(options.table_lock_wait_s * 1000)}"))
        revision = revisions.current_label(conn)
        key = backup_key(target, revision, created, directory=parallel)
        command = [
            str(pg_dump), f"--compress={compression}", f"--snapshot={snapshot}",
            f"--lock-wait-timeout={int(options.table_lock_wait_s * 1000)}", "--no-password",
        ]
        counts: dict[str, int] = {}
        count_errors: list[BaseException] = []

        def count_rows() -> None:
            try:
                counts.update(fingerprint.row_counts(conn))
            except BaseException as exc:  # reported by the main thread
                count_errors.append(exc)

        counter = threading.Thread(target=count_rows, name="row-counts")
        counter.start()
        try:
            if parallel:
                size, sha256 = _dump_directory(command, options.jobs, storage, key, target)
            else:
                size, sha256 = _dump_stream(command, storage, key, target, options, on_progress)
        except BaseException as exc:
            _stop_counting(conn)
            counter.join()
            # pg_dump could not import the snapshot because a count that failed first (a table this
            # role cannot read) aborted the snapshot's transaction: that failure is the cause.
            if count_errors and isinstance(exc, DumpFailed) and "snapshot" in exc.reason:
                raise _counting_failed(count_errors[0]) from exc
            raise
        counter.join()
        if count_errors:
            storage.delete(key)
            raise _counting_failed(count_errors[0])
    manifest = Manifest(
        id=backup_id(key), environment=target.environment, database=target.database, key=key,
        location=storage.location(key), sha256=sha256, size_bytes=size,
        compression=compression, pg_dump_version=str(dump_major), server_version=server_version,
        revision=revision, row_counts=counts, duration_s=0.0, created_at=created.isoformat(),
        format="directory" if parallel else "custom",
    )
    try:
        check_stored(storage, manifest, pg_restore)
        if options.verify_restore:
            verify_restore(target, storage, manifest, pg_restore, timeout, options.jobs, scratch_server)
        manifest.duration_s = round(time.monotonic() - started, 3)
        storage.write_text(manifest.manifest_key, manifest.to_json())
    except BaseException:
        storage.delete(key)  # a dump without its manifest is never listed: do not keep it either
        raise
    return manifest


def _stop_counting(conn) -> None:
    """Cancel the row count still running beside a backup that failed. A server gone away (often
    why the backup failed) has nothing running, and saying so must not hide the backup's error."""
    try:
        conn.connection.dbapi_connection.cancel_safe()
    except psycopg.Error:
        pass


def _counting_failed(exc: BaseException) -> BackupFailed:
    return BackupFailed(f"counting rows in the backup's snapshot failed: {first_line(exc)}")


def _dump_stream(command, storage: Storage, key: str, target: DatabaseTarget, options: DumpOptions,
                 on_progress: ProgressFn | None) -> tuple[int, str]:
    """pg_dump -Fc piped straight into the storage."""
    proc = subprocess.Popen([*command, "--format=custom"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, **target.libpq_env()})
    tap = _Tap(proc.stdout, options.progress_interval_s, on_progress)
    try:
        storage.upload(key, tap)
        if proc.wait() != 0:
            storage.delete(key)
            raise DumpFailed(stderr_tail(proc, target))
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return tap.size, tap.digest.hexdigest()


def _dump_directory(command, jobs: int, storage: LocalStorage, key: str, target: DatabaseTarget) -> tuple[int, str]:
    """pg_dump -Fd -j N into a directory of the local storage."""
    path = storage.directory(key)
    proc = subprocess.run([*command, "--format=directory", f"--jobs={jobs}", f"--file={path}"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, **target.libpq_env()})
    if proc.returncode != 0:
        storage.delete(key)
        raise DumpFailed(stderr_tail(proc, target, proc.stderr.decode(errors="replace")))
    return directory_digest(path)
