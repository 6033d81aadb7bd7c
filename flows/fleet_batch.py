"""The db-migrate-fleet-batch flow: a **lane** of a fleet run, a long-lived flow run that migrates
the members the db-migrate-fleet parent (:mod:`flows.fleet`, :mod:`flows.fleet_lanes`) assigns
it, wave after wave, one after the other, each member its own task running the single-database
pipeline (:func:`dbmigrate.pipeline.execute`: health checks, backup and rehearsal per policy,
migrate, validate, the automatic rollback per policy).

Why long-lived: a deployment run pays a fixed cost (the worker's pick-up, a new Python process
importing Prefect, the pull step, loading the blocks: about 13 s on 2 cores) that a member migrated
in-process does not (about 0.5 s). Why one after the other inside a lane: Alembic's ``op`` and
``context`` are module globals, so two migrations in one process would share them; the fleet's
parallelism is its lanes, on as many workers as there are.

Work reaches a lane through a Prefect variable of its own (``dbmigrate-fleet-<fleet run>-lane-<n>``):
a sequence number and the members, or done. The lane reads it every LANE_POLL_S while idle and ends
when told it is done, when its fleet run stopped or is over (its parent's run final), or after
LANE_IDLE_S with nothing assigned: a parent killed with its worker stays Running in Prefect for
ever, and its lanes must not hold workers as long.

While it migrates, a lane holds a slot of two Prefect global concurrency limits, the fleet's
(``fleet-<env>``, C) and its member's server's (``fleet-<env>-server-<host>-<port>``, H), so two
fleets at once respect them too; it keeps them from one member to the next of its assignment on the
same server and gives them back when the assignment is done. Before a member starts, the lane checks
that the fleet was not stopped: the first member that fails stops its fleet run (a Prefect
variable), and no member starts after that. Members are not linted one by one: the fleet lints its
one project once, before any member runs.

Each member's outcome is a keyed table artifact, its **member record** (``fleet-<env>-member-...``,
:mod:`flows.fleet_state`), written once planned (where it starts from) and when it ends, naming the
lane (``child_run``) and where the lane's presence connection is (:mod:`flows.fleet_presence`): the parent
reads them all in one call, and the next fleet run reads where a member cut short was left.
"""

from __future__ import annotations

import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Iterator
from uuid import UUID

from prefect import flow, get_run_logger, runtime, task
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.states import Failed

from blocks import load_policy
from blocks.fleet import load_fleet
from dbmigrate import auto_rollback, pipeline, private, revisions
from dbmigrate.errors import ConfigError, DbMigrateError
from dbmigrate.fleet import Member
from dbmigrate.policy import Policy
from dbmigrate.report import NOOP, SUCCEEDED, Approval
from dbmigrate.settings import Settings
from flows import concurrency
from flows.alerts import flow_run_url
from flows.common import deployed_environment, ends_failed_on_error, settings_for
from flows.fleet_presence import LanePresence
from flows.fleet_state import (FAILED, LANE_IDLE_S, MIGRATED, NOT_STARTED, ROLLED_BACK, RUNNING,
                               UNCHANGED, assigned, fleet_limit, record, server_limit, stop, stopped)

SLOT_POLL_S = 0.5  # how often a member waiting for a slot asks again (and checks that the fleet goes on)
LANE_POLL_S = 0.5  # how often an idle lane reads its variable
LANE_CHECK_S = 5.0  # how often an idle lane asks whether its fleet run stopped or is over


# --- the caps ---------------------------------------------------------------------------------------

@contextmanager
def member_slots(environment: str, server: str, fleet_run: str) -> Iterator[None]:
    """Hold a slot of the fleet's cap and of the member's server's cap (both or none), asking
    every SLOT_POLL_S (one request each: Prefect's own timed wait abandons requests the server may
    still grant, see flows.concurrency); a fleet run stopped meanwhile raises FleetStopped."""
    def denied() -> float:
        if why := stopped(fleet_run):
            raise FleetStopped(why)
        return SLOT_POLL_S

    with concurrency.slots([fleet_limit(environment), server_limit(environment, server)], denied):
        yield


class FleetStopped(DbMigrateError):
    """The fleet run stopped while this member waited for its slots: it does not start."""


# --- one member -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FleetJob:
    """What every member of a lane shares: the environment's policy and settings, the revision,
    who asked for the fleet and who approved it."""

    environment: str
    fleet_run: str
    target_revision: str
    policy: Policy
    settings: Settings
    requested_by: str
    approval: Approval
    backup: bool = True

    def request(self) -> pipeline.Request:
        return pipeline.Request(
            operation="upgrade", revision=self.target_revision, backup=self.backup,
            lint_blocking_level=self.policy.lint_blocking_level, rehearse=self.policy.rehearse,
            run_url=flow_run_url(runtime.flow_run.id) or None, requested_by=self.requested_by)


def outcome_status(outcome: pipeline.Outcome) -> str:
    report = outcome.report
    if outcome.error is None:
        return UNCHANGED if report.status == NOOP else MIGRATED if report.status == SUCCEEDED else FAILED
    rollback = report.rollback  # succeeded: the database proven back where the run found it (undone or untouched)
    return ROLLED_BACK if rollback is not None and rollback.succeeded else FAILED


class LaneSlots:
    """The lane's slots of the fleet's cap and of one server's cap (:func:`member_slots`), kept from
    one member to the next on the same server (taking and giving them back each time cost 0.54 s of a
    member's 1.1 s in a lane on a busy server, docs/FLEETS.md), in the lane's flow: Prefect 3.8's
    lease-based acquisition waited about 2 s each time inside a task run after the first."""

    def __init__(self, job: FleetJob):
        self.job = job
        self.server: str | None = None
        self.lease: str | None = None
        self._held = ExitStack()

    def hold_for(self, member: Member) -> str | None:
        """The slots for ``member`` held (raises FleetStopped if the fleet stops while it waits); their lease."""
        if member.server != self.server:
            self.give_back()
            self._held.enter_context(member_slots(self.job.environment, member.server, self.job.fleet_run))
            self.server, self.lease = member.server, concurrency.held_lease()
        return self.lease

    def give_back(self) -> None:
        self._held.close()
        self.server = self.lease = None


def migrate_member(job: FleetJob, member: Member, slots: LaneSlots, presence: LanePresence) -> dict:
    """The member through the single-database pipeline (a task named after it), its slots held by
    ``slots``, the lane's presence moved to its server first (the fleet sees a lane waiting for the
    slots). Its final record."""
    presence.move_to(member)
    lease = slots.hold_for(member)  # freed by the fleet should this lane be lost
    if why := stopped(job.fleet_run):  # stopped while this member waited for its slots
        raise FleetStopped(why)
    # task_run_name as a callable: a name is not a format string (it may hold braces)
    return task(lambda: _pipeline(job, member, presence, lease), name="member", task_run_name=lambda: member.name,
                cache_policy=NO_CACHE, persist_result=False)()


def _pipeline(job: FleetJob, member: Member, presence: LanePresence, lease: str | None) -> dict:
    environment, started = job.environment, time.time()

    def run_phase(name, fn, *args):
        if name == "lint":  # the fleet linted its one project once, before any member (flows.fleet)
            return args[0]
        result = fn(*args)
        if name == "plan" and result.steps:  # where it starts: what the next run reads if this one is cut short
            record(environment, member, RUNNING, started_at=started, presence=presence.where(), lease=lease,
                   revision_before=revisions.shown(result.revision_before),
                   target=result.steps[-1].revision, message="migrating")
        return result

    hooks = pipeline.Hooks(
        confirm=lambda plan: job.approval, run_phase=run_phase,
        auto_rollback=auto_rollback.restore_starting_state if job.policy.auto_rollback else None)
    return _final_record(environment, member, pipeline.execute(member.target, job.settings, job.request(), hooks),
                         started, presence=presence.where(), lease=lease)


def _final_record(environment: str, member: Member, outcome: pipeline.Outcome, started: float,
                  presence: str | None, lease: str | None) -> dict:
    """The member's final record, saying where the lane's presence is and the lease of the slots it
    holds (a lane lost before its next member's record has them freed, :mod:`flows.fleet_recovery`)."""
    report = outcome.report
    message = ""
    if report.error:
        message = f"{report.error.phase} failed: {report.error.message}"
        if report.rollback:
            message += f"; rollback: {report.rollback.detail}"
    planned = report.migrations_planned
    return record(environment, member, outcome_status(outcome), revision_before=revisions.shown(report.revision_before),
                  revision_after=revisions.shown(report.revision_after),
                  target=planned[-1].revision if planned else revisions.shown(report.revision_after),
                  started_at=started, finished_at=time.time(), duration_s=round(time.time() - started, 2),
                  backup=report.backup.id if report.backup else None,
                  rehearsal=[[s.revision, round(s.duration_s, 3)] for s in report.rehearsal.steps]
                  if report.rehearsal else None, presence=presence, lease=lease, message=message)


@flow(name="db-migrate-fleet-batch")  # the fleet names each lane when it creates it: <env>-fleet-lane-2
@ends_failed_on_error
def db_migrate_fleet_batch(
    environment: str,
    fleet_run: str,
    lane: int,
    target_revision: str = "head",
    backup: bool = True,
    fleet_block: str | None = None,
    alembic_config: str | None = None,
    backup_storage: str | None = None,
    requested_by: str = "",
    approved_by: str = "",
    approval_comment: str = "",
) -> list[dict] | Failed:
    """A lane of the environment's fleet run: the members assigned to it migrated one after the
    other, until told it is done; started by db-migrate-fleet.

    Args:
        environment: The deployment's environment; every member is a database of it.
        fleet_run: The db-migrate-fleet run this lane belongs to (its id).
        lane: The lane's number in its fleet run (its variable's).
        target_revision: Alembic revision to migrate to; 'head' for the latest.
        backup: Back each member up first (the fleet's policy checked it).
        fleet_block: The DatabaseFleet block's name; default '<environment>-fleet'.
        alembic_config: Path of alembic.ini; default ALEMBIC_CONFIG or ./alembic.ini.
        backup_storage: Where backups go: s3-bucket/BLOCK or a directory; default DBMIGRATE_BACKUP_STORAGE.
        requested_by: Who asked for the fleet (each member's report's requested_by).
        approved_by: Who approved the fleet; empty: the fleet's policy asks no approval (or this is its canary).
        approval_comment: What the approver said, or why no one had to.
    """
    private.owner_only()
    deployed = deployed_environment()
    if deployed and deployed != environment:
        raise ConfigError(f"deployment for {deployed} refuses the {environment} fleet")
    fleet = {member.name: member for member in load_fleet(environment, fleet_block)}
    policy = load_policy(environment)
    approval = Approval(True, approved_by or requested_by or "unknown", "prefect-ui" if approved_by else "fleet",
                        approval_comment)
    job = FleetJob(environment, fleet_run, target_revision, policy,
                   settings_for(policy, alembic_config, backup_storage), requested_by or "unknown", approval, backup)
    logger = get_run_logger()
    results: list[dict] = []
    last_seq, idle_since, checked = 0, time.monotonic(), time.monotonic()
    presence = LanePresence()
    try:
        while True:
            work = assigned(fleet_run, lane)
            if work.get("done"):
                break
            if work.get("seq", 0) > last_seq:
                last_seq = work["seq"]
                results += _migrate(job, fleet, work.get("members", []), logger, presence)
                idle_since = time.monotonic()
                continue
            if time.monotonic() - idle_since > LANE_IDLE_S:
                logger.info("nothing assigned for %g s: the lane ends", LANE_IDLE_S)
                break
            if time.monotonic() - checked > LANE_CHECK_S:
                checked = time.monotonic()
                if why := _fleet_over(fleet_run):
                    logger.info("the lane ends: %s", why)
                    break
            time.sleep(LANE_POLL_S)
    finally:
        presence.close()
    failed = [r["member"] for r in results if r["status"] in (FAILED, ROLLED_BACK)]
    if failed:  # a state, not an exception: the fleet's run alerts once for the fleet, not each lane
        return Failed(message=f"member{'s' if len(failed) > 1 else ''} failed: {', '.join(failed)}")
    return results


def _migrate(job: FleetJob, fleet: dict[str, Member], names: list[str], logger, presence: LanePresence) -> list[dict]:
    """One assignment's members, one after the other: their final records."""
    environment, fleet_run, results = job.environment, job.fleet_run, []
    slots = LaneSlots(job)
    try:
        for name in names:
            member = fleet.get(name)
            if member is None:
                raise ConfigError(f"'{name}' is no longer a member of the {environment} fleet")
            if why := stopped(fleet_run):
                results.append(record(environment, member, NOT_STARTED, message=f"the fleet stopped: {why}"))
                continue
            try:
                result = migrate_member(job, member, slots, presence)
            except FleetStopped as exc:
                result = record(environment, member, NOT_STARTED, message=f"the fleet stopped: {exc}")
            logger.info("%s: %s (%s -> %s) %s", name, result["status"], result["revision_before"],
                        result["revision_after"], result["message"])
            if result["status"] in (FAILED, ROLLED_BACK):
                stop(fleet_run, f"member '{name}' failed")
                slots.give_back()  # no member of this fleet run starts after this one
            results.append(result)
    finally:
        slots.give_back()
    return results


def _fleet_over(fleet_run: str) -> str | None:
    """Why the lane's fleet run gives it no more work: stopped, or its parent's run over."""
    if why := stopped(fleet_run):
        return f"the fleet stopped: {why}"
    with get_client(sync_client=True) as client:
        state = client.read_flow_run(UUID(fleet_run)).state
    return f"its fleet run is {state.name}" if state is not None and state.is_final() else None
