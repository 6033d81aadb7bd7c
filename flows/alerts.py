"""The events the flows emit for alerts: a run failed, rolled back, waits for approval, or a
scheduled check found drift. The automations ``dbmigrate blocks sync`` creates per environment
(:mod:`blocks.alerts`) turn them into notifications; their templates read the payload.

Every event concerns the resource ``dbmigrate.environment.<environment>`` (what an automation of
that environment matches on) and carries, as one-line redacted text from the report: the
environment, the revisions, the phase, the reason and the flow run's link. Prefect relates the
event to the flow run, its flow, deployment and tags itself.
"""

from __future__ import annotations

from prefect import runtime
from prefect.events import emit_event
from prefect.utilities.urls import url_for

from blocks.alerts import resource_id
from dbmigrate import revisions
from dbmigrate.health import FAIL, Check
from dbmigrate.phases import Phase
from dbmigrate.report import Report

FAILED = "dbmigrate.run.failed"
ROLLED_BACK = "dbmigrate.run.rolled-back"
APPROVAL_WAITING = "dbmigrate.approval.waiting"
DRIFT_FOUND = "dbmigrate.drift.found"

# flow runs an event was emitted for: ends_failed_on_error's catch-all adds none after a flow's own
_alerted: set[str] = set()


def emit(event: str, environment: str, revisions_: str, phase: str, reason: str) -> None:
    run_id = runtime.flow_run.id
    if run_id:
        _alerted.add(run_id)
    emit_event(
        event,
        resource={"prefect.resource.id": resource_id(environment), "prefect.resource.name": environment},
        payload={"environment": environment, "revisions": revisions_, "phase": phase, "reason": reason,
                 "flow": runtime.flow_run.flow_name or "", "flow_run": runtime.flow_run.name or "",
                 "flow_run_url": flow_run_url(run_id)},
    )


def flow_run_url(run_id: str | None) -> str:
    """The run's page in the UI, "" without a run (runtime.flow_run.ui_url names a route the UI does
    not have): the alerts' link, and the report's ``run_url`` (history's link)."""
    return (url_for("flow-run", obj_id=run_id) or "") if run_id else ""


def _revisions(report: Report) -> str:
    """``before → target``, and where the run left the database when that is neither."""
    before, after = revisions.shown(report.revision_before), revisions.shown(report.revision_after)
    line = f"{before} → {report.target_revision}"
    return line + (f" (now at {after})" if after not in (before, report.target_revision) else "")


def run_failed(environment: str, report: Report, reason: str) -> None:
    """A run that ended failed with ``report``: rolled back (automatically) if a rollback ran."""
    rolled = report.rollback is not None and report.rollback.performed
    phase = report.error.phase if report.error else "unknown"
    emit(ROLLED_BACK if rolled else FAILED, environment, _revisions(report), phase, reason)


def _parameter(name: str) -> str:
    return str(runtime.flow_run.parameters.get(name) or "")


def failed_without_report(reason: str) -> None:
    """A run that failed before or outside a report (bad input, a busy environment): one event
    per run, none where the flow emitted its own."""
    if runtime.flow_run.id and runtime.flow_run.id not in _alerted and _parameter("environment"):
        emit(FAILED, _parameter("environment"), _parameter("target_revision") or _parameter("to_revision") or "-",
             "run", reason)


def rolled_back(environment: str, report: Report, how: str) -> None:
    """db-rollback changed the database back (a downgrade or a restore), as an operator asked."""
    emit(ROLLED_BACK, environment, _revisions(report), report.operation,
         f"{how} by {report.requested_by or report.operator or 'unknown'}: done")


def approval_waiting(change: str, waiting: str) -> None:
    """The run pauses until someone approves ``change`` in the UI."""
    emit(APPROVAL_WAITING, _parameter("environment"), change, Phase.APPROVAL.value, waiting)


def drift_found(environment: str, checks: list[Check]) -> None:
    """The drift check of a db-health run found the schema changed outside the migrations."""
    drift = next((c for c in checks if c.name == "drift" and c.status == FAIL), None)
    if drift is None:
        return
    version = next((c for c in checks if c.name == "alembic_version"), None)
    at = revisions.shown(version.data.get("current")) if version is not None else "-"
    findings = drift.data.get("findings") or [drift.detail]
    emit(DRIFT_FOUND, environment, f"at {at}", "drift", "; ".join(findings))
