"""A run's target against where the database is: an upgrade to a revision below it is refused,
naming the way down, and a downgrade's health checks say what it will revert (issue 15, items 18
and 20), on the command line and in the flows."""

import pytest

from tests.support.helpers import Untouched, fingerprint_of, last_report, sample_at


@pytest.fixture(scope="module")
def at_0005(pg_cluster, tmp_path_factory):
    with Untouched.at("0005", pg_cluster, tmp_path_factory.mktemp("at-0005")) as shared:
        yield shared


@pytest.mark.parametrize("revision", ["0003", "base"])
def test_an_upgrade_to_a_revision_below_the_database_is_refused(revision, at_0005):
    line = at_0005.refuse("upgrade", "-r", revision, "--yes")
    assert line == (f"dbmigrate: error: cannot upgrade to {revision}: the database is at 0005, above it; to go back "
                    f"to {revision}, downgrade (dbmigrate downgrade -r {revision}, or the db-rollback deployment)")
    report = last_report(at_0005.home)
    assert (report["status"], report["error"]["phase"]) == ("failed", "plan")
    pending = {c["name"]: c for c in report["health_checks"]}["pending_revisions"]
    assert pending["status"] == "warn" and pending["detail"].startswith(f"cannot upgrade to {revision}")


def test_upgrading_to_the_revision_the_database_is_at_still_has_nothing_to_do(at_0005):
    result = at_0005.run("upgrade", "-r", "0005", "--yes")
    assert result.returncode == 0 and "had nothing to do: database already at 0005" in result.stdout


def test_the_flow_to_a_revision_below_the_database_ends_failed(environment, target, pg_cluster):
    from flows.migrate import db_migrate

    sample_at(pg_cluster, "0005", target.database)
    before = fingerprint_of(target)
    state = db_migrate(environment=environment("staging"), target_revision="0003", return_state=True)
    assert state.is_failed()
    assert state.message == ("plan failed: cannot upgrade to 0003: the database is at 0005, above it; to go back to "
                             "0003, downgrade (dbmigrate downgrade -r 0003, or the db-rollback deployment)")
    assert fingerprint_of(target) == before


def _pending_check(home) -> dict:
    return {c["name"]: c for c in last_report(home)["health_checks"]}["pending_revisions"]


def test_a_downgrade_says_what_it_will_revert(cli, url, home):
    env = {"DATABASE_URL": url}
    assert cli("upgrade", "--yes", env=env).returncode == 0
    assert cli("downgrade", "-r", "0005", "--dry-run", env=env).returncode == 0
    dry_run = _pending_check(home)
    assert (dry_run["status"], dry_run["detail"]) == ("ok", "1 to revert to 0005: 0006")
    assert [step["revision"] for step in dry_run["data"]["to_revert"]] == ["0006"]
    assert cli("downgrade", "-r", "0005", "--yes", env=env).returncode == 0
    assert _pending_check(home)["detail"] == "1 to revert to 0005: 0006"


def test_a_db_rollback_dry_run_says_what_it_will_revert(environment, cli, url, home, target):
    from flows.db_rollback import db_rollback

    assert cli("upgrade", "--yes", env={"DATABASE_URL": url}).returncode == 0
    state = db_rollback(environment=environment("staging"), to_revision="0005", return_state=True)
    assert state.is_completed(), state.message
    assert _pending_check(home)["detail"] == "1 to revert to 0005: 0006"
    assert fingerprint_of(target).revisions == ("0006",)
