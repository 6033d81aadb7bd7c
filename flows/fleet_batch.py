"""The db-migrate-fleet-batch flow: a few members of a fleet, migrated one after the other in one
flow run, each member its own task running the single-database pipeline
(:func:`dbmigrate.pipeline.execute`: health checks, backup and rehearsal per policy, migrate,
validate, the automatic rollback per policy). The db-migrate-fleet flow (:mod:`flows.fleet`) starts
these runs, at most C at once.

Why several members per run: a deployment run pays a fixed cost (the worker's pick-up, a new
Python process importing Prefect, the pull step: about 5 s and 2-4 s of CPU) that a member
migrated in-process does not. Why one after the other inside a run: Alembic's ``op`` and
``context`` are module globals, so two migrations in one process would share them; the fleet's
parallelism is its runs, on as many workers as there are.

While it runs, each member holds two Prefect global concurrency limits, the fleet's
(``fleet-<env>``, C) and its server's (``fleet-<env>-server-<host>-<port>``, H), so two fleets at
once respect them too. Before it starts, it checks that the fleet was not stopped: the first member
that fails stops its fleet run (a Prefect variable), and no member starts after that. Members are
not linted one by one: the fleet lints its one project once, before any member runs.

Each member's outcome is a keyed table artifact, its **member record** (``fleet-<env>-member-...``),
written once planned (where it starts from) and when it ends: the parent reads
them all in one call, and the next fleet run reads where a member cut short was left.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

from prefect import flow, get_run_logger, runtime, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactCollectionFilter, ArtifactCollectionFilterKey
from prefect.states import Failed
from prefect.variables import Variable

from blocks import load_policy
from blocks.fleet import load_fleet
from dbmigrate import auto_rollback, pipeline, private, revisions
from dbmigrate.errors import ConfigError, DbMigrateError
from dbmigrate.fleet import Member
from dbmigrate.policy import Policy
from dbmigrate.report import NOOP, SUCCEEDED, Approval
from dbmigrate.settings import Settings
from flows import concurrency, recovery
from flows.alerts import flow_run_url
from flows.common import deployed_environment, ends_failed_on_error, settings_for

# A member's status, as the member record and the fleet's report class it.
RUNNING, MIGRATED, FAILED, ROLLED_BACK, UNCHANGED, NOT_STARTED = (
    "running", "migrated", "failed", "rolled back", "unchanged", "not started")
SLOT_POLL_S = 0.5  # how often a member waiting for a slot asks again (and checks that the fleet goes on)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def fleet_tag(environment: str) -> str:
    return f"fleet:{environment}"


def fleet_run_tag(fleet_run: str) -> str:
    return f"fleet-run:{fleet_run}"


def member_tag(name: str) -> str:
    return f"member:{name}"


def fleet_limit(environment: str) -> str:
    return f"fleet-{_slug(environment)}"


def server_limit(environment: str, server: str) -> str:
    return f"fleet-{_slug(environment)}-server-{_slug(server)}"


def member_key(environment: str, name: str) -> str:
    """The member record's artifact key: lowercase letters, digits and dashes only, so the name is
    slugged and a digest keeps two names that slug alike apart."""
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"fleet-{_slug(environment)}-member-{_slug(name)[:40]}-{digest}"


# --- stopping a fleet run -------------------------------------------------------------------------

def _stop_variable(fleet_run: str) -> str:
    return f"dbmigrate-fleet-stop-{fleet_run}"


def stopped(fleet_run: str) -> str | None:
    """Why the fleet run stopped (the first failed member), or None while it goes on."""
    value = Variable.get(_stop_variable(fleet_run), default=None)
    return str(value) if value else None


def stop(fleet_run: str, why: str) -> None:
    """No member of this fleet run starts from now on; the first reason given stays."""
    try:
        Variable.set(_stop_variable(fleet_run), why, overwrite=False)
    except ValueError:  # already stopped: the first failure is the one the report names
        pass


def forget_stop(fleet_run: str) -> None:
    Variable.unset(_stop_variable(fleet_run))


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


# --- member records ---------------------------------------------------------------------------------

def record(environment: str, member: Member, status: str, **fields) -> dict:
    """Write the member's record (its keyed table artifact) and return it."""
    row = {"member": member.name, "server": member.server, "database": member.target.database, "status": status,
           "revision_before": None, "revision_after": None, "target": None, "duration_s": None, "backup": None,
           "run": flow_run_url(runtime.flow_run.id) or None, "child_run": runtime.flow_run.id,
           "fleet_run": runtime.flow_run.parameters.get("fleet_run"), "message": "", **fields}
    create_table_artifact([row], key=member_key(environment, member.name),
                          description=f"fleet {environment}: member {member.name}: {status}")
    return row


def read_records(environment: str, names: list[str]) -> dict[str, dict]:
    """The latest record of each member named (those that have one), in one request per 200 members."""
    keys = {member_key(environment, name): name for name in names}
    found: dict[str, dict] = {}
    with get_client(sync_client=True) as client:
        every = list(keys)
        for start in range(0, len(every), 200):
            wanted = ArtifactCollectionFilterKey(any_=every[start:start + 200])
            collections = client.read_latest_artifacts(artifact_filter=ArtifactCollectionFilter(key=wanted), limit=200)
            for collection in collections:
                [row] = json.loads(collection.data) if isinstance(collection.data, str) else collection.data
                found[keys[collection.key]] = row
    return found


# --- one member -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FleetJob:
    """What every member of a batch shares: the environment's policy and settings, the revision,
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


def migrate_member(job: FleetJob, member: Member) -> dict:
    """The member through the single-database pipeline, holding its slots and, on its server, the
    batch run's presence connection (:func:`flows.recovery.presence`) until its final record is
    written: a record saying RUNNING without the presence is a batch run lost with its process
    (:mod:`flows.fleet_recovery`). Its final record."""
    environment = job.environment
    with member_slots(environment, member.server, job.fleet_run), recovery.presence(member.target) as present:
        if why := stopped(job.fleet_run):  # stopped while this member waited for its slots
            raise FleetStopped(why)
        started = time.time()
        lease = concurrency.held_lease()  # of the member's slots: freed by the fleet should this run be lost

        def run_phase(name, fn, *args):
            if name == "lint":  # the fleet linted its one project once, before any member (flows.fleet)
                return args[0]
            result = fn(*args)
            if name == "plan" and result.steps:  # where it starts: what the next run reads if this one is cut short
                record(environment, member, RUNNING, started_at=started, present=present, lease=lease,
                       revision_before=revisions.shown(result.revision_before),
                       target=result.steps[-1].revision, message="migrating")
            return result

        hooks = pipeline.Hooks(
            confirm=lambda plan: job.approval, run_phase=run_phase,
            auto_rollback=auto_rollback.restore_starting_state if job.policy.auto_rollback else None)
        return _final_record(environment, member, pipeline.execute(member.target, job.settings, job.request(), hooks),
                             started)


def _final_record(environment: str, member: Member, outcome: pipeline.Outcome, started: float) -> dict:
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
                  if report.rehearsal else None, message=message)


@flow(name="db-migrate-fleet-batch")  # the fleet names each run when it creates it: <env>-fleet-w3-2
@ends_failed_on_error
def db_migrate_fleet_batch(
    environment: str,
    fleet_run: str,
    members: list[str],
    target_revision: str = "head",
    backup: bool = True,
    fleet_block: str | None = None,
    alembic_config: str | None = None,
    backup_storage: str | None = None,
    requested_by: str = "",
    approved_by: str = "",
    approval_comment: str = "",
) -> list[dict] | Failed:
    """Migrate ``members`` of the environment's fleet one after the other; started by db-migrate-fleet.

    Args:
        environment: The deployment's environment; every member is a database of it.
        fleet_run: The db-migrate-fleet run this batch belongs to (its id).
        members: The members' names, in order.
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
    for name in members:
        member = fleet.get(name)
        if member is None:
            raise ConfigError(f"'{name}' is no longer a member of the {environment} fleet")
        if why := stopped(fleet_run):
            results.append(record(environment, member, NOT_STARTED, message=f"the fleet stopped: {why}"))
            continue
        try:
            # task_run_name as a callable: a name is not a format string (it may hold braces)
            result = task(lambda: migrate_member(job, member), name="member", task_run_name=lambda: name,
                          cache_policy=NO_CACHE, persist_result=False)()
        except FleetStopped as exc:
            result = record(environment, member, NOT_STARTED, message=f"the fleet stopped: {exc}")
        logger.info("%s: %s (%s -> %s) %s", name, result["status"], result["revision_before"],
                    result["revision_after"], result["message"])
        if result["status"] in (FAILED, ROLLED_BACK):
            stop(fleet_run, f"member '{name}' failed")
        results.append(result)
    failed = [r["member"] for r in results if r["status"] in (FAILED, ROLLED_BACK)]
    if failed:  # a state, not an exception: the fleet's run alerts once for the fleet, not each batch
        return Failed(message=f"member{'s' if len(failed) > 1 else ''} failed: {', '.join(failed)}")
    return results
