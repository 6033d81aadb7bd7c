"""Backups: ``pg_dump`` streamed into storage, checksummed, verified, with a manifest.

A backup is valid only once its manifest exists: the manifest is written last,
after the stored object was read back, its sha256 checked and ``pg_restore --list``
run on it (and, with ``verify_restore``, after a restore into a scratch database
reproduced the row counts). Any failure before that removes the object.

The password reaches pg_dump/pg_restore through their environment, never argv.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import signal
import subprocess
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from dbmigrate import db, fingerprint, pgtools
from dbmigrate.errors import BackupFailed, ConfigError, DbMigrateError, first_line
from dbmigrate.storage import CHUNK, LocalStorage, Storage
from dbmigrate.target import DatabaseTarget

ProgressFn = Callable[[int, float], None]  # (bytes so far, bytes per second)


@dataclass(frozen=True)
class DumpOptions:
    compression: str = "auto"  # auto | zstd[:LEVEL] | gzip[:LEVEL] | none
    verify_restore: bool = False
    lock_wait_timeout_s: float = 60.0  # pg_dump gives up on a table lock held this long
    progress_interval_s: float = 5.0
    jobs: int = 1  # > 1: pg_dump's parallel directory format (local storage only)


@dataclass
class Manifest:
    id: str
    environment: str
    database: str
    key: str
    location: str
    sha256: str
    size_bytes: int
    compression: str
    pg_dump_version: str
    server_version: str
    revision: str | None
    row_counts: dict[str, int]
    duration_s: float
    created_at: str
    checks: dict = field(default_factory=dict)
    verified: bool = False
    verified_at: str | None = None
    format: str = "custom"  # custom: one streamed file; directory: pg_dump -Fd -j N

    @property
    def manifest_key(self) -> str:
        return manifest_key(self.key)

    @property
    def created(self) -> datetime:
        return datetime.fromisoformat(self.created_at)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, body: str) -> Manifest:
        """Raises ValueError saying what is wrong with a damaged manifest."""
        try:
            manifest = cls(**json.loads(body))
        except TypeError as exc:  # not an object, a field missing or unknown
            raise ValueError(str(exc).removeprefix("Manifest.__init__() ")) from None
        for name, kind in _FIELD_TYPES.items():
            if not isinstance(getattr(manifest, name), kind):
                raise ValueError(f"{name} is not a {kind.__name__}")
        if manifest.created.tzinfo is None:  # compared with aware times by prune
            raise ValueError("created_at has no time zone")
        if manifest.format not in ("custom", "directory"):
            raise ValueError(f"unknown format {manifest.format!r}")
        return manifest

    def summary(self) -> dict:
        """What the migration report records of the backup."""
        return {
            "id": self.id,
            "location": self.location,
            "size_bytes": self.size_bytes,
            "sha256": self.sha256,
            "duration_s": self.duration_s,
            "verified": self.verified,
        }


_FIELD_TYPES = {"id": str, "key": str, "size_bytes": int, "created_at": str, "checks": dict, "verified": bool,
                "row_counts": dict, "format": str}


def manifest_key(dump_key: str) -> str:
    return dump_key.removesuffix(".dump").removesuffix(".dir") + ".json"


def backup_id(dump_key: str) -> str:
    return manifest_key(dump_key).rsplit("/", 1)[-1].removesuffix(".json")


def _safe(part: str) -> str:
    """A name as one storage path segment: never empty, '.' or '..' (an environment named '..')."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", part)
    return safe if safe.strip(".") else safe.replace(".", "_") or "_"


def prefix(target: DatabaseTarget) -> str:
    return f"{_safe(target.environment)}/{_safe(target.database)}/"


def backup_key(target: DatabaseTarget, revision: str | None, now: datetime, directory: bool = False) -> str:
    """``<environment>/<database>/<UTC timestamp>-<revision>.dump`` (``.dir`` for the directory format)"""
    stamp = now.astimezone(timezone.utc).strftime("%Y%m%dT%H%M%S.%f")[:-3] + "Z"  # ms: ids stay unique
    return f"{prefix(target)}{stamp}-{_safe(revision or 'base')}.{'dir' if directory else 'dump'}"


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


def take(
    target: DatabaseTarget,
    storage: Storage,
    revision: str | None,
    options: DumpOptions = DumpOptions(),
    on_progress: ProgressFn | None = None,
    timeout: float = db.DEFAULT_CONNECT_TIMEOUT,
) -> Manifest:
    """Dump, store, verify; returns the manifest once written."""
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
        key = backup_key(target, revision, created, directory=parallel)
        # Row counts and pg_dump read one snapshot, so the counts describe exactly what is dumped.
        conn.commit()  # SET TRANSACTION must open a fresh transaction
        conn.execute(text("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY"))
        snapshot = conn.execute(text("SELECT pg_export_snapshot()")).scalar_one()
        conn.execute(text(f"SET LOCAL lock_timeout = {int(options.lock_wait_timeout_s * 1000)}"))
        command = [
            str(pg_dump), f"--compress={compression}", f"--snapshot={snapshot}",
            f"--lock-wait-timeout={int(options.lock_wait_timeout_s * 1000)}", "--no-password",
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
            conn.connection.dbapi_connection.cancel_safe()  # stop counting rows for a backup that failed
            counter.join()
            # pg_dump could not import the snapshot because a count that failed first (a table this
            # role cannot read) aborted the snapshot's transaction: that failure is the cause.
            if count_errors and isinstance(exc, BackupFailed) and "snapshot" in str(exc):
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
            verify_restore(target, storage, manifest, pg_restore, timeout, options.jobs)
        manifest.duration_s = round(time.monotonic() - started, 3)
        storage.write_text(manifest.manifest_key, manifest.to_json())
    except BaseException:
        storage.delete(key)  # a dump without its manifest is never listed: do not keep it either
        raise
    return manifest


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
            raise BackupFailed(f"pg_dump failed: {stderr_tail(proc, target)}")
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
        raise BackupFailed(f"pg_dump failed: {stderr_tail(proc, target, proc.stderr.decode(errors='replace'))}")
    return directory_digest(path)


def directory_digest(path: Path) -> tuple[int, str]:
    """Total size and one sha256 over every file's name and sha256."""
    digest, size = hashlib.sha256(), 0
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(f"{file.relative_to(path)} {file_sha256(file)}\n".encode())
        size += file.stat().st_size
    return size, digest.hexdigest()


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
        raise BackupFailed(f"reading {location} failed: {first_line(exc)}") from None


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


@dataclass
class Restoring:
    proc: subprocess.Popen
    sha256: str | None = None  # of the stored backup, once pg_restore is done (None: not asked for)


def check_stored(storage: Storage, manifest: Manifest, pg_restore: Path) -> None:
    """Re-read the stored backup: its sha256 must match and pg_restore must read it."""
    with pg_restore_process(pg_restore, ["--list"], storage, manifest) as restoring:
        pass
    if restoring.sha256 != manifest.sha256:
        raise BackupFailed(f"verify: {manifest.location} does not match its sha256")
    if restoring.proc.returncode != 0:
        raise BackupFailed(f"verify: pg_restore --list cannot read {manifest.location}")
    manifest.checks.update({"sha256": True, "pg_restore_list": True})


def restore_into(target: DatabaseTarget, storage: Storage, manifest: Manifest, pg_restore: Path,
                 jobs: int = 1) -> None:
    """pg_restore the backup into ``target``, an existing empty database: in one
    transaction, or with ``jobs`` > 1 (directory format only) in parallel."""
    args = [f"--dbname={target.database}", "--exit-on-error", "--no-password"]
    args += [f"--jobs={jobs}"] if jobs > 1 and manifest.format == "directory" else ["--single-transaction"]
    with pg_restore_process(pg_restore, args, storage, manifest, env={**os.environ, **target.libpq_env()}) as r:
        pass
    if r.proc.returncode != 0:
        raise BackupFailed(f"pg_restore failed: {stderr_tail(r.proc, target)}")
    if r.sha256 != manifest.sha256:
        raise BackupFailed(f"{manifest.location} no longer matches its sha256")


def create_database(target: DatabaseTarget, name: str, timeout: float) -> None:
    _outside_transaction(target, f"CREATE DATABASE {db.identifier(name)}", timeout)


def scratch_database(target: DatabaseTarget, label: str, timeout: float) -> DatabaseTarget:
    name = f"dbmigrate_{label}_{uuid.uuid4().hex[:8]}"
    create_database(target, name, timeout)
    return target.with_database(name)


def drop_database(target: DatabaseTarget, name: str, timeout: float) -> None:
    _outside_transaction(target, f"DROP DATABASE IF EXISTS {db.identifier(name)} WITH (FORCE)", timeout)


def _outside_transaction(target: DatabaseTarget, statement: str, timeout: float) -> None:
    with db.connect(target, timeout, isolation_level="AUTOCOMMIT") as conn:
        try:
            db.execute_literal(conn, statement)
        except DBAPIError as exc:  # no permission, a name in use
            raise BackupFailed(f"{statement}: {str(exc.orig).strip().splitlines()[0]}") from None


def restore_checked(target: DatabaseTarget, storage: Storage, manifest: Manifest, pg_restore: Path, timeout: float,
                    jobs: int = 1) -> None:
    """:func:`restore_into`, then the restored row counts must be the manifest's."""
    restore_into(target, storage, manifest, pg_restore, jobs)
    with db.connect(target, timeout) as conn:
        restored = fingerprint.row_counts(conn)
    if restored != manifest.row_counts:
        differ = fingerprint.tables_differing(restored, manifest.row_counts)
        raise BackupFailed(f"row counts after the restore differ from the manifest in {', '.join(differ)}")


def verify_restore(
    target: DatabaseTarget, storage: Storage, manifest: Manifest, pg_restore: Path, timeout: float, jobs: int = 1
) -> None:
    """Restore into a scratch database and compare per-table row counts with the manifest."""
    scratch = scratch_database(target, "verify", timeout)
    try:
        restore_checked(scratch, storage, manifest, pg_restore, timeout, jobs)
    finally:
        drop_database(target, scratch.database, timeout)
    manifest.checks["restore"] = True
    manifest.verified = True
    manifest.verified_at = datetime.now(timezone.utc).isoformat()


@dataclass
class Listed:
    """A backup as the storage shows it now: its manifest and the size of its dump."""

    manifest: Manifest
    stored_size: int | None  # bytes found now; None: the dump is missing

    @property
    def damage(self) -> str | None:
        if self.stored_size is None:
            return "dump missing"
        if self.stored_size != self.manifest.size_bytes:
            return (f"size differs: truncated or corrupted ({self.stored_size} bytes stored, "
                    f"{self.manifest.size_bytes} in the manifest)")
        return None

    @property
    def restorable(self) -> bool:
        checks = self.manifest.checks
        return self.damage is None and bool(self.manifest.verified or (checks.get("sha256") and
                                                                       checks.get("pg_restore_list")))

    @property
    def status(self) -> str:
        return "damaged" if self.damage else "verified" if self.manifest.verified else "checked"

    def as_dict(self) -> dict:
        return {**asdict(self.manifest), "status": self.status, "damage": self.damage,
                "stored_size_bytes": self.stored_size}


@dataclass(frozen=True)
class Skipped:
    """A manifest that cannot be trusted (unreadable, or naming another object): never followed."""

    key: str
    reason: str

    @property
    def id(self) -> str:
        return self.key.rsplit("/", 1)[-1].removesuffix(".json")

    def as_dict(self) -> dict:
        return {"id": self.id, "manifest_key": self.key, "status": "damaged",
                "damage": f"manifest unreadable: {self.reason}"}


@dataclass
class Catalogue:
    backups: list[Listed]  # newest first
    skipped: list[Skipped]

    def newest_restorable(self) -> Listed | None:
        """The newest verified backup whose dump is intact, else the newest intact one that passed its checks."""
        restorable = [b for b in self.backups if b.restorable]
        return next((b for b in restorable if b.manifest.verified), restorable[0] if restorable else None)


def catalogue(storage: Storage, target: DatabaseTarget) -> Catalogue:
    """Every backup of this environment and database, with what a cheap look at the storage
    tells now; a damaged manifest is skipped (and named) rather than hiding the others."""
    sizes = storage.sizes(prefix(target))
    backups, skipped = [], []
    for key in sorted(k for k in sizes if k.endswith(".json")):
        try:
            manifest = _read_manifest(storage, key)
        except (ValueError, ConfigError) as exc:  # truncated, hostile, or a key refused by the storage
            skipped.append(Skipped(key, str(exc)))
            continue
        backups.append(Listed(manifest, _stored_size(manifest, sizes)))
    return Catalogue(sorted(backups, key=lambda b: b.manifest.created, reverse=True), skipped)


def _read_manifest(storage: Storage, key: str) -> Manifest:
    manifest = Manifest.from_json(storage.read_text(key))
    # A manifest describes only the dump beside it: one naming any other key is never followed.
    own = key.removesuffix(".json") + (".dir" if manifest.format == "directory" else ".dump")
    if manifest.key != own or manifest.id != backup_id(own):
        raise ValueError(f"it names {manifest.key!r}, not its own dump {own!r}")
    storage.location(own)  # the storage refuses a dump that leads out of it (a symlink)
    return manifest


def _stored_size(manifest: Manifest, sizes: dict[str, int]) -> int | None:
    if manifest.format == "directory":
        inside = [size for key, size in sizes.items() if key.startswith(manifest.key + "/")]
        return sum(inside) if inside else None
    return sizes.get(manifest.key)


def list_backups(storage: Storage, target: DatabaseTarget) -> list[Manifest]:
    """Valid backups (a trustworthy manifest and an intact-looking dump), newest first."""
    return [b.manifest for b in catalogue(storage, target).backups if b.damage is None]


def find(storage: Storage, target: DatabaseTarget, wanted: str) -> Manifest:
    """The valid backup named ``<id>``, ``<id>.dump`` or ``<environment>/<database>/<id>.dump``."""
    name = wanted.rsplit("/", 1)[-1]
    for suffix in (".dump", ".dir", ".json"):  # ids contain a dot: no Path.stem here
        name = name.removesuffix(suffix)
    listing = catalogue(storage, target)
    for listed in listing.backups:
        if listed.manifest.id == name:
            if listed.damage:
                raise ConfigError(f"backup '{wanted}' is damaged ({listed.damage}): choose another one")
            return listed.manifest
    for skipped in listing.skipped:
        if skipped.id == name:
            raise ConfigError(f"the manifest of backup '{wanted}' is damaged ({skipped.reason}): choose another one")
    raise ConfigError(f"no valid backup '{wanted}' of {target.environment}/{target.database} in {storage!r}")


def check_retention(keep_last: int, keep_days: float | None) -> None:
    """Refuse a retention that could delete every backup, or is not a number of days."""
    if keep_last < 1:
        raise ConfigError(f"--keep-last {keep_last} refused: it could delete every backup; "
                          "keep at least 1 (the newest restorable backup always stays)")
    if keep_days is not None and not (math.isfinite(keep_days) and keep_days > 0):
        raise ConfigError(f"--keep-days must be a finite number of days above 0, not {keep_days}")


def prune(
    storage: Storage, target: DatabaseTarget, keep_last: int, keep_days: float | None, dry_run: bool = False,
    listing: Catalogue | None = None,
) -> list[Manifest]:
    """Delete backups beyond the newest ``keep_last`` (and older than ``keep_days``); the newest
    restorable backup always stays. ``listing``: the catalogue, if the caller already read it.
    Skipped (damaged) manifests are never followed: nothing they name is deleted."""
    check_retention(keep_last, keep_days)
    listing = catalogue(storage, target) if listing is None else listing
    keep = listing.newest_restorable()
    cutoff = _days_ago(keep_days) if keep_days is not None else None
    doomed = [
        b.manifest for b in listing.backups[keep_last:]
        if b is not keep and (cutoff is None or b.manifest.created < cutoff)
    ]
    if not dry_run:
        for m in doomed:
            storage.delete(m.manifest_key)  # manifest first: an object without one is never listed as valid
            storage.delete(m.key)
    return doomed


def _days_ago(days: float) -> datetime:
    try:
        return datetime.now(timezone.utc) - timedelta(days=days)
    except OverflowError:  # before the calendar starts: no backup is that old
        return datetime.min.replace(tzinfo=timezone.utc)
