"""What a db-migrate run leaves in Prefect: tags, the policy it ran under, the
concurrency limit it held, the approval request, and artifacts (summary, the
revisions applied, backup progress). The flow-run history is the audit trail."""

from __future__ import annotations

import time
from contextlib import ExitStack, contextmanager
from typing import Iterator
from uuid import UUID

from httpx import HTTPStatusError
from prefect import get_run_logger, runtime
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.client.schemas.filters import (
    FlowFilter,
    FlowFilterName,
    FlowRunFilter,
    FlowRunFilterState,
    FlowRunFilterStateType,
    FlowRunFilterTags,
)
from prefect.client.schemas.objects import StateType
from prefect.concurrency.sync import concurrency
from prefect.concurrency.asyncio import ConcurrencySlotAcquisitionError
from prefect.exceptions import ObjectNotFound
from prefect.states import Running

from dbmigrate import phases, pipeline, revisions
from dbmigrate.errors import MigrationFailed
from flows import recovery


def artifact_key(environment: str, flow: str = "db-migrate") -> str:
    # Artifact keys allow lowercase letters, digits and dashes only.
    return f"{flow}-" + "".join(c if c.isalnum() else "-" for c in environment.lower())


def tag_run(environment: str) -> None:
    flow_run_id = runtime.flow_run.id
    if not flow_run_id:
        return
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(UUID(flow_run_id))
        client.update_flow_run(run.id, tags=sorted({*run.tags, environment}))


def deployed_environment() -> str | None:
    """The environment of the deployment this run comes from: a run may override the
    parameter, not the deployment it belongs to."""
    deployment_id = runtime.deployment.id
    if not deployment_id:
        return None
    with get_client(sync_client=True) as client:
        return client.read_deployment(UUID(deployment_id)).parameters.get("environment")


SCHEMA_CHANGING_FLOWS = ("db-migrate", "db-rollback")


def take_back_expired_pause() -> None:
    """Prefect's server fails a run whose pause expired with a message of its own ("The flow
    was failed and never resumed"); set it running again so it ends with ours, which says why.
    A run cancelled meanwhile stays cancelled."""
    try:
        with get_client(sync_client=True) as client:
            run = client.read_flow_run(UUID(runtime.flow_run.id))
            if run.state and (run.state.is_paused() or (run.state.is_failed() and "never resumed" in
                                                        (run.state.message or ""))):
                client.set_flow_run_state(run.id, Running(), force=True)
    except Exception as exc:  # the run then ends with Prefect's message; ours is still in the log and report
        get_run_logger().warning("could not record why the approval ended: %s", exc)


def ensure_concurrency_limit(environment: str) -> str:
    """A global concurrency limit of 1 per environment, created on first use."""
    name = artifact_key(environment)
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
    return name


@contextmanager
def one_run_per_environment(environment: str, wait_s: float) -> Iterator[None]:
    """Hold the environment's concurrency limit (db-migrate and db-rollback share it);
    after ``wait_s`` fail with a message that names the runs holding it.

    Each attempt is one request (``max_retries=0``, no timeout): Prefect's own timed wait
    abandons a request the server may still grant, which leaves a slot that nobody holds
    occupied until its lease lapses (5 minutes), and its Retry-After grows with how long
    slots were held, which overshoots any short wait."""
    limit = ensure_concurrency_limit(environment)
    deadline = time.monotonic() + wait_s
    with ExitStack() as held:
        while True:
            try:
                held.enter_context(concurrency(limit, occupy=1, max_retries=0, strict=True,
                                               raise_on_lease_renewal_failure=False))
                break
            except ConcurrencySlotAcquisitionError as exc:
                denied = isinstance(exc.__cause__, HTTPStatusError) and exc.__cause__.response.status_code == 423
                if not denied:
                    raise MigrationFailed(f"concurrency failed: {exc}") from None
                if recovery.reclaim(environment):
                    continue
                if time.monotonic() >= deadline:
                    raise MigrationFailed(
                        f"concurrency failed: another run for {environment} holds {limit}: {holders(environment)}"
                    ) from None
                time.sleep(1)
        yield


def holders(environment: str) -> str:
    """Names of the other runs of this environment that change its schema and are running or paused."""
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=list(SCHEMA_CHANGING_FLOWS))),
            flow_run_filter=FlowRunFilter(
                tags=FlowRunFilterTags(all_=[environment]),
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING, StateType.PAUSED])),
            ),
        )
    mine = runtime.flow_run.id
    others = [f"'{r.name}' ({r.state_name})" for r in runs if str(r.id) != mine]
    return ", ".join(others) or "a run that has not been identified"


def approval_request(target, plan: phases.Plan, sql: str) -> str:
    steps = "\n".join(f"| `{s.revision}` | {s.message} |" for s in plan.steps)
    return (
        f"## Approve {'migration' if plan.upgrade else 'downgrade'} of {target.environment}\n\n"
        f"Database `{target.where}`, from `{revisions.shown(plan.revision_before)}` to `{plan.target}`:\n\n"
        f"| revision | what it does |\n|---|---|\n{steps}\n\n"
        f"<details><summary>SQL</summary>\n\n```sql\n{sql}\n```\n</details>\n\n"
        "Set **approve** and your **name** to apply these revisions; leave approve unset to reject. "
        "Nothing changes until then."
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


def publish(outcome: pipeline.Outcome, environment: str, progress: BackupProgress | None = None,
            flow: str = "db-migrate") -> None:
    """The run's summary (and its revisions) under the flow's own keys: a db-rollback dry run
    never replaces the last db-migrate summary."""
    if progress is not None:
        progress.done()
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
