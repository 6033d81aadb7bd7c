"""Every environment at a glance (``dbmigrate overview``) and the changes applied to each
(``dbmigrate history``), as Flyway's ``info`` and Liquibase's ``history`` show them.

The databases are read in parallel (one connection each, bounded by the connect timeout);
the runs come from the JSON reports under the home's ``reports/`` (a worker's reports are
under its own DBMIGRATE_HOME), the backups from the backup catalogue.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from dbmigrate import catalogue, db, revisions
from dbmigrate.errors import DbMigrateError, first_line
from dbmigrate.settings import Settings
from dbmigrate.target import DatabaseTarget

MAX_PARALLEL = 8


def read_reports(reports_dir: Path) -> list[dict]:
    """The run reports, oldest first; a file that is not a report is left out."""
    found = []
    for path in sorted(reports_dir.glob("*.json")):
        try:
            report = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(report, dict) and "environment" in report and "started_at" in report:
            found.append({**report, "report_path": str(path)})
    return sorted(found, key=lambda report: report["started_at"])


def _runs_of(reports: list[dict], target: DatabaseTarget) -> list[dict]:
    return [r for r in reports if r["environment"] == target.environment
            and (r.get("database") or {}).get("name") == target.database]


def unloadable(environment: str, why: str) -> dict:
    """An environment whose block cannot be loaded, in overview's shape."""
    return {"environment": environment, "database": None, "current": None, "heads": None, "pending": None,
            "last_run": None, "last_good_backup": None, "error": why}


def overview(targets: list[DatabaseTarget], settings: Settings) -> list[dict]:
    """Per environment: its revision, the heads, what is pending, the last run and its outcome,
    the newest restorable backup; a database that cannot be read says why in ``error``."""
    project = settings.project()
    reports, storage = read_reports(settings.reports_dir), settings.storage()

    def one(target: DatabaseTarget) -> dict:
        state = {"environment": target.environment, "database": target.where, "current": None,
                 "heads": project.heads, "pending": None, "last_run": None, "last_good_backup": None, "error": None}
        try:
            with db.connect(target, settings.connect_timeout) as conn:
                current = revisions.current_revisions(conn)
            project.require_known(current)
            state.update(current=list(current), pending=[p.revision for p in project.plan_upgrade(current, "heads")])
            good = [b for b in catalogue.catalogue(storage, target).backups if b.restorable]
            if good:
                m = good[0].manifest
                state["last_good_backup"] = {"id": m.id, "created": m.created.isoformat(), "revision": m.revision}
        except DbMigrateError as exc:
            state["error"] = target.redact(first_line(exc))
        runs = _runs_of(reports, target)
        if runs:
            last = runs[-1]
            state["last_run"] = {"operation": last["operation"], "status": last["status"],
                                 "started_at": last["started_at"], "target_revision": last["target_revision"],
                                 "failed_in": (last.get("error") or {}).get("phase"),
                                 "link": last.get("run_url") or last["report_path"]}
        return state

    with ThreadPoolExecutor(max_workers=max(1, min(MAX_PARALLEL, len(targets)))) as pool:
        return list(pool.map(one, targets))


def overview_lines(states: list[dict]) -> list[str]:
    lines = []
    for s in states:
        lines.append(f"{s['environment']}  ({s['database'] or 'its block could not be loaded'})")
        if s["error"]:
            lines.append(f"  error:    {s['error']}")
        else:
            lines.append(f"  current:  {revisions.shown(s['current']) if s['current'] else 'base'}   "
                         f"head: {', '.join(s['heads'])}   pending: {len(s['pending'])}"
                         + (f" ({', '.join(s['pending'])})" if s["pending"] else ""))
        run = s["last_run"]
        lines.append("  last run: " + (f"{run['operation']} to {run['target_revision']} {run['status']}"
                                       + (f" in {run['failed_in']}" if run["failed_in"] else "")
                                       + f" at {run['started_at']}  {run['link']}" if run else "none recorded here"))
        backup = s["last_good_backup"]
        lines.append("  backup:   " + (f"{backup['id']} at revision {revisions.shown(backup['revision'])}"
                                       if backup else "no restorable backup" if not s["error"] else "unknown"))
    return lines


def history(reports_dir: Path, environment: str | None = None) -> list[dict]:
    """Each revision a run applied (or reverted), oldest first: when, who, how long, the run's
    status and its link (the Prefect flow run, else the report file)."""
    changes = []
    for report in read_reports(reports_dir):
        if environment and report["environment"] != environment:
            continue
        approval = report.get("approval") or {}
        for step in report.get("migrations_applied") or []:
            changes.append({
                "environment": report["environment"], "database": (report.get("database") or {}).get("name"),
                "operation": report["operation"], "revision": step["revision"], "message": step["message"],
                "duration_s": step["duration_s"], "finished_at": report.get("finished_at"),
                "by": approval.get("approver") or report.get("operator"), "run_status": report["status"],
                "link": report.get("run_url") or report["report_path"],
            })
    return changes


def history_lines(changes: list[dict]) -> list[str]:
    return [f"{c['finished_at']}  {c['environment']:12} {c['operation']:9} {c['revision']:12} "
            f"{c['duration_s']:>8.3f}s  by {c['by']}  ({c['run_status']})  {c['message']}  {c['link']}"
            for c in changes]
