"""A fleet's lane lost with a member in flight: its worker SIGKILLed with its flow-run
processes (a lost machine), nobody reports, and Prefect shows the run Running for ever.

The member in flight holds a presence connection named after its lane's run on its server
(:func:`flows.recovery.presence`, as a single-database run does) from before its record says
RUNNING until after its final record. The fleet, at each poll, reads its in-flight members'
records (one request) and, for those RUNNING, asks each of their servers which presences are
there (one query per server). A member RUNNING whose presence is gone, still so on a second
look, is in a lost lane: the fleet says where its database is and applies the single-database
recovery (:func:`dbmigrate.interruption.where_left`: a database left between revisions is
downgraded to its starting revision where the policy rolls back automatically), sets the run
Crashed with that message, frees the member's slots of the fleet's caps (its record keeps their
lease), classes the rest of the lane's assignment not started, and stops.
"""

from __future__ import annotations

from collections import defaultdict
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.states import Crashed

from dbmigrate import interruption
from dbmigrate.errors import DbMigrateError
from dbmigrate.fleet import Member
from dbmigrate.interruption import InFlight, Undo
from dbmigrate.phases import Phase
from flows import recovery
from flows.fleet_state import FAILED, NOT_STARTED, RUNNING, read_records


def lost_lanes(environment: str, in_flight: dict[str, list[str]], members: dict[str, Member],
               records: dict[str, dict]) -> list[str]:
    """The lanes (run id -> members pending) whose member in progress lost its presence: their
    process is gone. ``records``: the pending members' records, as the fleet's poll read them."""
    suspects = _migrating_without_presence(in_flight, members, records)
    if not suspects:
        return []
    # A second look: a member that just ended wrote its final record before closing its presence.
    again = _migrating(read_records(environment, list(suspects)), in_flight)
    if not again:
        return []
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=list(set(again.values())))))
    return [str(run.id) for run in runs if run.state is not None and not run.state.is_final()]


def _migrating(records: dict[str, dict], in_flight: dict[str, list[str]]) -> dict[str, str]:
    """Members whose record says a lane in flight is migrating them (holding a presence): their run ids."""
    return {name: row["child_run"] for name, row in records.items()
            if row["status"] == RUNNING and row.get("present") and name in in_flight.get(row.get("child_run"), [])}


def _migrating_without_presence(in_flight: dict[str, list[str]], members: dict[str, Member],
                                records: dict[str, dict]) -> dict[str, str]:
    migrating = _migrating(records, in_flight)
    by_server: dict[str, list[str]] = defaultdict(list)
    for name in migrating:
        by_server[members[name].server].append(name)
    gone = {}
    for names in by_server.values():
        try:
            there = recovery.present(members[names[0]].target, [migrating[name] for name in names])
        except DbMigrateError:  # the server cannot tell: not a reason to call a run lost
            continue
        gone.update({name: migrating[name] for name in names if migrating[name] not in there})
    return gone


def recover(environment: str, run_id: str, names: list[str], members: dict[str, Member],
            undo: Undo | None) -> dict[str, dict]:
    """The lost lane's members pending, as the fleet's report classes them, where each database is said
    (and, with ``undo``, one left between revisions put back); the run set Crashed saying so."""
    records = read_records(environment, names)
    rows, said = {}, []
    for name in names:
        row = records.get(name)
        if row and row.get("child_run") == run_id and row["status"] != RUNNING:
            rows[name] = row
        elif row and row.get("child_run") == run_id:
            where = interruption.where_left(members[name].target, _entry(environment, run_id, row, undo))
            rows[name] = {**row, "status": FAILED, "message": f"its run was lost (its process and worker are "
                                                              f"gone) during the migration: {where}"}
            said.append(f"member '{name}': {where}")
        else:
            rows[name] = {"status": NOT_STARTED, "message": "its run was lost before it started"}
    message = "; ".join(said) or "no member had started"
    with get_client(sync_client=True) as client:
        client.set_flow_run_state(UUID(run_id), Crashed(message=f"Run lost during the migration (its process and "
                                                                f"worker are gone): {message}."), force=True)
        for name in names:  # the member's slots of the fleet's caps, which its lease would hold 5 minutes more
            if (row := records.get(name)) and row.get("child_run") == run_id and row["status"] == RUNNING \
                    and row.get("lease"):
                client.release_concurrency_slots_with_lease(UUID(row["lease"]))
    return rows


def _entry(environment: str, run_id: str, row: dict, undo: Undo | None) -> InFlight:
    """The member record as the in-flight journal a single-database run keeps."""
    start = row.get("revision_before")
    return InFlight(run_id, row["member"], environment, "", None, row.get("started_at") or 0.0, True,
                    Phase.MIGRATE, revision_before=None if start == "base" else start, target=row.get("target"),
                    undo=undo)
