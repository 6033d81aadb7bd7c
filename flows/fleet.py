"""The db-migrate-fleet flow: every database of an environment's fleet (``blocks.fleet``) migrated by
one migration project, canary first, then in health-gated waves, on the Prefect workers.

Resolve the members -> where each one stands (in parallel) -> lint once -> the **canary** -> the
**approval** where the policy asks for it (one pause for the fleet, showing the canary's outcome)
-> the **waves**, at most C members in flight and H per server -> the fleet report.

Members run in db-migrate-fleet-batch runs (:mod:`flows.fleet_batch`, several members each, see
why there), created with ``run_deployment`` and an idempotency key (this run, the members, the
revision), so a retried or resumed run of this flow gets the same runs back instead of new ones;
never more than C at once, their states read in one request per poll. The first failure stops
the fleet: no member starts after it, those running finish, and this run ends Failed naming the
failed members and where every member is. A batch run lost with its worker (nobody reports: Prefect
shows it Running) is found by its member's presence connection (:mod:`flows.fleet_recovery`).

Resumable: a new run of the same fleet reads each member's database and record first. Members at
the target are unchanged; members of a previous run's batch still running are waited for, not
started again; a member whose record says it was cut short mid-migration and whose database is
neither where it started nor at the target is left alone (an operator decides), and named.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import time
from collections import deque

from prefect import flow, get_run_logger, runtime
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, GlobalConcurrencyLimitUpdate
from prefect.client.schemas.filters import (FlowFilter, FlowFilterName, FlowRunFilter, FlowRunFilterId,
                                            FlowRunFilterState, FlowRunFilterStateType, FlowRunFilterTags)
from prefect.client.schemas.objects import StateType
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound
from sqlalchemy import text

from blocks import load_policy
from blocks.fleet import load_fleet, load_fleet_block
from dbmigrate import db, phases, private, revisions
from dbmigrate.errors import ConfigError, ConfirmationRefused, DbMigrateError, MigrationFailed
from dbmigrate.fleet import Member, MemberState, admit, fleet_status, plan_waves
from dbmigrate.interruption import Undo
from dbmigrate.settings import Settings
from flows import alerts, fleet_recovery
from flows.common import ask_approval, deployed_environment, ends_failed_on_error, settings_for, tag_run, who_asked
from flows.fleet_batch import (FAILED, NOT_STARTED, ROLLED_BACK, RUNNING, UNCHANGED, fleet_limit,
                               fleet_run_tag, fleet_tag, forget_stop, member_tag, read_records, server_limit, stop,
                               stopped)
from flows.fleet_report import FleetReport

POLL_S = 1.0  # how often the fleet reads its batches' states (one request) and whether it was stopped
BATCH_FLOW = "db-migrate-fleet-batch"
ACTIVE = [StateType.SCHEDULED, StateType.PENDING, StateType.RUNNING, StateType.CANCELLING]
# A server at the gate with fewer free connections than this share of max_connections pauses the
# fleet: each member in flight holds several sessions, and the applications need theirs.
HEADROOM = 0.2


def ensure_limits(environment: str, max_in_flight: int, per_server: int, servers: set[str]) -> None:
    """The fleet's cap and each server's, as Prefect global concurrency limits (created, or set to
    this run's values): every member holds one slot of each while it runs."""
    wanted = {fleet_limit(environment): max_in_flight, **{server_limit(environment, s): per_server for s in servers}}
    with get_client(sync_client=True) as client:
        for name, limit in wanted.items():
            try:
                if client.read_global_concurrency_limit_by_name(name).limit != limit:
                    client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(limit=limit))
            except ObjectNotFound:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=limit))


class Batches:
    """The fleet's batch runs in flight (this run's, and a previous run's it waits for)."""

    def __init__(self, environment: str, parameters: dict):
        self.environment, self.parameters = environment, parameters
        self.fleet_run = runtime.flow_run.id
        self.in_flight: dict[str, list[str]] = {}  # flow run id -> its members

    def start(self, names: list[str], label: str) -> None:
        digest = hashlib.sha256("\n".join(names).encode()).hexdigest()[:16]
        run = run_deployment(
            f"{BATCH_FLOW}/{self.environment}", timeout=0, flow_run_name=f"{self.environment}-fleet-{label}",
            parameters={**self.parameters, "members": names},
            tags=[fleet_tag(self.environment), fleet_run_tag(self.fleet_run), self.environment,
                  *(member_tag(name) for name in names)],
            idempotency_key=f"{self.fleet_run}-{self.parameters['target_revision']}-{digest}")
        self.in_flight[str(run.id)] = names

    def adopt_running(self) -> list[str]:
        """A previous run's batches still going (its parent killed, say): waited for, not started
        again. The members they hold."""
        with get_client(sync_client=True) as client:
            runs = client.read_flow_runs(
                flow_filter=FlowFilter(name=FlowFilterName(any_=[BATCH_FLOW])),
                flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[fleet_tag(self.environment)]),
                                              state=FlowRunFilterState(type=FlowRunFilterStateType(any_=ACTIVE))))
        held = []
        for run in runs:
            if fleet_run_tag(self.fleet_run) not in run.tags:
                self.in_flight[str(run.id)] = run.parameters.get("members", [])
                held += self.in_flight[str(run.id)]
        return held

    def ended(self) -> dict[str, object]:
        """The batches that ended since the last call (one request), by id, with their final state."""
        if not self.in_flight:
            return {}
        with get_client(sync_client=True) as client:
            runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=list(self.in_flight))))
        return {str(run.id): run.state for run in runs if run.state is not None and run.state.is_final()}


class Fleet:
    """One run of the fleet: its members, report and batches."""

    def __init__(self, environment: str, members: list[Member], report: FleetReport, batches: Batches,
                 max_in_flight: int, members_per_run: int, settings: Settings, undo: Undo | None = None):
        self.environment, self.members, self.report, self.batches = environment, members, report, batches
        self.by_name = {member.name: member for member in members}
        self.max_in_flight, self.members_per_run, self.settings = max_in_flight, members_per_run, settings
        self.undo = undo  # the policy rolls back automatically: a member a lost run left between revisions is put back
        self.polls = 0  # of the batch runs' states: one request each (with the stop check and the records: three)

    def run(self, names: list[str], label: str) -> None:
        """Migrate ``names`` in batches, at most C batches in flight; return when none is, the first
        failure having stopped the rest."""
        size = self.members_per_run or max(1, math.ceil(len(names) / self.max_in_flight))
        queue = deque(names[start:start + size] for start in range(0, len(names), size))
        number = 0
        while queue or self.batches.in_flight:
            why = stopped(self.batches.fleet_run)
            while queue and not why and len(self.batches.in_flight) < self.max_in_flight:
                number += 1
                self.batches.start(queue.popleft(), f"{label}-{number}")
            if why:
                for batch in queue:
                    for name in batch:
                        self.report.set(name, {"status": NOT_STARTED, "message": f"the fleet stopped: {why}"})
                queue.clear()
            ended = self.batches.ended()
            self.polls += 1
            if ended:
                self.collect(ended)
            elif lost := fleet_recovery.lost_batches(self.environment, self.batches.in_flight, self.by_name):
                self.recover(lost)
            elif self.batches.in_flight:
                time.sleep(POLL_S)

    def collect(self, ended: dict) -> None:
        """The members of ended batches, from their records; a member whose batch ended without
        its final record (the batch crashed, or was cancelled) is failed, with where its database is."""
        names = [name for run_id in ended for name in self.batches.in_flight[run_id]]
        records = read_records(self.environment, names)
        for run_id, state in ended.items():
            for name in self.batches.in_flight.pop(run_id):
                row = records.get(name)
                if row and row.get("child_run") == run_id and row["status"] != RUNNING:
                    self.report.set(name, row)
                elif row and row.get("child_run") == run_id:  # cut short while it ran
                    where = self.where(name)
                    self.report.set(name, {**row, "status": FAILED, "revision_after": where,
                                           "message": f"its run ended {state.name} while it ran: database at "
                                                      f"{where} (from {row.get('revision_before') or '?'} to "
                                                      f"{row.get('target') or '?'})"})
                    stop(self.batches.fleet_run, f"member '{name}': its run ended {state.name}")
                else:
                    self.report.set(name, {"status": NOT_STARTED,
                                           "message": f"its run ended {state.name} before it started"})
                    if not state.is_completed():
                        stop(self.batches.fleet_run, f"batch run ended {state.name}: {state.message}")

    def recover(self, lost: list[str]) -> None:
        """Batch runs whose process is gone with a member in flight (:mod:`flows.fleet_recovery`)."""
        for run_id in lost:
            rows = fleet_recovery.recover(self.environment, run_id, self.batches.in_flight.pop(run_id), self.by_name,
                                          self.undo)
            for name, row in rows.items():
                self.report.set(name, {**row, "revision_after": self.where(name)} if row["status"] == FAILED else row)
            failed = [name for name, row in rows.items() if row["status"] == FAILED]
            stop(self.batches.fleet_run, f"member{'s' if len(failed) > 1 else ''} "
                                         f"{', '.join(repr(name) for name in failed)}: its run was lost")

    def where(self, name: str) -> str:
        member = self.by_name[name]
        try:
            return revisions.shown(phases.current_revision(member.target, self.settings))
        except DbMigrateError as exc:
            return f"unknown ({exc})"


def server_trouble(members: list[Member]) -> str | None:
    """The gate before a wave: each server of the wave answers and has connection headroom."""
    for server in sorted({m.server for m in members}):
        member = next(m for m in members if m.server == server)
        try:
            with db.connect(member.target, 10) as conn:
                used, most = conn.execute(text("SELECT count(*), current_setting('max_connections')::int "
                                               "FROM pg_stat_activity")).one()
        except DbMigrateError as exc:
            return f"server {server} unreachable: {exc}"
        if most - used < HEADROOM * most:
            return f"server {server} has {most - used} free connections of {most}"
    return None


def _to_migrate(states: list[MemberState], records: dict[str, dict], report: FleetReport, target: str,
                fleet_run: str, project) -> list[str]:
    """Class what is already known and return the members to migrate, in order."""
    todo = []
    for state in states:
        row = records.get(state.name) or {}
        if row.get("fleet_run") == fleet_run and row["status"] != RUNNING:  # this run, before it was suspended
            report.set(state.name, row)
        elif state.why is not None:
            report.set(state.name, {"status": NOT_STARTED, "message": state.why})
        elif _at(state, project, target):
            report.set(state.name, {"status": UNCHANGED, "revision_before": state.revision,
                                    "revision_after": state.revision, "message": "already at the target"})
        elif row.get("status") == RUNNING and state.revision not in (row.get("revision_before"), row.get("target")) \
                and row.get("revision_before") is not None:
            report.set(state.name, {**row, "status": FAILED, "revision_after": state.revision,
                                    "message": f"left at {state.revision} between {row['revision_before']} and "
                                               f"{row['target']} by a run cut short: not touched; run db-rollback or "
                                               "finish it, then the fleet again"})
        else:
            todo.append(state.name)
    return todo


def _at(state: MemberState, project, target: str) -> bool:
    if state.current is None:
        return False
    try:
        return not project.plan_upgrade(state.current, target)
    except DbMigrateError:
        return False


@flow(name="db-migrate-fleet", flow_run_name="{environment}-fleet-{target_revision}")
@ends_failed_on_error
def db_migrate_fleet(
    environment: str,
    target_revision: str = "head",
    fleet_block: str | None = None,
    canary: int = 1,
    wave_size: int = 10,
    max_in_flight: int = 8,
    per_server: int = 4,
    members_per_run: int = 0,
    backup: bool = True,
    alembic_config: str | None = None,
    backup_storage: str | None = None,
    requested_by: str = "",
) -> dict:
    """Migrate every database of the environment's fleet: canary first, then in health-gated waves.

    Args:
        environment: development, staging or production: the deployment's. Its policy applies to every member.
        target_revision: Alembic revision to migrate to; 'head' for the latest.
        fleet_block: The DatabaseFleet block's name; default '<environment>-fleet'.
        canary: How many members (the fleet's first) go first, alone; production asks its approval after them.
        wave_size: Members per wave; every member of a wave passed validation before the next wave starts.
        max_in_flight: C, the most members migrating at once (and batch runs scheduled or running).
        per_server: H, the most members migrating at once on one PostgreSQL server (host:port).
        members_per_run: Members per batch run (migrated one after the other in it); 0: a wave spread over C runs.
        backup: Back each member up first. Production refuses false.
        alembic_config: Path of alembic.ini; default ALEMBIC_CONFIG or ./alembic.ini.
        backup_storage: Where backups go: s3-bucket/BLOCK or a directory; default DBMIGRATE_BACKUP_STORAGE.
        requested_by: Who asked for this run (the reports' requested_by); default the run's creator in Prefect.
    """
    private.owner_only()
    deployed = deployed_environment()
    if deployed and deployed != environment:
        raise ConfigError(f"deployment for {deployed} refuses the {environment} fleet")
    if max_in_flight < 1 or per_server < 1 or members_per_run < 0:
        raise ConfigError("max_in_flight and per_server must be at least 1, members_per_run at least 0")
    logger = get_run_logger()
    members = load_fleet(environment, fleet_block)
    skip_unreachable = load_fleet_block(environment, fleet_block).skip_unreachable
    policy = load_policy(environment)
    requester = who_asked(requested_by)
    policy.check(backup)
    policy.check_requester(requester)
    tag_run(environment)
    settings = settings_for(policy, alembic_config, backup_storage)
    project = settings.project(members[0].target)
    waves = plan_waves(members, canary, wave_size)
    fleet_run = runtime.flow_run.id
    report = FleetReport.of(members, environment=environment, target_revision=target_revision, fleet_run=fleet_run,
                            requested_by=requester or "unknown", wave_plan=waves.describe())
    ensure_limits(environment, max_in_flight, per_server, {m.server for m in members})
    parameters = {"environment": environment, "fleet_run": fleet_run, "target_revision": target_revision,
                  "backup": backup, "fleet_block": fleet_block, "alembic_config": alembic_config,
                  "backup_storage": backup_storage, "requested_by": requester or "",
                  "approval_comment": ("the fleet's canary: the fleet asks its approval after it"
                                       if policy.approval_required else "the policy asks no approval")}
    batches = Batches(environment, parameters)
    fleet = Fleet(environment, members, report, batches, max_in_flight, members_per_run, settings,
                  Undo.of(settings) if policy.auto_rollback else None)

    states = fleet_status(members, project, jobs=per_server)
    admit(states, skip_unreachable)
    elsewhere = set(batches.adopt_running())
    todo = set(_to_migrate([s for s in states if s.name not in elsewhere], read_records(environment, fleet.by_name),
                           report, target_revision, fleet_run, project))
    if elsewhere:
        logger.info("waiting for %d member(s) a previous fleet run is still migrating", len(elsewhere))
        fleet.run([], "previous")
    _lint_once(members, todo, project, settings, policy, target_revision)

    try:
        fleet.run([m.name for m in waves.canary if m.name in todo], "canary")
        report.publish("canary")
        if not stopped(fleet_run) and policy.approval_required and todo - {m.name for m in waves.canary}:
            approval = _fleet_approval(report, waves, policy, requester, environment, target_revision)
            batches.parameters.update(approved_by=approval.approver, approval_comment=approval.comment)
        for number, wave in enumerate(waves.waves, 1):
            names = [m.name for m in wave if m.name in todo]
            if stopped(fleet_run) or not names:
                continue
            if trouble := server_trouble([m for m in wave if m.name in todo]):
                _gate_pause(trouble, number, policy, requester, environment)
            fleet.run(names, f"w{number}")
            report.publish(f"wave {number} of {len(waves.waves)}")
    except ConfirmationRefused as refused:
        stop(fleet_run, str(refused))
    why = stopped(fleet_run)
    forget_stop(fleet_run)
    for name in report.named(NOT_STARTED):
        if why and not report.members[name]["message"]:
            report.set(name, {"message": f"the fleet stopped before its wave: {why}"})
    failed = report.named(FAILED, ROLLED_BACK)
    error = None
    if failed or why:
        error = (f"member{'s' if len(failed) > 1 else ''} failed: {', '.join(failed)}; " if failed else "") + \
                f"{why or 'stopped'}: {report.summary()}"
    path = report.finish(settings.reports_dir, error)
    if error:
        alerts.emit(alerts.FAILED, environment, f"→ {target_revision}", "fleet", error)
        raise MigrationFailed(f"fleet stopped: {error}")
    logger.info("%s (%s); %d polls of the batch runs' states", report.summary(), path, fleet.polls)
    return report.as_dict()


def _lint_once(members: list[Member], todo: set[str], project, settings, policy, target_revision: str) -> None:
    """One migration project: its pending revisions linted once, on the first member to migrate;
    findings that block stop the fleet before anything changes."""
    from dbmigrate import lint as linting

    first = next((m for m in members if m.name in todo), None)
    if first is None:
        return
    plan = phases.plan(first.target, project, settings, target_revision, True)
    if plan.steps:
        result = phases.lint(first.target, project, settings, plan, policy.lint_blocking_level)
        if result.blocking():
            raise linting.LintBlocked(linting.blocked_message(result, first.target.environment))


def _fleet_approval(report: FleetReport, waves, policy, requester, environment: str, target_revision: str):
    """One pause for the fleet, after the canary: the canary's outcome and rehearsal timings, the
    member count and the wave plan. A rejection raises ConfirmationRefused: nothing more starts."""
    canary = [report.members[m.name] for m in waves.canary]

    def describe() -> tuple[str, str]:
        change = f"the {environment} fleet to {target_revision} ({len(report.members)} members)"
        lines = [f"## Approve the {environment} fleet to `{target_revision}`", "",
                 f"{len(report.members)} members; {waves.describe()}.", "", "The canary:", ""]
        for row in canary:
            timings = ", ".join(f"`{rev}` {s} s" for rev, s in row.get("rehearsal") or []) or "no rehearsal"
            lines.append(f"- `{row['member']}`: {row['revision_before'] or '-'} → {row['revision_after'] or '-'} "
                         f"**{row['status']}** in {row['duration_s']} s; rehearsal: {timings}")
        lines += ["", "Choose **approve** to migrate the other members in waves, or **reject** to leave them "
                      "untouched (the canary stays migrated), and give your **name**."]
        return change, "\n".join(lines)

    answer = ask_approval(policy, requester, describe)
    report.approval = {"decision": "approved" if answer.approved else "rejected", "approver": answer.approver,
                       "comment": answer.comment}
    if not answer.approved:
        raise ConfirmationRefused(f"rejected by {answer.approver}: the other members were not started, "
                                  "the canary stays migrated")
    return answer


def _gate_pause(trouble: str, number: int, policy, requester, environment: str) -> None:
    """The fleet pauses before wave ``number`` saying why; approve to go on, reject to stop."""
    rules = dataclasses.replace(policy, approval_required=True, approver_must_differ=False)
    answer = ask_approval(rules, requester, lambda: (
        f"wave {number} of the {environment} fleet: {trouble}",
        f"## The {environment} fleet paused before wave {number}\n\n{trouble}.\n\nChoose **approve** to go on, "
        "or **reject** to stop the fleet here, and give your **name**."))
    if not answer.approved:
        raise ConfirmationRefused(f"paused before wave {number} ({trouble}) and rejected by {answer.approver}")
