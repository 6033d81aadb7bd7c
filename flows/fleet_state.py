"""What a fleet run's parent (:mod:`flows.fleet`, :mod:`flows.fleet_lanes`) and its lanes
(:mod:`flows.fleet_batch`) share through Prefect: the members' statuses, the names of the tags and
the concurrency limits, the variable that stops a fleet run, each lane's variable (its work), and
the member records (keyed table artifacts, one per member, read back in one request).
"""

from __future__ import annotations

import hashlib
import json
import re

from prefect import runtime
from prefect.artifacts import create_table_artifact
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactCollectionFilter, ArtifactCollectionFilterKey
from prefect.variables import Variable

from dbmigrate.fleet import Member
from flows.alerts import flow_run_url
from flows.common import put_variable

# A member's status, as the member record and the fleet's report class it.
RUNNING, MIGRATED, FAILED, ROLLED_BACK, UNCHANGED, NOT_STARTED = (
    "running", "migrated", "failed", "rolled back", "unchanged", "not started")
LANE_IDLE_S = 60.0  # an idle lane given nothing for this long ends
PRESENCE_CHECK_S = 5.0  # how often a lane checks its presence connection (the fleet allows it twice as long)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def fleet_tag(environment: str) -> str:
    return f"fleet:{environment}"


def fleet_run_tag(fleet_run: str) -> str:
    return f"fleet-run:{fleet_run}"


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


# --- a lane's work ------------------------------------------------------------------------------------

def _lane_variable(fleet_run: str, lane: int) -> str:
    return f"dbmigrate-fleet-{fleet_run}-lane-{lane}"


def assign(fleet_run: str, lane: int, seq: int, members: list[str]) -> None:
    """The lane's next members (``seq`` above its last assignment's)."""
    put_variable(_lane_variable(fleet_run, lane), {"seq": seq, "members": members})


def release(fleet_run: str, lane: int) -> None:
    """The lane ends once its members are done."""
    put_variable(_lane_variable(fleet_run, lane), {"done": True})


def assigned(fleet_run: str, lane: int) -> dict:
    """The lane's latest assignment ({"seq", "members"}), {"done": True}, or {} when none."""
    value = Variable.get(_lane_variable(fleet_run, lane), default=None)
    return value if isinstance(value, dict) else {}


def forget_lane(fleet_run: str, lane: int) -> None:
    Variable.unset(_lane_variable(fleet_run, lane))


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
