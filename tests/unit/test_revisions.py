"""Revision syntax, resolution and planning on the sample project and on a branched one: no database."""

import pytest

from dbmigrate import revisions
from dbmigrate.errors import RevisionError
from tests.support.helpers import SAMPLE_CONFIG, SAMPLE_HEAD
from tests.support.projects import linear, stock_project

SAMPLE = ["0001", "0002", "0003", "0004", "0005", "0006"]


@pytest.fixture(scope="module")
def sample():
    return revisions.load(str(SAMPLE_CONFIG))


@pytest.fixture(scope="module")
def branched(tmp_path_factory):
    """r1, then two branches on it: b1 and c1 (two heads)."""
    scripts = linear("pass") + [{"revision": "b1", "down": "r1", "message": "branch b", "upgrade": "pass"},
                                {"revision": "c1", "down": "r1", "message": "branch c", "upgrade": "pass"}]
    return revisions.load(str(stock_project(tmp_path_factory.mktemp("branched"), scripts)))


@pytest.mark.parametrize("revision", ["0001", "head", "heads", "base", "+2", "-1", "0003+1", "branch@0002",
                                      "ae1027a6acf"])
def test_well_formed_revisions_pass_the_syntax_check(revision):
    assert revisions.check_syntax(revision) == revision


@pytest.mark.parametrize("revision", ["", "@", "0001@", "@0001", " ", "0001 ", "a/b", "0001;drop", "ré"],
                         ids=repr)
def test_malformed_revisions_fail_the_syntax_check(revision):
    with pytest.raises(RevisionError, match=f"malformed revision {revision!r}: expected a revision id"):
        revisions.check_syntax(revision)


def test_the_sample_project_has_one_head(sample):
    assert sample.heads == [SAMPLE_HEAD]


@pytest.mark.parametrize("revision, resolved", [("0003", "0003"), ("head", "head"), ("heads", "heads"),
                                                ("base", "base"), ("+1", "+1"), ("-2", "-2")])
def test_resolve_keeps_known_targets(sample, revision, resolved):
    assert sample.resolve(revision) == resolved


def test_resolve_refuses_a_revision_the_scripts_do_not_have(sample):
    with pytest.raises(RevisionError, match="unknown revision 'f00dface': not in the migration scripts"):
        sample.resolve("f00dface")


def test_resolve_refuses_a_malformed_revision_before_looking_it_up(sample):
    with pytest.raises(RevisionError, match="malformed revision '0001@'"):
        sample.resolve("0001@")


def test_head_is_ambiguous_with_two_heads(branched):
    assert sorted(branched.heads) == ["b1", "c1"]
    with pytest.raises(RevisionError, match=r"'head' is ambiguous: the scripts have 2 heads \((b1, c1|c1, b1)\)"):
        branched.resolve("head")
    assert branched.resolve("heads") == "heads"


def test_upgrade_plans_every_pending_revision_in_order(sample):
    assert [s.revision for s in sample.plan_upgrade((), "head")] == SAMPLE
    assert [s.revision for s in sample.plan_upgrade(("0002",), "0004")] == ["0003", "0004"]
    assert sample.plan_upgrade((SAMPLE_HEAD,), "head") == []


def test_planned_steps_carry_the_revision_message(sample):
    [step] = sample.plan_upgrade(("0002",), "0003")
    assert step.as_dict() == {"revision": "0003", "message": sample.script.get_revision("0003").doc}
    assert step.message


def test_downgrade_plans_the_revisions_to_revert_newest_first(sample):
    assert [s.revision for s in sample.plan_downgrade(("0004",), "0002")] == ["0004", "0003"]
    assert [s.revision for s in sample.plan_downgrade(("0002",), "base")] == ["0002", "0001"]


def test_downgrade_refuses_a_target_above_the_current_revision(sample):
    with pytest.raises(RevisionError, match="cannot downgrade to 0004: it is not below the current revision 0002"):
        sample.plan_downgrade(("0002",), "0004")


def test_downgrade_refuses_a_relative_move_up(sample):
    with pytest.raises(RevisionError, match=r"'\+1' moves up: use upgrade"):
        sample.plan_downgrade(("0002",), "+1")


def test_one_row_or_none_in_the_version_table_is_no_problem(sample):
    assert sample.several_rows_problem(()) is None
    assert sample.several_rows_problem(("0005",)) is None


def test_overlapping_rows_in_the_version_table_are_named(sample):
    assert sample.several_rows_problem(("0003", "0005")) == (
        "alembic_version holds 2 rows: 0003, 0005 (0003 is an ancestor of 0005): "
        "fix the table by hand; dbmigrate will not guess")


def test_rows_unknown_to_the_scripts_are_named(sample):
    assert "(f00dface unknown to the migration scripts)" in sample.several_rows_problem(("0005", "f00dface"))


def test_rows_on_separate_branches_are_still_refused(branched):
    assert "holds 2 rows: b1, c1 (separate branches)" in branched.several_rows_problem(("b1", "c1"))
