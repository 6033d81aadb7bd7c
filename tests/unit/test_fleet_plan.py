"""The fleet's plain rules (issue 17): the canary and the waves, the summary line, who may start."""

import pytest

from dbmigrate.errors import ConfigError
from dbmigrate.fleet import Member, MemberState, admit, plan_waves, summary_line
from dbmigrate.target import parse_url


def members(count: int, host: str = "db1") -> list[Member]:
    return [Member(f"tenant_{n:03d}", parse_url(f"postgresql://u:secret@{host}:5432/tenant_{n:03d}", "staging"))
            for n in range(1, count + 1)]


def test_the_canary_comes_first_then_waves_in_order():
    plan = plan_waves(members(25), canary=2, wave_size=10)
    assert [m.name for m in plan.canary] == ["tenant_001", "tenant_002"]
    assert [len(wave) for wave in plan.waves] == [10, 10, 3]
    assert plan.waves[0][0].name == "tenant_003" and plan.members == tuple(members(25))
    assert plan.describe() == "2 canary, then 3 waves of 10 (the last 3)"
    assert plan_waves(members(1), canary=1).describe() == "1 canary, no wave after it"
    assert members(1)[0].server == "db1:5432"


def test_a_database_named_twice_or_a_bad_size_is_refused():
    twice = members(2) + [Member("again", members(1)[0].target)]
    with pytest.raises(ConfigError, match="^fleet members 'tenant_001' and 'again' are the same database "
                                          r"\(db1:5432/tenant_001\)$"):
        plan_waves(twice)
    with pytest.raises(ConfigError, match="wave_size >= 1"):
        plan_waves(members(3), wave_size=0)


def state(name: str, current: tuple[str, ...] | None, pending: int | None, why: str | None = None) -> MemberState:
    return MemberState(name, "db1:5432", name, reachable=current is not None or why is None, current=current,
                       pending=pending, why=why)


def test_the_summary_groups_members_by_where_they_are():
    states = ([state(f"a{n}", ("0006",), 0) for n in range(97)] + [state("b1", ("0005",), 1), state("b2", ("0005",), 1)]
              + [state("c", None, None, "connection refused")])
    assert summary_line(states, ["0006"]) == "100 databases: 97 at head (0006), 2 at 0005, 1 unreachable"
    assert summary_line([state("d", (), 6), state("e", ("0099",), None, "unknown revision")], "0006") == \
        "2 databases: 1 at base, 1 not plannable"


def test_an_unreachable_member_stops_the_fleet_unless_it_skips_such():
    states = [state("a", ("0006",), 0), state("gone", None, None, "connection refused")]
    with pytest.raises(ConfigError, match="^1 fleet member cannot be migrated, nothing was started: gone: "
                                          "connection refused$"):
        admit(states, skip_unreachable=False)
    assert admit(states, skip_unreachable=True) == (["a"], [states[1]])


def test_a_worker_counts_for_a_lane_while_its_heartbeats_arrive():
    """`lanes=0`: one lane per worker alive. Prefect lists a dead worker online for up to three missed
    heartbeats; one not heard from for over one and a half is not counted (a fleet started right after
    a worker died made a lane for it, which waited for a worker)."""
    from datetime import datetime, timedelta, timezone
    from uuid import uuid4

    from prefect.client.schemas.objects import Worker, WorkerStatus

    from flows.fleet_lanes import alive

    now = datetime.now(timezone.utc)

    def worker(status=WorkerStatus.ONLINE, heard_s_ago: float | None = 10, interval: int | None = 30) -> Worker:
        heard = None if heard_s_ago is None else now - timedelta(seconds=heard_s_ago)
        return Worker(name="w", work_pool_id=uuid4(), status=status, last_heartbeat_time=heard,
                      heartbeat_interval_seconds=interval)

    assert alive(worker(), now) and alive(worker(heard_s_ago=44), now)
    assert not alive(worker(heard_s_ago=46), now), "listed online, silent for 46 s of a 30 s heartbeat"
    assert alive(worker(heard_s_ago=80, interval=60), now) and not alive(worker(heard_s_ago=95, interval=60), now)
    assert alive(worker(heard_s_ago=40, interval=None), now), "Prefect's default heartbeat, 30 s"
    assert not alive(worker(status=WorkerStatus.OFFLINE), now) and not alive(worker(heard_s_ago=None), now)
