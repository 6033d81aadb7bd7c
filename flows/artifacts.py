"""What a run shows in Prefect besides its log: the approval request, backup progress and
the summary (with the revisions) under keys per flow and environment. Together with the
flow-run history they are the audit trail."""

from __future__ import annotations

import socket
import time

from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

from dbmigrate import phases, pipeline, revisions


def artifact_key(environment: str, flow: str = "db-migrate") -> str:
    # Artifact keys allow lowercase letters, digits and dashes only.
    return f"{flow}-" + "".join(c if c.isalnum() else "-" for c in environment.lower())


def how_to_approve(to: str) -> str:
    """The last line of an approval request: which fields of the form (flows.common.ApprovalForm) to set."""
    return f"Set **approve** and your **name** to {to}"


def approval_request(target, plan: phases.Plan, sql: str) -> str:
    steps = "\n".join(f"| `{s.revision}` | {s.message} |" for s in plan.steps)
    return (
        f"## Approve {'migration' if plan.upgrade else 'downgrade'} of {target.environment}\n\n"
        f"Database `{target.where}`, from `{revisions.shown(plan.revision_before)}` to `{plan.target}`:\n\n"
        f"| revision | what it does |\n|---|---|\n{steps}\n\n"
        f"<details><summary>SQL</summary>\n\n```sql\n{sql}\n```\n</details>\n\n"
        + how_to_approve("apply these revisions; leave approve unset to reject. Nothing changes until then.")
    )


class BackupProgress:
    """A progress artifact that follows the backup as it streams."""

    def __init__(self, environment: str):
        self.environment, self.artifact_id, self.last = environment, None, 0.0

    def __call__(self, size: int, rate: float) -> None:
        description = f"Backup of {self.environment}: {size / 2**20:.1f} MiB written, {rate / 2**20:.1f} MiB/s"
        # The final size is unknown while pg_dump streams: show motion, never a false 100%.
        progress = min(95.0, 100.0 * (1 - 1 / (1 + size / (256 * 2**20))))
        if self.artifact_id is None:
            self.artifact_id = create_progress_artifact(progress, key=f"{artifact_key(self.environment)}-backup",
                                                        description=description)
        elif time.monotonic() - self.last >= 2:
            update_progress_artifact(self.artifact_id, progress, description=description)
        self.last = time.monotonic()

    def done(self) -> None:
        if self.artifact_id is not None:
            update_progress_artifact(self.artifact_id, 100.0, description=f"Backup of {self.environment}: done")


def summary_markdown(outcome: pipeline.Outcome, flow: str = "db-migrate") -> str:
    r = outcome.report
    lines = [
        f"## {flow} {r.environment}: {r.operation} **{r.status}**",
        "",
        "| | |",
        "|---|---|",
        f"| database | `{r.database['host']}:{r.database['port']}/{r.database['name']}` |",
        f"| requested by | {r.operator} |",
        (f"| revision | `{revisions.shown(r.revision_before)}` → `{revisions.shown(r.revision_after)}` "
         f"(target `{r.target_revision}`) |"),
        f"| started / finished | {r.started_at.isoformat()} / {r.finished_at.isoformat() if r.finished_at else '-'} |",
        f"| duration | {r.duration_s} s |",
    ]
    if r.approval:
        a = r.approval
        lines.append(f"| approval | {'approved' if a.approved else 'rejected'} by {a.approver} ({a.via}) |")
    if r.backup:
        lines.append(f"| backup | `{r.backup.id}` at {r.backup.location}, {r.backup.size_bytes} bytes |")
    if r.restore:
        rs = r.restore
        lines.append(f"| restored from | backup `{rs.backup_id}`; tables whose rows change: "
                     f"{', '.join(rs.tables_changing) or 'none'}; safety backup `{rs.safety_backup or '-'}` |")
    if r.error:
        lines.append(f"| failed in | **{r.error.phase}**: {r.error.message} |")
    if r.rollback:
        rb = r.rollback
        lines.append(f"| rollback | {rb.method or 'none needed'}: {'succeeded' if rb.succeeded else 'FAILED'}, "
                     f"at `{revisions.shown(rb.revision_after)}`; {rb.detail} |")
    checks = [c.as_dict() for c in r.health_checks + r.validation]
    if checks:
        lines += ["", "| check | status | detail | s |", "|---|---|---|---|"]
        lines += [f"| {c['name']} | {c['status']} | {c['detail']} | {c['duration_s']} |" for c in checks]
    lines += ["", f"Report: `{outcome.report_path}`"]
    return "\n".join(lines)


def report_markdown(outcome: pipeline.Outcome, flow: str = "db-migrate") -> str:
    """The run's JSON report for anyone who can read the run (the GitHub workflow fetches it):
    where it is stored, then all of it in one ```json fence. json.dumps escapes newlines, so no
    line inside the fence can close it."""
    report = outcome.report
    if report.copies:  # in S3 beside the backups: reachable from anywhere, unlike the worker's disk
        where = f"Stored at `{report.copies[0]}`."
    elif outcome.report_path is not None:
        where = f"Stored at `{socket.gethostname()}:{outcome.report_path.absolute()}`."
    else:
        where = f"Not stored: {outcome.report_error}."
    return f"## {flow} {report.environment}: report\n\n{where}\n\n```json\n{report.to_json()}```\n"


def publish_report(outcome: pipeline.Outcome, environment: str, flow: str = "db-migrate") -> None:
    create_markdown_artifact(report_markdown(outcome, flow), key=f"{artifact_key(environment, flow)}-report",
                             description=f"{flow} {environment}: the JSON report")


def publish(outcome: pipeline.Outcome, environment: str, progress: BackupProgress | None = None,
            flow: str = "db-migrate") -> None:
    """The run's summary (and its revisions) under the flow's own keys: a db-rollback dry run
    never replaces the last db-migrate summary."""
    if progress is not None:
        progress.done()
    publish_report(outcome, environment, flow)
    key = artifact_key(environment, flow)
    report = outcome.report
    create_markdown_artifact(summary_markdown(outcome, flow), key=key, description=f"{flow} {environment}")
    rows = ([m.as_dict() for m in report.migrations_applied]
            or [{**m.as_dict(), "duration_s": None} for m in report.migrations_planned])
    if rows:  # a restore, or a run refused before planning, has no revisions to show
        create_table_artifact(
            [{"revision": m["revision"], "message": m["message"], "duration_s": m["duration_s"],
              "applied": bool(report.migrations_applied)} for m in rows],
            key=f"{key}-revisions",
            description=f"Revisions {'applied' if report.migrations_applied else 'planned, not applied'}",
        )
