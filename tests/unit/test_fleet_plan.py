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
