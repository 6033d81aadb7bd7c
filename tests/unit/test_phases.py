"""The phases named once (issue 16 item 3): what each may do, the strings reports keep, and the plan's
expected revisions computed with it, from the project alone."""

import json

from dbmigrate.errors import DatabaseMoved, HealthFailed, MigrationFailed, ValidationFailed
from dbmigrate.phases import Phase, planned
from dbmigrate.revisions import load
from tests.support.projects import linear, stock_project


def test_each_phase_knows_what_it_may_do_and_keeps_the_reports_string():
    assert [p for p in Phase if p.changes_database] == [Phase.MIGRATE, Phase.ROLLBACK, Phase.RESTORE]
    assert [p for p in Phase if p.retried] == [Phase.HEALTH_CHECKS, Phase.BACKUP]
    assert [p for p in Phase if p.in_flow] == [Phase.LOAD, Phase.APPROVAL, Phase.GUARD]
    assert json.dumps({"phase": Phase.HEALTH_CHECKS}) == '{"phase": "health_checks"}'
    assert Phase("migrate") is Phase.MIGRATE and Phase.MIGRATE == "migrate"
    assert Phase.PLANNED.words == "approval, before migrating" and Phase.MIGRATE.words == "the migration"


def test_a_plan_carries_the_revisions_it_ends_at(tmp_path):
    project = load(str(stock_project(tmp_path, linear("pass", "pass", "pass"))))
    assert planned(project, (), "heads", upgrade=True).expected == ("r3",)
    assert planned(project, ("r1",), "r2", upgrade=True).expected == ("r2",)
    assert planned(project, ("r3",), "r1", upgrade=False).expected == ("r1",)
    assert planned(project, ("r3",), "base", upgrade=False).expected == ()
    assert planned(project, ("r2",), "r2", upgrade=True).expected == ("r2",), "nothing to do: where it is"


def test_health_validation_and_a_moved_database_are_failures_of_their_own():
    for kind in (HealthFailed, ValidationFailed, DatabaseMoved):
        assert not issubclass(kind, MigrationFailed) and kind("x").exit_code == 1
