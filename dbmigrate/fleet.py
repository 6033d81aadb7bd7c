"""A fleet: many databases of one environment migrated by one migration project (a database per
tenant, shard or region). Plain: who the members are, how they are cut into a canary and waves,
and where each one stands (``dbmigrate fleet status``). Declaring a fleet is a Prefect block
(:mod:`blocks.fleet`); running one is the ``db-migrate-fleet`` flow (:mod:`flows.fleet`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

from dbmigrate import db, revisions
from dbmigrate.errors import ConfigError, DbMigrateError, first_line
from dbmigrate.revisions import VERSION_TABLE, Project
from dbmigrate.target import DatabaseTarget, libpq_timeout, pgoptions

DEFAULT_JOBS = 16  # connections opened at once by `fleet status`: each waits on the network, not the CPU
# DatabaseTarget.libpq_env's variables as psycopg's connection parameters
LIBPQ_PARAMETERS = {"PGHOST": "host", "PGPORT": "port", "PGDATABASE": "dbname", "PGUSER": "user",
                    "PGPASSWORD": "password", "PGSSLMODE": "sslmode"}


@dataclass(frozen=True)
class Member:
    """One database of a fleet."""

    name: str  # how reports and the UI name it: the database name, or its credentials block's name
    target: DatabaseTarget  # its credentials; target.environment is the fleet's environment

    @property
    def server(self) -> str:
        """host:port, the key of the per-server cap."""
        return f"{self.target.host}:{self.target.port}"


@dataclass(frozen=True)
class WavePlan:
    """The canary (migrated first, alone before any wave) and the waves after it, in order."""

    canary: tuple[Member, ...]
    waves: tuple[tuple[Member, ...], ...]

    @property
    def members(self) -> tuple[Member, ...]:
        return self.canary + tuple(member for wave in self.waves for member in wave)

    def describe(self) -> str:
        """One line for the approval page and the report: '1 canary, then 10 waves of 10 (the last 9)'."""
        if not self.waves:
            return f"{len(self.canary)} canary, no wave after it"
        sizes = [len(wave) for wave in self.waves]
        last = f" (the last {sizes[-1]})" if len(sizes) > 1 and sizes[-1] != sizes[0] else ""
        return (f"{len(self.canary)} canary, then {len(sizes)} wave{'s' if len(sizes) > 1 else ''} "
                f"of {sizes[0]}{last}")


def plan_waves(members: Sequence[Member], canary: int = 1, wave_size: int = 10) -> WavePlan:
    """The first ``canary`` members (the fleet's order puts its canary first), then waves of
    ``wave_size`` in order. Two members naming the same database are refused: each is migrated once."""
    if canary < 0 or wave_size < 1:
        raise ConfigError(f"a fleet needs canary >= 0 and wave_size >= 1 (got canary={canary}, wave_size={wave_size})")
    require_distinct(members)
    rest = tuple(members[canary:])
    return WavePlan(tuple(members[:canary]),
                    tuple(rest[start:start + wave_size] for start in range(0, len(rest), wave_size)))


def require_distinct(members: Sequence[Member]) -> None:
    seen: dict[str, str] = {}
    for member in members:
        where = member.target.where
        if where in seen:
            raise ConfigError(f"fleet members '{seen[where]}' and '{member.name}' are the same database ({where})")
        seen[where] = member.name


@dataclass(frozen=True)
class MemberState:
    """Where one member stands: its revision against the project's heads, or why it cannot be read."""

    name: str
    server: str
    database: str
    reachable: bool
    current: tuple[str, ...] | None = None  # None: not read; (): no revision yet (base)
    pending: int | None = None  # revisions to apply to reach the heads
    why: str | None = None  # unreachable, or readable but not plannable (unknown revision, several rows)

    @property
    def at_head(self) -> bool:
        return self.pending == 0

    @property
    def revision(self) -> str:
        """What the summary and the tables show: the revision, 'base', or '?' when not read."""
        if self.current is None:
            return "?"
        return revisions.shown(self.current) if self.current else "base"

    def as_dict(self) -> dict:
        return {**asdict(self), "current": list(self.current) if self.current is not None else None,
                "revision": self.revision, "at_head": self.at_head}


def member_state(member: Member, project: Project, timeout_s: float = db.DEFAULT_CONNECT_TIMEOUT) -> MemberState:
    """One member's revision and pending count; a member that cannot be reached (or read) says
    why, in one line without the password."""
    base = {"name": member.name, "server": member.server, "database": member.target.database}
    try:
        current = read_revisions(member.target, timeout_s)
    except _Unreachable as exc:
        return MemberState(**base, reachable=False, why=member.target.redact(str(exc)))
    except _Unreadable as exc:
        return MemberState(**base, reachable=True, why=member.target.redact(str(exc)))
    try:
        project.require_known(current)
        project.require_one_row(current)
        pending = len(project.plan_upgrade(current, "heads"))
    except DbMigrateError as exc:
        return MemberState(**base, reachable=True, current=current, why=member.target.redact(first_line(exc)))
    return MemberState(**base, reachable=True, current=current, pending=pending)


class _Unreachable(Exception):
    """The member's server could not be reached: why, as db.failure_reason words it."""


class _Unreadable(Exception):
    """Connected, but its version table could not be read (a permission, a timeout): the server's line."""


def read_revisions(target: DatabaseTarget, timeout_s: float) -> tuple[str, ...]:
    """The revision(s) stamped in ``target``, in one statement after the connection: a plain psycopg
    session, not db.connect's SQLAlchemy engine, whose first connection asks the server half a
    dozen questions (a fleet of 100 is read in a third of the time). Every wait is bounded:
    connecting, and the statement (lock_timeout and statement_timeout), by ``timeout_s``."""
    import psycopg  # here: every command line registers `fleet`, few run it

    env = target.libpq_env()
    wait_ms = libpq_timeout(timeout_s) * 1000
    parameters = {name: env[variable] for variable, name in LIBPQ_PARAMETERS.items() if variable in env}
    parameters.update(connect_timeout=str(libpq_timeout(timeout_s)), options=pgoptions(
        f"-c lock_timeout={wait_ms}", f"-c statement_timeout={wait_ms}", base=target.query_options))
    try:
        conn = psycopg.connect(**parameters, autocommit=True)
    except psycopg.Error as exc:
        raise _Unreachable(db.failure_reason(exc, timeout_s)) from None
    with conn:
        try:
            return tuple(sorted(row[0] for row in conn.execute(f"SELECT version_num FROM {VERSION_TABLE}")))
        except psycopg.errors.UndefinedTable:
            return ()
        except psycopg.Error as exc:
            raise _Unreadable(first_line(exc)) from None


def fleet_status(members: Sequence[Member], project: Project, jobs: int = DEFAULT_JOBS,
                 timeout_s: float = db.DEFAULT_CONNECT_TIMEOUT) -> list[MemberState]:
    """Every member's state, read in parallel (``jobs`` sessions at once), in the fleet's order."""
    if not members:
        return []
    with ThreadPoolExecutor(max_workers=max(1, min(jobs, len(members)))) as pool:
        return list(pool.map(lambda member: member_state(member, project, timeout_s), members))


def summary_line(states: Sequence[MemberState], head: str | Sequence[str]) -> str:
    """'100 databases: 97 at head, 2 at 0005, 1 unreachable': the members grouped by where they are,
    the head first, then each other revision by how many are there, then the unreadable ones."""
    heads = revisions.shown(head if isinstance(head, str) else tuple(head))
    at: Counter[str] = Counter()
    unreachable = unplannable = 0
    for state in states:
        if not state.reachable:
            unreachable += 1
        elif state.at_head:
            at["head"] += 1
        elif state.pending is None:
            unplannable += 1
        else:
            at[state.revision] += 1
    count = len(states)
    parts = [f"{at.pop('head')} at head ({heads})"] if "head" in at else []
    parts += [f"{n} at {revision}" for revision, n in sorted(at.items(), key=lambda item: (-item[1], item[0]))]
    if unplannable:
        parts.append(f"{unplannable} not plannable")
    if unreachable:
        parts.append(f"{unreachable} unreachable")
    return f"{count} database{'' if count == 1 else 's'}: " + (", ".join(parts) or "none")


def admit(states: Sequence[MemberState], skip_unreachable: bool) -> tuple[list[str], list[MemberState]]:
    """Before anything runs: the names of the members the fleet may start, and those it leaves
    out. An unreachable (or unplannable) member stops the whole fleet up front, in one line naming
    them, unless the fleet skips such members (``DatabaseFleet.skip_unreachable``): then they are
    reported 'not started' with why, and the others run."""
    left_out = [state for state in states if state.why is not None]
    if left_out and not skip_unreachable:
        named = "; ".join(f"{state.name}: {state.why}" for state in left_out[:3])
        more = f" (and {len(left_out) - 3} more)" if len(left_out) > 3 else ""
        raise ConfigError(f"{len(left_out)} fleet member{'s' if len(left_out) > 1 else ''} cannot be migrated, "
                          f"nothing was started: {named}{more}")
    return [state.name for state in states if state.why is None], left_out
