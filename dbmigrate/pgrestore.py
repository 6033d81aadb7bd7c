"""pg_restore over a stored backup: reading it back (checksum and ``pg_restore --list``),
restoring it into a database, and saying in one line why a PostgreSQL tool failed.

The password reaches pg_restore through its environment, never argv.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

from dbmigrate import db, fingerprint
from dbmigrate.catalogue import Manifest
from dbmigrate.errors import BackupUnreadable, DbMigrateError, RestoreFailed, first_line
from dbmigrate.storage import CHUNK, Storage
from dbmigrate.target import DatabaseTarget

_NOT_A_REASON = re.compile(r"\b(?:NOTICE|WARNING|INFO|LOG|DETAIL|HINT|CONTEXT|LOCATION):", re.IGNORECASE)
# "pg_restore: error: ", "psql:<stdin>:12: ERROR:  55P03: " (psql with VERBOSITY=verbose names the SQLSTATE)
_TOOL_PREFIX = re.compile(r"^(?:[\w.]+:(?:\S*?:\d+:)? )?(?:error|fatal):\s+(?:[0-9A-Z]{5}: )?", re.IGNORECASE)


def stderr_tail(proc: subprocess.Popen, target: DatabaseTarget, stderr: str | None = None) -> str:
    """What went wrong with a PostgreSQL tool: the signal that killed it, or the line of its
    stderr (``stderr``: already read) that says why it failed."""
    if proc.returncode is not None and proc.returncode < 0:
        number = -proc.returncode
        return f"{Path(proc.args[0]).name} was killed by signal {number} ({signal.Signals(number).name})"
    if stderr is None:
        stderr = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    lines = stderr.strip().splitlines()
    errors = ([line for line in lines if "error:" in line.lower() or "fatal:" in line.lower()]
              or [line for line in lines if not _NOT_A_REASON.search(line)])
    line = _TOOL_PREFIX.sub("", (errors or [f"exit status {proc.returncode}"])[0])
    details = [d.split("detail:", 1)[1].strip() for d in lines if "detail:" in d]
    return target.redact(line + (f" ({'; '.join(details)})" if details else ""))


def feed(storage: Storage, key: str, proc: subprocess.Popen) -> hashlib._Hash:
    """Stream a stored object into proc's stdin, hashing all of it; a reader that
    stops early (pg_restore --list reads only the table of contents) is fine."""
    digest = hashlib.sha256()
    feeding = True
    with storage.open(key) as body:
        while chunk := body.read(CHUNK):
            digest.update(chunk)
            if feeding:
                try:
                    proc.stdin.write(chunk)
                except BrokenPipeError:
                    feeding = False
    try:
        proc.stdin.close()
    except BrokenPipeError:
        pass
    return digest


@contextmanager
def pg_restore_process(pg_restore: Path, args: list[str], storage: Storage, manifest: Manifest,
                       env: dict | None = None, stdout=subprocess.DEVNULL, checksum: bool = True
                       ) -> Iterator[Restoring]:
    """pg_restore ARGS over a stored backup. A local backup is read in place by pg_restore
    and, with ``checksum``, hashed in a thread beside it (no pipe through Python); a remote
    one is streamed into pg_restore's stdin and hashed on the way. On exit it has finished;
    if the caller fails, pg_restore is killed."""
    path = storage.local_path(manifest.key)
    proc = subprocess.Popen([str(pg_restore), *args, *([str(path)] if path is not None else [])],
                            stdin=subprocess.DEVNULL if path is not None else subprocess.PIPE,
                            stdout=stdout, stderr=subprocess.PIPE, env=env)
    running = Restoring(proc)
    try:
        if path is not None:
            digest = in_background(lambda: stored_sha256(path, manifest.format)) if checksum else None
            yield running
            proc.wait()
            with _reading(manifest.location):
                running.sha256 = digest() if digest else None
        else:
            yield running
            with _reading(manifest.location):
                running.sha256 = feed(storage, manifest.key, proc).hexdigest()
            proc.wait()
    except BaseException:
        proc.kill()
        proc.wait()
        raise


@contextmanager
def _reading(location: str) -> Iterator[None]:
    """A backup that cannot be read back, as one line."""
    try:
        yield
    except DbMigrateError:
        raise
    except Exception as exc:  # OSError from a file; botocore's own errors (no common base) from S3
        raise BackupUnreadable(f"reading {location} failed: {first_line(exc)}") from None


def in_background(work: Callable[[], str]) -> Callable[[], str]:
    """Start ``work`` in a daemon thread; call the result to wait for its value. A caller
    that gives up (an error, Ctrl-C) does not wait for it."""
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["value"] = work()
        except BaseException as exc:  # handed to whoever waits
            outcome["error"] = exc

    thread = threading.Thread(target=run, name="sha256", daemon=True)
    thread.start()

    def result() -> str:
        thread.join()
        if "error" in outcome:
            raise outcome["error"]
        return outcome["value"]

    return result


def stored_sha256(path: Path, backup_format: str) -> str:
    return directory_digest(path)[1] if backup_format == "directory" else file_sha256(path)


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def directory_digest(path: Path) -> tuple[int, str]:
    """Total size and one sha256 over every file's name and sha256."""
    digest, size = hashlib.sha256(), 0
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(f"{file.relative_to(path)} {file_sha256(file)}\n".encode())
        size += file.stat().st_size
    return size, digest.hexdigest()


@dataclass
class Restoring:
    proc: subprocess.Popen
    sha256: str | None = None  # of the stored backup, once pg_restore is done (None: not asked for)


def check_stored(storage: Storage, manifest: Manifest, pg_restore: Path) -> None:
    """Re-read the stored backup: its sha256 must match and pg_restore must read it."""
    with pg_restore_process(pg_restore, ["--list"], storage, manifest) as restoring:
        pass
    if restoring.sha256 != manifest.sha256:
        raise BackupUnreadable(f"verify: {manifest.location} does not match its sha256")
    if restoring.proc.returncode != 0:
        raise BackupUnreadable(f"verify: pg_restore --list cannot read {manifest.location}")
    manifest.checks.update({"sha256": True, "pg_restore_list": True})


def restore_into(target: DatabaseTarget, storage: Storage, manifest: Manifest, pg_restore: Path,
                 jobs: int = 1, as_restoring_role: bool = False) -> None:
    """pg_restore the backup into ``target``, an existing empty database: in one
    transaction, or with ``jobs`` > 1 (directory format only) in parallel; ``as_restoring_role``:
    every object owned by the role restoring, and no grants (the backup's roles may not exist there)."""
    args = [f"--dbname={target.database}", "--exit-on-error", "--no-password"]
    args += ["--no-owner", "--no-privileges"] if as_restoring_role else []
    args += [f"--jobs={jobs}"] if jobs > 1 and manifest.format == "directory" else ["--single-transaction"]
    with pg_restore_process(pg_restore, args, storage, manifest, env={**os.environ, **target.libpq_env()}) as r:
        pass
    if r.proc.returncode != 0:
        raise RestoreFailed(f"pg_restore failed: {stderr_tail(r.proc, target)}")
    if r.sha256 != manifest.sha256:
        raise BackupUnreadable(f"{manifest.location} no longer matches its sha256")


def restore_checked(target: DatabaseTarget, storage: Storage, manifest: Manifest, pg_restore: Path, timeout: float,
                    jobs: int = 1, as_restoring_role: bool = False) -> None:
    """:func:`restore_into`, then the restored row counts must be the manifest's."""
    restore_into(target, storage, manifest, pg_restore, jobs, as_restoring_role)
    with db.connect(target, timeout) as conn:
        restored = fingerprint.row_counts(conn)
    if restored != manifest.row_counts:
        differ = fingerprint.tables_differing(restored, manifest.row_counts)
        raise RestoreFailed(f"row counts after the restore differ from the manifest in {', '.join(differ)}")


def verify_restore(
    target: DatabaseTarget, storage: Storage, manifest: Manifest, pg_restore: Path, timeout: float, jobs: int = 1,
    server: DatabaseTarget | None = None,
) -> None:
    """Restore into a scratch database (on ``server``, else beside the database) and compare
    per-table row counts with the manifest."""
    with db.scratch(target, "verify", timeout, server) as scratch:
        restore_checked(scratch, storage, manifest, pg_restore, timeout, jobs, as_restoring_role=server is not None)
    manifest.checks["restore"] = True
    manifest.verified = True
    manifest.verified_at = datetime.now(timezone.utc).isoformat()
