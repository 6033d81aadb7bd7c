"""What a db-migrate-fleet run shows: one fleet artifact (``db-migrate-fleet-<env>``), updated after
the canary and after each wave, with a row per member (server, revision before -> after, status,
duration, backup, the link to the run that migrated it), and the fleet's JSON report, which classes
every member as migrated, failed, rolled back, unchanged or not started, with its revisions.
The report is also written beside the single-database reports (``reports/fleet-*.json``)."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from prefect.artifacts import create_markdown_artifact

from dbmigrate.fleet import Member
from flows.artifacts import artifact_key
from flows.fleet_state import FAILED, MIGRATED, NOT_STARTED, ROLLED_BACK, UNCHANGED

FLOW = "db-migrate-fleet"
CLASSES = (MIGRATED, FAILED, ROLLED_BACK, UNCHANGED, NOT_STARTED)


@dataclass
class FleetReport:
    environment: str
    target_revision: str
    fleet_run: str | None
    requested_by: str
    wave_plan: str
    members: dict[str, dict] = field(default_factory=dict)  # name -> row, in the fleet's order
    started_at: datetime = field(default_factory=lambda: datetime.now(timezone.utc))
    finished_at: datetime | None = None
    stage: str = "starting"  # where the fleet is: canary, approval, wave 3 of 10, finished, stopped
    approval: dict | None = None
    error: str | None = None

    @classmethod
    def of(cls, members: list[Member], **fields) -> FleetReport:
        report = cls(**fields)
        for member in members:
            report.members[member.name] = {"member": member.name, "server": member.server,
                                           "database": member.target.database, "status": NOT_STARTED,
                                           "revision_before": None, "revision_after": None, "target": None,
                                           "started_at": None, "finished_at": None, "duration_s": None,
                                           "backup": None, "rehearsal": None, "run": None, "message": ""}
        return report

    def set(self, name: str, row: dict) -> None:
        """A member's row, from its record (or from what the fleet found itself)."""
        self.members[name] = {**self.members[name], **{k: v for k, v in row.items() if k in self.members[name]}}

    def status(self, name: str) -> str:
        return self.members[name]["status"]

    def named(self, *statuses: str) -> list[str]:
        return [name for name, row in self.members.items() if row["status"] in statuses]

    def counts(self) -> dict[str, int]:
        found = Counter(row["status"] for row in self.members.values())
        return {kind: found.get(kind, 0) for kind in CLASSES if found.get(kind) or kind in (MIGRATED, FAILED)}

    def summary(self) -> str:
        """'100 members: 62 migrated, 1 rolled back, 37 not started'."""
        counts = ", ".join(f"{n} {kind}" for kind, n in self.counts().items() if n)
        return f"{len(self.members)} member{'s' if len(self.members) != 1 else ''}: {counts or 'none'}"

    def as_dict(self) -> dict:
        return {"flow": FLOW, "environment": self.environment, "target_revision": self.target_revision,
                "fleet_run": self.fleet_run, "requested_by": self.requested_by, "wave_plan": self.wave_plan,
                "stage": self.stage, "status": "failed" if self.error else "succeeded" if self.finished_at else
                "running", "error": self.error, "approval": self.approval, "summary": self.summary(),
                "counts": self.counts(), "started_at": self.started_at.isoformat(),
                "finished_at": self.finished_at.isoformat() if self.finished_at else None,
                "members": list(self.members.values())}

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=2, default=str) + "\n"

    def markdown(self) -> str:
        """The fleet artifact: the summary, then a list line per member (the v1 UI clips wide tables)."""
        lines = [f"## db-migrate-fleet {self.environment}: {self.stage}", "",
                 f"- **summary** {self.summary()}", f"- **target** `{self.target_revision}`",
                 f"- **plan** {self.wave_plan}", f"- **requested by** {self.requested_by}"]
        if self.approval:
            lines.append(f"- **approval** {self.approval['decision']} by {self.approval['approver']}")
        if self.error:
            lines.append(f"- **failed** {self.error}")
        lines += ["", "Members:", ""]
        for row in self.members.values():
            took = f", {row['duration_s']} s" if row["duration_s"] is not None else ""
            backup = f", backup `{row['backup']}`" if row["backup"] else ""
            link = f", [run]({row['run']})" if row["run"] else ""
            said = f": {row['message']}" if row["message"] else ""
            lines.append(f"- `{row['member']}` on {row['server']}: `{row['revision_before'] or '-'}` → "
                         f"`{row['revision_after'] or '-'}` **{row['status']}**{took}{backup}{link}{said}")
        return "\n".join(lines)

    def publish(self, stage: str) -> None:
        """The fleet artifact, updated (a new version of the same key) after the canary and each wave."""
        self.stage = stage
        create_markdown_artifact(self.markdown(), key=artifact_key(self.environment, FLOW),
                                 description=f"db-migrate-fleet {self.environment}: {self.summary()}")

    def finish(self, reports_dir: Path, error: str | None) -> Path:
        """The end: the JSON report as an artifact and a file beside the single-database reports."""
        self.finished_at, self.error = datetime.now(timezone.utc), error
        self.publish("stopped" if error else "finished")
        body = self.to_json()
        create_markdown_artifact(f"## db-migrate-fleet {self.environment}: report\n\n```json\n{body}```\n",
                                 key=f"{artifact_key(self.environment, FLOW)}-report",
                                 description=f"db-migrate-fleet {self.environment}: the JSON report")
        reports_dir.mkdir(parents=True, exist_ok=True)
        path = reports_dir / f"fleet-{self.started_at:%Y%m%dT%H%M%S.%f}-{self.environment}.json"
        path.write_text(body)  # owner-only: the flow set its umask (private.owner_only)
        return path
