"""Take a pg_dump backup before a migration (custom format, streamed, checksummed).

The password reaches pg_dump through its environment, never its command line.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from dbmigrate import pgtools
from dbmigrate.errors import BackupFailed
from dbmigrate.target import DatabaseTarget

CHUNK = 1 << 20


@dataclass(frozen=True)
class BackupResult:
    location: str
    size_bytes: int
    sha256: str
    duration_s: float

    def as_dict(self) -> dict:
        return {
            "location": self.location,
            "size_bytes": self.size_bytes,
            "sha256": self.sha256,
            "duration_s": round(self.duration_s, 3),
        }


def _safe(part: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", part) or "_"


def backup_name(target: DatabaseTarget, revision: str | None, now: datetime) -> str:
    """``<environment>/<database>/<UTC timestamp>-<revision>.dump``"""
    stamp = now.astimezone(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"{_safe(target.environment)}/{_safe(target.database)}/{stamp}-{_safe(revision or 'base')}.dump"


def take(target: DatabaseTarget, backup_dir: Path, revision: str | None, server_major: int) -> BackupResult:
    """Stream ``pg_dump -Fc`` into ``backup_dir``; a failed dump leaves no file behind."""
    pg_dump = pgtools.find("pg_dump", server_major)
    path = backup_dir / backup_name(target, revision, datetime.now(timezone.utc))
    started = time.monotonic()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        out = open(path, "xb")  # never overwrite an existing backup
    except OSError as exc:
        raise BackupFailed(f"cannot create backup file {path}: {exc.strerror or exc}") from None
    try:
        with out:
            size, sha256 = _dump_into(pg_dump, target, out)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return BackupResult(str(path), size, sha256, time.monotonic() - started)


def _dump_into(pg_dump: Path, target: DatabaseTarget, out) -> tuple[int, str]:
    digest, size = hashlib.sha256(), 0
    env = {**os.environ, **target.libpq_env()}
    with subprocess.Popen(
        [str(pg_dump), "--format=custom", "--no-password"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    ) as proc:
        try:
            while chunk := proc.stdout.read(CHUNK):
                out.write(chunk)
                digest.update(chunk)
                size += len(chunk)
            out.flush()
            os.fsync(out.fileno())
        except OSError as exc:
            proc.kill()
            raise BackupFailed(f"writing the backup failed: {exc.strerror or exc}") from None
        stderr = proc.stderr.read().decode(errors="replace").strip()
        if proc.wait() != 0:
            last_line = stderr.splitlines()[-1] if stderr else f"exit status {proc.returncode}"
            raise BackupFailed(f"pg_dump failed: {target.redact(last_line)}")
    return size, digest.hexdigest()
