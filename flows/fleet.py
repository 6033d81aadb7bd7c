"""The db-migrate-fleet flow: every database of an environment's fleet (``blocks.fleet``) migrated by
one migration project, canary first, then in health-gated waves, on the Prefect workers.

Resolve the members -> where each one stands (in parallel) -> lint once -> the **canary** -> the
**approval** where the policy asks for it (one pause for the fleet, showing the canary's outcome)
-> the **waves**, at most C members in flight and H per server -> the fleet report.

Members run in lanes (:mod:`flows.fleet_lanes`): at most L long-lived db-migrate-fleet-batch runs
(:mod:`flows.fleet_batch`) for the whole fleet, one per worker by default, never more than C, each
given its share of every wave through a Prefect variable, so a run's fixed cost is paid once per
lane, not per wave; their states read in one request per poll. The first failure stops the fleet:
no member starts after it, those running finish, and this run ends Failed naming the failed members
and where every member is. A lane lost with its worker (nobody reports: Prefect shows it Running)
is found by its presence connection, at work, waiting for a slot or idle (:mod:`flows.fleet_recovery`).

Resumable: a new run of the same fleet reads each member's database and record first. Members at
the target are unchanged; members assigned to a previous run's lanes still running are waited for,
not started again; a member whose record says it was cut short mid-migration and whose database is
neither where it started nor at the target is left alone (an operator decides), and named.
"""

from __future__ import annotations

import dataclasses

from prefect import flow, get_run_logger, runtime
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, GlobalConcurrencyLimitUpdate
from prefect.exceptions import ObjectNotFound
from sqlalchemy import text

from blocks import load_policy
from blocks.fleet import load_fleet, load_fleet_block
from dbmigrate import db, phases, private
from dbmigrate.errors import ConfigError, ConfirmationRefused, DbMigrateError, MigrationFailed
from dbmigrate.fleet import Member, MemberState, admit, fleet_status, plan_waves
from dbmigrate.interruption import Undo
from flows import alerts
from flows.common import ask_approval, deployed_environment, ends_failed_on_error, settings_for, tag_run, who_asked
from flows.fleet_state import (FAILED, NOT_STARTED, ROLLED_BACK, RUNNING, UNCHANGED, fleet_limit, forget_stop,
                               read_records, server_limit, stop, stopped)
from flows.fleet_lanes import Lanes, lane_count
from flows.fleet_report import FleetReport

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


def server_trouble(members: list[Member]) -> tuple[str, str] | None:
    """The gate before a wave: each server of the wave answers and has connection headroom. Trouble
    is (what, why): ``what`` names the server and the kind of trouble, and stays the same while it
    lasts (an approval is asked once for it); ``why`` has the figures."""
    for server in sorted({m.server for m in members}):
        member = next(m for m in members if m.server == server)
        try:
            with db.connect(member.target, 10) as conn:
                used, most = conn.execute(text("SELECT count(*), current_setting('max_connections')::int "
                                               "FROM pg_stat_activity")).one()
        except DbMigrateError as exc:
            return f"server {server} unreachable", str(exc)
        if most - used < HEADROOM * most:
            return (f"server {server} short of free connections",
                    f"{most - used} free connections of {most}, under the {HEADROOM:.0%} the fleet leaves "
                    "to the applications")
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
    lanes: int = 0,
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
        max_in_flight: C, the most members migrating at once (and lanes).
        per_server: H, the most members migrating at once on one PostgreSQL server (host:port).
        lanes: L, the most lanes (runs migrating members one after the other); 0: one per worker online, at most C.
        backup: Back each member up first. Production refuses false.
        alembic_config: Path of alembic.ini; default ALEMBIC_CONFIG or ./alembic.ini.
        backup_storage: Where backups go: s3-bucket/BLOCK or a directory; default DBMIGRATE_BACKUP_STORAGE.
        requested_by: Who asked for this run (the reports' requested_by); default the run's creator in Prefect.
    """
    private.owner_only()
    deployed = deployed_environment()
    if deployed and deployed != environment:
        raise ConfigError(f"deployment for {deployed} refuses the {environment} fleet")
    if max_in_flight < 1 or per_server < 1 or lanes < 0:
        raise ConfigError("max_in_flight and per_server must be at least 1, lanes at least 0")
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
    fleet = Lanes(environment, parameters, lane_count(environment, lanes, max_in_flight), report, members, settings,
                  Undo.of(settings) if policy.auto_rollback else None)

    states = fleet_status(members, project, jobs=per_server)
    admit(states, skip_unreachable)
    elsewhere = set(fleet.adopt_running())
    todo = set(_to_migrate([s for s in states if s.name not in elsewhere], read_records(environment, fleet.by_name),
                           report, target_revision, fleet_run, project))
    if elsewhere:
        logger.info("waiting for %d member(s) a previous fleet run is still migrating", len(elsewhere))
        fleet.wait()
    _lint_once(members, todo, project, settings, policy, target_revision)

    try:
        canary = [m.name for m in waves.canary if m.name in todo]
        approval_after_canary = policy.approval_required and bool(todo - set(canary))
        if canary:  # the lanes the first wave needs start with it, unless an approval comes between
            fleet.start(1 if approval_after_canary else len(todo))
            fleet.run(canary)
        report.publish("canary")
        if not stopped(fleet_run) and approval_after_canary:
            fleet.finish()  # no lane holds a worker through the approval
            approval = _fleet_approval(report, waves, policy, requester, environment, target_revision)
            fleet.parameters.update(approved_by=approval.approver, approval_comment=approval.comment)
        for number, wave in enumerate(waves.waves, 1):
            names = [m.name for m in wave if m.name in todo]
            if stopped(fleet_run) or not names:
                continue
            if trouble := server_trouble([m for m in wave if m.name in todo]):
                fleet.finish()
                _gate_pause(trouble, number, policy, requester, environment)
            fleet.run(names)
            report.publish(f"wave {number} of {len(waves.waves)}")
    except ConfirmationRefused as refused:
        stop(fleet_run, str(refused))
    finally:
        fleet.finish()
        fleet.forget()
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
    logger.info("%s (%s); %d polls of the lanes' states", report.summary(), path, fleet.polls)
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


def _gate_pause(trouble: tuple[str, str], number: int, policy, requester, environment: str) -> None:
    """The fleet pauses before wave ``number`` saying why; approve to go on, reject to stop."""
    what, why = trouble
    get_run_logger().warning("the fleet pauses before wave %d: %s: %s", number, what, why)
    rules = dataclasses.replace(policy, approval_required=True, approver_must_differ=False)
    answer = ask_approval(rules, requester, lambda: (
        f"wave {number} of the {environment} fleet: {what}",
        f"## The {environment} fleet paused before wave {number}\n\n{what}: {why}.\n\nChoose **approve** to "
        "go on, or **reject** to stop the fleet here, and give your **name**."))
    if not answer.approved:
        raise ConfirmationRefused(f"paused before wave {number} ({what}: {why}) and rejected by {answer.approver}")
