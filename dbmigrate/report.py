"""The JSON audit record of one upgrade, downgrade or restore over the original."""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from dbmigrate.errors import ReportNotWritten

SUCCEEDED, FAILED, DRY_RUN, NOOP = "succeeded", "failed", "dry_run", "noop"


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


@dataclass
class Report:
    operation: str  # upgrade | downgrade | restore
    environment: str
    database: dict
    target_revision: str
    started_at: datetime = field(default_factory=utcnow)
    finished_at: datetime | None = None
    status: str = FAILED
    revision_before: str | None = None
    revision_after: str | None = None
    migrations_planned: list[dict] = field(default_factory=list)
    migrations_applied: list[dict] = field(default_factory=list)
    health_checks: list[dict] = field(default_factory=list)
    backup: dict | None = None
    validation: list[dict] = field(default_factory=list)
    approval: dict | None = None
    rollback: dict | None = None
    restore: dict | None = None  # {backup_id, tables_changing, safety_backup}: a restore from a backup
    error: dict | None = None
    copies: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    operator: str | None = None
    tool_version: str | None = None

    def finish(self, status: str) -> None:
        self.status = status
        self.finished_at = utcnow()

    def fail(self, phase: str, exc: BaseException) -> None:
        self.error = {"type": type(exc).__name__, "message": str(exc), "phase": phase}
        self.finish(FAILED)

    def as_dict(self) -> dict:
        data = asdict(self)
        data["started_at"] = self.started_at.isoformat()
        data["finished_at"] = self.finished_at.isoformat() if self.finished_at else None
        data["duration_s"] = (
            round((self.finished_at - self.started_at).total_seconds(), 3) if self.finished_at else None
        )
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
