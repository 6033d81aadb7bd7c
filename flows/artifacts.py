"""What a run shows in Prefect besides its log: the approval request, backup progress, the
summary (with the revisions) and the JSON report, under keys per flow and environment.
Together with the flow-run history they are the audit trail."""

from __future__ import annotations

import re
import socket
import textwrap
import time
from pathlib import Path

from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.settings import PREFECT_UI_URL

from dbmigrate import catalogue, phases, pipeline, revisions
from dbmigrate.lint import LintResult
from dbmigrate.report import BackupSummary, Rehearsal, Report
from dbmigrate.settings import Settings


def name_part(environment: str) -> str:
    """The environment in a Prefect name: artifact keys allow lowercase letters, digits and dashes
    only, Variable names letters, digits, dashes and underscores."""
    return "".join(c if c.isalnum() else "-" for c in environment.lower())


def artifact_key(environment: str, flow: str = "db-migrate", kind: str = "") -> str:
    """Every artifact's key: ``db-migrate-production`` (the run's summary), ``...-report``,
    ``...-lint``, ``db-rollback-production-restore``... (the GitHub workflow reads the report's)."""
    return f"{flow}-{name_part(environment)}" + (f"-{kind}" if kind else "")


def how_to_approve(to: str) -> str:
    """The last line of an approval request: how to answer in the form (flows.common.ApprovalForm)."""
    return f"Choose **approve** to {to}, or **reject**, and give your **name**. Nothing changes until then."


def approval_page(target, plan: phases.Plan, reached: str, sql: str, *sections: str) -> str:
    """The approval form's text, with ``sections`` (markdown) before how to answer. The form is a
    narrow dialog that clips wide tables and code (Prefect's v1 UI) and hides ``<details>`` (v2):
    revisions as a list, the SQL wrapped."""
    kind, verb = ("migration", "apply") if plan.upgrade else ("downgrade", "revert")
    steps = "\n".join(f"- `{s.revision}` {s.message}" for s in plan.steps)
    return (
        f"## Approve {kind} of {target.environment}: {revisions.shown(plan.revision_before)} → {reached}\n\n"
        f"Database `{target.where}`. Revisions to {verb}:\n\n{steps}\n\n"
        + lint_markdown(plan.lint)
        + "The SQL (Alembic's offline rendering, long lines wrapped):\n\n"
        f"```sql\n{readable_sql(sql)}\n```\n\n"
        + "".join(f"{section}\n\n" for section in sections if section)
        + how_to_approve(f"{verb} these revisions")
    )


def lock_policy_section(settings: Settings) -> str:
    """What the approver agrees to wait for: how the migration takes its locks (dbmigrate.lockretry)."""
    retries = settings.lock_retries
    if not retries.enabled:
        how = (f"one attempt; each statement waits up to **{settings.limits.lock_timeout_s:g} s** for a lock, "
               "the application's queries on that table queueing behind it meanwhile")
    else:
        how = (f"lock retries: {retries.describe()}; an attempt that times out is rolled back and tried again "
               "(a revision that changed something outside a transaction never is), so the application's "
               f"queries queue at most {max(retries.timeouts_s):g} s behind the migration")
    return f"**Locks**: {how}."


def lint_markdown(lint: LintResult | None) -> str:
    """The lint of the pending revisions, for the approval form and the lint artifact: per
    revision its findings (rule, level, line, statement), its reviewed exceptions, or why it was
    not linted. Lists, not tables: the form clips wide cells."""
    if lint is None:
        return ""
    rules = f"blocking from {lint.blocking_level}" if lint.blocking_level else "findings warn only"
    lines = [f"### Lint (squawk, PostgreSQL {lint.pg_version}, {rules})", ""]
    for rev in lint.revisions:
        if not (rev.findings or rev.excepted or rev.not_linted):
            lines.append(f"- `{rev.revision}`: no finding")
        lines += [f"- `{rev.revision}` **{f.rule}** ({f.level}), SQL line {f.line}: {f.message} `{f.statement}`"
                  if f.line else f"- `{rev.revision}` **{f.rule}** ({f.level}): {f.message}" for f in rev.findings]
        lines += [f"- `{rev.revision}` excepted **{e.rule}** ({e.findings} finding(s)): {e.reason}"
                  for e in rev.excepted]
        if rev.not_linted and not rev.findings:  # else its finding (unrenderable) says so
            lines.append(f"- `{rev.revision}` not linted: {rev.not_linted}")
    return "\n".join(lines) + "\n\n"


def publish_lint(lint: LintResult | None, environment: str) -> None:
    """The lint artifact, ``db-migrate-<environment>-lint``: what the last upgrade's lint found."""
    if lint is not None:
        create_markdown_artifact(lint_markdown(lint), key=artifact_key(environment, kind="lint"),
                                 description=f"db-migrate {environment}: lint of the pending revisions")


def rehearsal_section(rehearsal: Rehearsal | None) -> str:
    """The approval page's account of the rehearsal (empty without one): per revision its duration
    on the restored copy, the table locks it took and how long it held them, what it rewrote or wrote."""
    if rehearsal is None:
        return ""
    lines = [f"### Rehearsed on a copy restored from backup `{rehearsal.backup_id}`\n",
             f"Restored in {rehearsal.restore_s:.1f} s. Per revision, on a copy of this database's own data:\n"]
    for step in rehearsal.steps:
        lines.append(f"- `{step.revision}` {step.duration_s:.3f} s")
        lines += [f"  - lock {lock.mode} on `{lock.relation}`, held {lock.held_s:.3f} s" for lock in step.locks]
        lines += [f"  - rewrote `{table}` ({rows} rows)" for table, rows in step.tables_rewritten.items()]
        lines += [f"  - wrote {rows} rows of `{table}`" for table, rows in step.rows_written.items()]
    return "\n".join(lines)


# The longest SQL line the approval form shows whole: its code block is 424 pixels wide in the v1 UI.
FORM_SQL_WIDTH = 52
# A run of quoted strings, quoted names and other non-blank characters: a line breaks only between them.
_SQL_WORD = re.compile(r"""(?:'(?:[^']|'')*'|"(?:[^"]|"")*"|[^\s'"]+|['"])+""")


def readable_sql(sql: str, width: int = FORM_SQL_WIDTH) -> str:
    """SQL for reading in the form: no blank lines, and a line longer than ``width`` broken at
    blanks outside quotes, continued indented (a comment continued as a comment)."""
    return "\n".join(part for line in sql.splitlines() if line.strip() for part in _wrapped(line, width))


def _wrapped(line: str, width: int) -> list[str]:
    if len(line) <= width:
        return [line]
    indent = line[:len(line) - len(line.lstrip())]
    if line.lstrip().startswith("--"):
        return textwrap.wrap(line, width, subsequent_indent=f"{indent}-- ")
    parts, current = [], ""
    for word in _SQL_WORD.findall(line):
        if not current:
            current = indent + word
        elif len(current) + 1 + len(word) <= width:
            current += " " + word
        else:
            parts.append(current)
            current = f"{indent}    {word}"
    return [*parts, current]


class BackupProgress:
    """A progress artifact that follows the backup as it streams."""

    def __init__(self, environment: str):
        self.environment, self.artifact_id, self.last = environment, None, 0.0

    def __call__(self, size: int, rate: float) -> None:
        description = f"Backup of {self.environment}: {size / 2**20:.1f} MiB written, {rate / 2**20:.1f} MiB/s"
        # The final size is unknown while pg_dump streams: show motion, never a false 100%.
        progress = min(95.0, 100.0 * (1 - 1 / (1 + size / (256 * 2**20))))
        if self.artifact_id is None:
            self.artifact_id = create_progress_artifact(progress, key=artifact_key(self.environment, kind="backup"),
                                                        description=description)
        elif time.monotonic() - self.last >= 2:
            update_progress_artifact(self.artifact_id, progress, description=description)
        self.last = time.monotonic()

    def done(self) -> None:
        if self.artifact_id is not None:
            update_progress_artifact(self.artifact_id, 100.0, description=f"Backup of {self.environment}: done")


def summary_markdown(outcome: pipeline.Outcome, flow: str = "db-migrate") -> str:
    """The run's summary: its facts, then its checks, as lists: the v1 UI clips a table cell
    that does not fit, and a path or an error message often does not."""
    r = outcome.report
    facts = [
        ("database", f"`{r.database['host']}:{r.database['port']}/{r.database['name']}`"),
        ("requested by", r.requested_by or r.operator),
        ("revision", (f"`{revisions.shown(r.revision_before)}` → `{revisions.shown(r.revision_after)}` "
                      f"(target `{r.target_revision}`)")),
        ("started / finished", f"{r.started_at.isoformat()} / {r.finished_at.isoformat() if r.finished_at else '-'}"),
        ("duration", f"{r.duration_s} s"),
    ]
    if r.approval:
        a = r.approval
        facts.append(("approval", (f"{'approved' if a.approved else 'rejected'} by {a.approver} ({a.via})"
                                   f"{f': {a.comment}' if a.comment else ''}")))
    if r.backup:
        facts.append(("backup", backup_line(r.backup)))
    if r.restore:
        rs = r.restore
        facts.append(("restored from", (f"backup `{rs.backup_id}`; tables whose rows change: "
                                        f"{', '.join(rs.tables_changing) or 'none'}; "
                                        f"safety backup `{rs.safety_backup or '-'}`")))
    if r.rehearsal:
        rh = r.rehearsal
        steps = ", ".join(f"`{step.revision}` {step.duration_s:.3f} s" for step in rh.steps) or "no revision ran"
        facts.append(("rehearsal", f"on a copy restored from `{rh.backup_id}`: {steps}"
                                   + (f"; **failed**: {rh.failed}" if rh.failed else "")))
    if r.error:
        facts.append(("failed in", f"**{r.error.phase}**: {r.error.message}"))
    if r.rollback:
        rb = r.rollback
        facts.append(("rollback", (f"{rb.method or 'none needed'}: {'succeeded' if rb.succeeded else 'FAILED'}, "
                                   f"at `{revisions.shown(rb.revision_after)}`; {rb.detail}")))
    written = (f"stored at `{stored_at(outcome.report_path)}`" if outcome.report_path
               else f"NOT stored: {outcome.report_error}")
    facts.append(("report", f"the artifact {report_link(r.environment, flow)}; {written}"))
    lines = [f"## {flow} {r.environment}: {r.operation} **{r.status}**", "",
             *(f"- **{name}** {value}" for name, value in facts)]
    checks = [c.as_dict() for c in r.health_checks + r.validation]
    if checks:
        lines += ["", "Checks:", ""]
        lines += [f"- **{c['name']}** {c['status']}: {c['detail']} ({c['duration_s']} s)" for c in checks]
    return "\n".join(lines)


def backup_line(backup: BackupSummary) -> str:
    """Which backup, where it really is, and what it passed."""
    return (f"`{backup.id}` at `{stored_at(backup.location)}`, {backup.size_bytes} bytes, "
            f"{catalogue.how_checked(backup.verified)}")


def stored_at(location: str | Path) -> str:
    """Where a run left a file, for a reader on another machine: an S3 URL as it is, a local
    path as ``host:/absolute/path`` on the worker."""
    if str(location).startswith("s3://"):
        return str(location)
    return f"{socket.gethostname()}:{Path(location).absolute()}"


def report_link(environment: str, flow: str) -> str:
    """The run's report artifact (``<flow>-<environment>-report``), linked in the UI where its address is known."""
    key = artifact_key(environment, flow, "report")
    ui = PREFECT_UI_URL.value()
    return f"[{key}]({ui}/artifacts/key/{key})" if ui else f"`{key}`"


def report_markdown(outcome: pipeline.Outcome, flow: str = "db-migrate") -> str:
    """The run's JSON report for anyone who can read the run (the GitHub workflow fetches it):
    where it is stored, then all of it in one ```json fence. json.dumps escapes newlines, so no
    line inside the fence can close it."""
    report = outcome.report
    if report.copies:  # in S3 beside the backups: reachable from anywhere, unlike the worker's disk
        where = f"Stored at `{report.copies[0]}`."
    elif outcome.report_path is not None:
        where = f"Stored at `{stored_at(outcome.report_path)}`."
    else:
        where = f"Not stored: {outcome.report_error}."
    return f"## {flow} {report.environment}: report\n\n{where}\n\n```json\n{report.to_json()}```\n"


def publish_report(outcome: pipeline.Outcome, environment: str, flow: str = "db-migrate") -> None:
    create_markdown_artifact(report_markdown(outcome, flow), key=artifact_key(environment, flow, "report"),
                             description=f"{flow} {environment}: the JSON report")


def publish(outcome: pipeline.Outcome, environment: str, progress: BackupProgress | None = None,
            flow: str = "db-migrate") -> None:
    """The run's summary (and its revisions) under the flow's own keys: a db-rollback dry run
    never replaces the last db-migrate summary."""
    if progress is not None:
        progress.done()
    publish_report(outcome, environment, flow)
    publish_lint(outcome.report.lint, environment)
    report = outcome.report
    create_markdown_artifact(summary_markdown(outcome, flow), key=artifact_key(environment, flow),
                             description=f"{flow} {environment}")
    rows = ([m.as_dict() for m in report.migrations_applied]
            or [{**m.as_dict(), "duration_s": None} for m in report.migrations_planned])
    publish_lock_attempts(report, environment, flow)
    if rows:  # a restore, or a run refused before planning, has no revisions to show
        create_table_artifact(
            [{"revision": m["revision"], "message": m["message"], "duration_s": m["duration_s"],
              "applied": bool(report.migrations_applied)} for m in rows],
            key=artifact_key(environment, flow, "revisions"),
            description=f"Revisions {'applied' if report.migrations_applied else 'planned, not applied'}",
        )


def publish_lock_attempts(report: Report, environment: str, flow: str) -> None:
    """Every attempt under the lock-retry schedule: its lock_timeout, wait, outcome and whom it waited for."""
    if not report.lock_attempts:
        return
    create_table_artifact(
        [{"attempt": a.number, "lock_timeout_s": a.lock_timeout_s, "waited_s": round(a.waited_s, 3),
          "outcome": a.outcome, "blocked_by": "; ".join(b.describe() for b in a.blockers) or "-"}
         for a in report.lock_attempts],
        key=artifact_key(environment, flow, "lock-attempts"),
        description=f"Lock attempts: {len(report.lock_attempts)}, {report.lock_attempts[-1].outcome} at the last",
    )
