"""The JSON audit record of one run: an upgrade, a downgrade, a rehearsal or a restore.

A :class:`Report` holds what the run produced as the objects it produced (checks, steps,
the approval, the automatic rollback's result...); :meth:`Report.as_dict` turns them into
the JSON operators and tests read, only when the report is written or printed.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from dbmigrate.errors import ConfirmationRefused, RehearsalFailed, ReportNotWritten

if TYPE_CHECKING:
    from dbmigrate.health import Check
    from dbmigrate.lint import LintResult
    from dbmigrate.lockretry import LockAttempt
    from dbmigrate.migrate import AppliedStep
    from dbmigrate.revisions import PlannedStep

SUCCEEDED, FAILED, DRY_RUN, NOOP = "succeeded", "failed", "dry_run", "noop"
KEPT_UNKNOWN = "could not read which revisions the database kept: run `dbmigrate status`"


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


@dataclass(frozen=True)
class Approval:
    """The answer to "may this change go ahead?", yes or no."""

    approved: bool
    approver: str  # who answered, whether yes or no
    via: str  # how: "--yes", "--approver", "terminal", "prefect-ui", or "policy" (none required)
    comment: str = ""

    def require(self, what: str = "") -> None:
        """Stop here, nothing changed, unless the answer was yes; ``what`` names the change refused."""
        if not self.approved:
            refused = f"not approved by {self.approver}: nothing was changed"
            raise ConfirmationRefused(f"{what} {refused}" if what else refused)


@dataclass(frozen=True)
class BackupSummary:
    """What the report records of the backup a run took (the manifest has the rest)."""

    id: str
    location: str
    size_bytes: int
    sha256: str
    duration_s: float
    verified: bool

    @classmethod
    def of(cls, manifest) -> BackupSummary:
        """From the backup's manifest."""
        return cls(manifest.id, manifest.location, manifest.size_bytes, manifest.sha256, manifest.duration_s,
                   manifest.verified)


@dataclass
class RestoreSummary:
    """A restore from a backup over the database, or into a new one."""

    backup_id: str
    tables_changing: list[str]  # over the database: those whose rows differ from the backup's
    safety_backup: str | None = None  # the id of the backup of the state it replaced
    new_database: str | None = None  # restored into this new database, the database itself untouched

    def as_dict(self) -> dict:
        data = asdict(self)
        if self.new_database is None:
            del data["new_database"]
        return data


@dataclass(frozen=True)
class Failure:
    """Why the run failed: the error's type and one-line message, and the phase it failed in."""

    type: str
    message: str
    phase: str


@dataclass
class AutoRollbackResult:
    performed: bool | None  # None: it could not even run, so whether anything was undone is unknown
    method: str | None  # "downgrade" | "restore" | None when nothing had changed
    succeeded: bool
    revision_after: str | None
    detail: str

    @classmethod
    def could_not_run(cls, reason: str) -> AutoRollbackResult:
        return cls(None, None, False, None, f"rollback could not run: {reason}")


@dataclass(frozen=True)
class HeldLock:
    """A lock a revision took on a table of the restored copy, and how long it was held (until its
    transaction ended): what the application would have waited behind."""

    relation: str
    mode: str  # PostgreSQL's name: AccessExclusiveLock, ShareLock, ...
    held_s: float

    def as_dict(self) -> dict:
        return {"relation": self.relation, "mode": self.mode, "held_s": round(self.held_s, 3)}


@dataclass(frozen=True)
class RehearsedStep:
    """One revision as it ran on the restored copy."""

    revision: str
    message: str
    duration_s: float
    locks: list[HeldLock]
    rows_written: dict[str, int]  # table -> rows inserted, updated or deleted
    tables_rewritten: dict[str, int]  # table -> the rows it held (the backup's count): the whole table rewritten

    def as_dict(self) -> dict:
        return {"revision": self.revision, "message": self.message, "duration_s": round(self.duration_s, 3),
                "locks": [lock.as_dict() for lock in self.locks], "rows_written": self.rows_written,
                "tables_rewritten": self.tables_rewritten}


@dataclass(frozen=True)
class Rehearsal:
    """The pending revisions run first on a copy restored from the run's backup (dbmigrate.rehearsal)."""

    backup_id: str
    restore_s: float
    steps: list[RehearsedStep]
    failed: str | None = None  # which revision failed on the copy, and why
    lock_resolution: str = ""

    def require(self) -> None:
        """Stop here, the database untouched, unless every revision ran on the copy."""
        if self.failed:
            raise RehearsalFailed(f"the rehearsal on a copy restored from backup {self.backup_id} failed: "
                                  f"{self.failed}; the database was not touched")

    def as_dict(self) -> dict:
        return {"backup_id": self.backup_id, "restore_s": round(self.restore_s, 3), "failed": self.failed,
                "steps": [step.as_dict() for step in self.steps], "lock_resolution": self.lock_resolution}


@dataclass
class Report:
    operation: str  # upgrade | downgrade | rehearse | restore
    environment: str
    database: dict
    target_revision: str
    started_at: datetime = field(default_factory=utcnow)
    finished_at: datetime | None = None
    status: str = FAILED
    revision_before: str | None = None
    revision_after: str | None = None
    migrations_planned: list[PlannedStep] = field(default_factory=list)
    migrations_applied: list[AppliedStep] = field(default_factory=list)
    health_checks: list[Check] = field(default_factory=list)
    backup: BackupSummary | None = None
    validation: list[Check] = field(default_factory=list)
    approval: Approval | None = None
    rollback: AutoRollbackResult | None = None
    restore: RestoreSummary | None = None
    error: Failure | None = None
    copies: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    operator: str | None = None  # the user the run's process ran as
    requested_by: str | None = None  # who asked for the run (the operator, for the command line)
    tool_version: str | None = None
    # Why the revision the run left could not be read (revision_after is then None); a warning in the JSON.
    revision_after_unknown: str | None = None
    # Every attempt of the migration under a lock-retry schedule (none without one).
    lock_attempts: list[LockAttempt] = field(default_factory=list)
    lint: LintResult | None = None  # the squawk lint of the pending revisions (upgrades)
    rehearsal: Rehearsal | None = None
    run_url: str | None = None  # the Prefect flow run that made this change, where one did

    def finish(self, status: str) -> None:
        self.status = status
        self.finished_at = utcnow()

    def fail(self, phase: str, exc: BaseException, message: str | None = None) -> None:
        """Record the failure; ``message`` replaces ``str(exc)`` (a redacted one)."""
        self.error = Failure(type(exc).__name__, str(exc) if message is None else message, phase)
        self.finish(FAILED)

    @property
    def duration_s(self) -> float | None:
        return round((self.finished_at - self.started_at).total_seconds(), 3) if self.finished_at else None

    def as_dict(self) -> dict:
        data = {f.name: _plain(getattr(self, f.name)) for f in fields(self) if f.name != "revision_after_unknown"}
        if self.revision_after_unknown is not None:  # it was found before any other warning
            data["warnings"] = [f"{KEPT_UNKNOWN} ({self.revision_after_unknown})", *data["warnings"]]
        data["duration_s"] = self.duration_s
        return data

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=2, default=str) + "\n"

    def file_name(self) -> str:
        stamp = self.started_at.strftime("%Y%m%dT%H%M%S.%f")[:-3] + "Z"
        return f"{stamp}-{re.sub(r'[^A-Za-z0-9._-]+', '_', self.target_revision)}.json"

    def write(self, reports_dir: Path, extra_path: Path | None = None) -> Path:
        """Write to ``reports_dir`` (and a copy to ``extra_path``); returns the main path.
        Raises ReportNotWritten naming every path that failed, after trying them all."""
        path = reports_dir / self.file_name()
        body = self.to_json()
        written, failed = [], []
        for destination in (path, extra_path) if extra_path is not None else (path,):
            try:
                _write_whole(destination, body)
                written.append(destination)
            except OSError as exc:
                failed.append(f"{destination}: {exc.strerror or exc}")
        if failed:
            raise ReportNotWritten(f"the report could not be written to {'; '.join(failed)}",
                                   written[0] if written else None)
        return path


def _write_whole(path: Path, body: str) -> None:
    """All of the report or none of it: a full disk must not leave a truncated report behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".tmp")
    try:
        partial.write_text(body)
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def _plain(value):
    """A report field as JSON: the objects it holds as their dicts (their own ``as_dict`` where
    they round or rename), times as ISO 8601."""
    if isinstance(value, list):
        return [_plain(item) for item in value]
    if isinstance(value, datetime):
        return value.isoformat()
    if hasattr(value, "as_dict"):
        return value.as_dict()
    return asdict(value) if is_dataclass(value) else value
