"""A fleet's lane lost with its process: its worker SIGKILLed with its flow-run processes (a
lost machine), nobody reports, and Prefect shows the run Running for ever.

A lane holds a presence connection (:mod:`flows.fleet_presence`) from the moment it takes its first
member to its end, and its member records say where it is. The fleet, at each poll, asks the servers
where each lane it waits for should have it (where it was last said or seen to be, and its next member's
server: one query per server), from the moment it reads the lane's run Running. A lane absent at every
look for LOST_AFTER_S, its run not over, is lost (one of this fleet run never seen yet, once it has had
FIRST_PRESENCE_S to open it; one a previous fleet run started is looked for once its records say where):
the fleet says where its member in flight, if any, left its database and applies the single-database
recovery (:func:`dbmigrate.interruption.where_left`: a database left between revisions is downgraded to
its starting revision where the policy rolls back automatically), sets the run Crashed with that
message, frees the slots of the fleet's caps its records name (by their lease), classes the rest of the
lane's assignment not started, and stops.
"""

from __future__ import annotations

import time
from collections import defaultdict
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.states import Crashed

from dbmigrate import interruption
from dbmigrate.errors import DbMigrateError
from dbmigrate.fleet import Member
from dbmigrate.interruption import InFlight, Undo
from dbmigrate.phases import Phase
from flows import recovery
from flows.fleet_state import FAILED, NOT_STARTED, PRESENCE_CHECK_S, RUNNING, read_records

# A presence gone this long is a lane lost: twice as long as the lane takes to open it again should
# its server have dropped it (a restart), so a lane alive is not taken for a lost one.
LOST_AFTER_S = 2 * PRESENCE_CHECK_S
# A lane opens its presence a few Prefect requests after it starts or is given its first member (a
# busy SQLite Prefect server answers some with a 503, and its client waits 2, 4, 8 s... before trying
# again): one never seen is taken for lost only this long after both.
FIRST_PRESENCE_S = 60.0


def first_look_over(assigned_at: float, running_at: float) -> bool:
    """Whether a lane never seen has had FIRST_PRESENCE_S to open its presence since its latest
    assignment and since the fleet first read its run Running (both ``time.monotonic()``)."""
    return time.monotonic() - max(assigned_at, running_at) >= FIRST_PRESENCE_S


def when_lost(first: bool) -> str:
    return "before its first member" if first else "between members"


def look(watched: dict[str, list[str]], members: dict[str, Member]) -> tuple[set[str], set[str]]:
    """Of the lanes watched (run id -> members on whose servers its presence should be) those whose
    presence is on one of them, and those not seen whose servers could not tell (not a reason to
    call a lane lost): one query per server."""
    by_server: dict[str, set[str]] = defaultdict(set)
    for run_id, names in watched.items():
        for name in names:
            by_server[members[name].server].add(run_id)
    target = {members[name].server: members[name].target for names in watched.values() for name in names}
    seen: set[str] = set()
    unknown: set[str] = set()
    for server, run_ids in by_server.items():
        try:
            seen |= recovery.present(target[server], list(run_ids))
        except DbMigrateError:
            unknown |= run_ids
    return seen, unknown - seen


def recover(environment: str, run_id: str, names: list[str], members: dict[str, Member],
            undo: Undo | None, lease: str | None, first: bool = False) -> dict[str, dict] | None:
    """The lost lane's members pending, as the fleet's report classes them, where each database is said
    (and, with ``undo``, one left between revisions put back); the run set Crashed saying so, the
    slots its records name freed (``lease``: its latest record's before these); ``first``: it had
    taken no member yet. None, nothing done, when its run turns out to be over (it ended just now:
    the fleet's next poll reads how)."""
    with get_client(sync_client=True) as client:
        state = client.read_flow_run(UUID(run_id)).state
    if state is None or state.is_final():
        return None
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
    not_started = [repr(name) for name, row in rows.items() if row["status"] == NOT_STARTED]
    when = "during the migration" if said else when_lost(first)
    message = "; ".join(said) or (f"not started: {', '.join(not_started)}" if not_started
                                  else "it had nothing left to do")
    leases = {row["lease"] for name in names if (row := records.get(name)) and row.get("child_run") == run_id
              and row.get("lease")} | ({lease} if lease else set())
    with get_client(sync_client=True) as client:
        client.set_flow_run_state(UUID(run_id), Crashed(message=f"Run lost {when} (its process and worker are "
                                                                f"gone): {message}."), force=True)
        for lease in leases:  # the slots of the fleet's caps it held, for 5 minutes more; one given back is a no-op
            client.release_concurrency_slots_with_lease(UUID(lease))
    return rows


def _entry(environment: str, run_id: str, row: dict, undo: Undo | None) -> InFlight:
    """The member record as the in-flight journal a single-database run keeps."""
    start = row.get("revision_before")
    return InFlight(run_id, row["member"], environment, "", None, row.get("started_at") or 0.0, True,
                    Phase.MIGRATE, revision_before=None if start == "base" else start, target=row.get("target"),
                    undo=undo)
