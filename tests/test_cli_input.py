"""Input the command line must refuse before anything changes, the environment's policy on
the command line, a report that cannot be written after the migration committed, and
errors blamed on what really failed (issue 8, items 5, 14 and 18)."""

import json
import os
import subprocess
import uuid

import pytest

from tests.support.helpers import (Untouched, fingerprint_of, last_report, one_line_error, reports_in, run_on_a_terminal,
                                   sample_at, scalar, sql, stderr_lines)
from tests.support.projects import linear, stock_project


@pytest.fixture
def at_0002(pg_cluster, target):
    sample_at(pg_cluster, "0002", target.database)
    return fingerprint_of(target)


@pytest.fixture(scope="module")
def untouched(pg_cluster, tmp_path_factory):
    with Untouched.at("0002", pg_cluster, tmp_path_factory.mktemp("untouched-home")) as shared:
        yield shared


def refused_first(untouched: Untouched, *args: str) -> str:
    """Refused before the run: exit code 2, nothing changed, and no report."""
    line = untouched.refuse(*args)
    assert reports_in(untouched.home) == untouched.reports, "refused before the run: no report"
    return line


BAD_NUMBERS = [
    ["upgrade", "--yes", "--timeout", "nan"],
    ["upgrade", "--yes", "--timeout", "inf"],
    ["upgrade", "--yes", "--timeout", "0"],
    ["status", "--timeout", "nan"],
    ["upgrade", "--yes", "--lock-timeout", "nan"],
    ["upgrade", "--yes", "--lock-timeout", "inf"],
    ["upgrade", "--yes", "--lock-timeout", "1e12"],
    ["upgrade", "--yes", "--statement-timeout", "nan"],
    ["upgrade", "--yes", "--statement-timeout", "-1"],
    ["upgrade", "--yes", "--lock-wait", "inf"],
    ["upgrade", "--yes", "--guard-wait", "nan"],
    ["upgrade", "--yes", "--backup", "--jobs", "0"],
    ["upgrade", "--yes", "--backup", "--jobs", "\u00b2"],
    ["upgrade", "--yes", "--backup", "--jobs", "100000"],
    ["backup", "--jobs", "nan"],
    ["restore", "some-id", "--yes", "--jobs", "-1"],
    ["backups", "prune", "--keep-last", "1", "--keep-days", "nan"],
    ["backups", "prune", "--keep-last", "1", "--keep-days", "inf"],
]


@pytest.mark.parametrize("args", BAD_NUMBERS, ids=" ".join)
def test_numbers_are_checked_before_anything_runs(args, untouched):
    line = refused_first(untouched, *args)
    assert repr(args[-1]) in line, line


@pytest.mark.parametrize("command", ["upgrade", "downgrade"])
@pytest.mark.parametrize("revision", ["", "@", "0001@", "@0001", " ", "0001 "], ids=repr)
def test_malformed_revisions_are_refused(command, revision, untouched):
    assert f"malformed revision {revision!r}" in refused_first(untouched, command, "-r", revision, "--yes")


@pytest.mark.parametrize("path, expected", [
    (lambda tmp_path: tmp_path, "is a directory"),
    (lambda tmp_path: tmp_path / "a-file" / "report.json", "is not a writable directory"),
], ids=["a directory", "under a file"])
def test_a_json_report_that_can_never_be_written_is_refused_first(path, expected, untouched, tmp_path):
    (tmp_path / "a-file").write_text("")
    assert expected in refused_first(untouched, "upgrade", "--yes", "--json-report", str(path(tmp_path)))


@pytest.fixture
def full_disk(tmp_path):
    """Mount a tiny tmpfs at a path and fill it: every write there fails with ENOSPC."""
    mounted = []

    def mount(path):
        path.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(path)], capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.decode().strip()}")
        mounted.append(path)
        fd = os.open(path / "filler", os.O_WRONLY | os.O_CREAT)
        try:
            while os.write(fd, b"\0" * 4096):
                pass
        except OSError:
            pass
        finally:
            os.close(fd)
        return path

    yield mount
    for path in mounted:
        subprocess.run(["umount", str(path)], check=True)


def test_a_report_on_a_full_disk_after_the_commit_says_the_migration_was_applied(
        cli, url, target, at_0002, home, tmp_path, full_disk):
    # --json-report on a full disk: the main report is still written.
    elsewhere = full_disk(tmp_path / "small") / "copy.json"
    result = cli("upgrade", "-r", "0003", "--yes", "--json-report", str(elsewhere), env={"DATABASE_URL": url})
    assert result.returncode == 3, result.stderr
    line = stderr_lines(result.stderr)[0]
    assert line.startswith("dbmigrate: error: upgrade succeeded: 0002 -> 0003, but the report could not be "
                           f"written to {elsewhere}: No space left on device"), line
    assert fingerprint_of(target).revisions == ("0003",)
    assert last_report(home)["revision_after"] == "0003"
    assert os.listdir(elsewhere.parent) == ["filler"], "no partial report left behind"

    # --home's reports directory on a full disk: the report goes to stderr instead.
    full_disk(home / "reports")
    result = cli("upgrade", "-r", "0004", "--yes", env={"DATABASE_URL": url})
    assert result.returncode == 3, result.stderr
    line, *rest = stderr_lines(result.stderr)
    assert line.startswith("dbmigrate: error: upgrade succeeded: 0003 -> 0004, but the report could not be "
                           f"written to {home / 'reports'}/"), line
    assert line.endswith(": No space left on device")
    copy = json.loads("\n".join(rest))
    assert copy["status"] == "succeeded" and copy["revision_after"] == "0004"
    assert "report:   not written (see stderr)" in result.stdout
    assert fingerprint_of(target).revisions == ("0004",)
    assert os.listdir(home / "reports") == ["filler"]

    # --json: stdout still carries the report, saying it was not written.
    result = cli("upgrade", "-r", "0005", "--yes", "--json", env={"DATABASE_URL": url})
    assert result.returncode == 3
    printed = json.loads(result.stdout)
    assert printed["status"] == "succeeded" and printed["report_path"] is None
    assert printed["report_error"].endswith("No space left on device")
    assert len(stderr_lines(result.stderr)) == 1


# --- item 18: errors blamed on what failed -----------------------------------------------

DEFERRED_FK = ("op.execute('CREATE TABLE parent (id int PRIMARY KEY); CREATE TABLE child "
               "(parent_id int REFERENCES parent DEFERRABLE INITIALLY DEFERRED)')")
ORPHAN = "op.execute('INSERT INTO child VALUES (42)')"  # violates the foreign key, but only at COMMIT


def test_a_deferred_constraint_failing_at_commit_names_the_revision(cli, url, target, home, tmp_path):
    ini = str(stock_project(tmp_path, linear(DEFERRED_FK, ORPHAN)))
    assert cli("upgrade", "-r", "r1", "--yes", "--alembic-config", ini, env={"DATABASE_URL": url}).returncode == 0
    before = fingerprint_of(target)
    result = cli("upgrade", "--yes", "--alembic-config", ini, env={"DATABASE_URL": url})
    assert result.returncode == 1
    assert one_line_error(result.stderr) == ('dbmigrate: error: commit of revision r2 failed: insert or update on table '
                                      '"child" violates foreign key constraint "child_parent_id_fkey"')
    assert fingerprint_of(target) == before
    report = last_report(home)
    assert report["migrations_applied"] == [] and report["revision_after"] == "r1"


def test_with_one_transaction_per_revision_the_commit_that_failed_is_named(cli, url, target, home, tmp_path):
    ini = str(stock_project(tmp_path, linear(DEFERRED_FK, ORPHAN, "op.execute('SELECT 1')"),
                            transaction_per_migration=True))
    result = cli("upgrade", "--yes", "--alembic-config", ini, env={"DATABASE_URL": url})
    assert result.returncode == 1
    assert "commit of revision r2 failed: insert or update on table \"child\"" in one_line_error(result.stderr)
    assert fingerprint_of(target).revisions == ("r1",)
    assert scalar(target, "SELECT count(*) FROM child") == 0
    report = last_report(home)
    assert [m["revision"] for m in report["migrations_applied"]] == ["r1"] and report["revision_after"] == "r1"


def test_an_unreadable_table_is_named_by_the_backup(cli, target, home):
    """The backup role cannot read one table: the first cause, not pg_dump's snapshot error."""
    role, password = "reader_" + uuid.uuid4().hex[:8], uuid.uuid4().hex
    sql(target, f"CREATE ROLE {role} LOGIN PASSWORD '{password}'; CREATE TABLE readable (id int); "
                f"CREATE TABLE secret (id int); GRANT SELECT ON readable TO {role}")
    try:
        url = f"postgresql://{role}:{password}@127.0.0.1:{target.port}/{target.database}"
        result = cli("backup", env={"DATABASE_URL": url})
        assert result.returncode == 1
        line = one_line_error(result.stderr)
        assert "permission denied for table secret" in line and "could not import" not in line, line
        assert not [p for p in (home / "backups").rglob("*") if p.is_file()], "nothing stored"
    finally:
        sql(target, f"DROP OWNED BY {role}; DROP ROLE {role}")


# --- item 5: the environment's policy on the command line --------------------------------

@pytest.fixture
def at_0005(pg_cluster, target):
    sample_at(pg_cluster, "0005", target.database)
    return fingerprint_of(target)


@pytest.mark.parametrize("args", [["downgrade", "-r", "0004", "--yes"],
                                  ["downgrade", "-r", "0004", "--backup", "--approver", "alice"],
                                  ["upgrade", "--backup", "--approver", "alice"]], ids=" ".join)
def test_production_changes_only_through_the_deployment(args, cli, environment, prefect_api, target, at_0005):
    environment("production")
    result = cli(*args, "--env", "production", env={"PREFECT_API_URL": prefect_api})
    assert result.returncode == 2, result.stderr
    assert one_line_error(result.stderr) == (
        "dbmigrate: error: production changes run through the db-migrate deployment: the policy of production "
        f"does not allow {args[0]} from the command line (cli_changes_allowed is off)")
    assert fingerprint_of(target) == at_0005


def test_production_allows_dry_runs_and_backups_not_restores(cli, environment, prefect_api, target, at_0005):
    env = {"PREFECT_API_URL": prefect_api}
    environment("production")
    dry_run = cli("downgrade", "-r", "0004", "--dry-run", "--env", "production", env=env)
    assert dry_run.returncode == 0, "a dry run changes nothing: allowed"
    backup = cli("backup", "--env", "production", "--json", env=env)
    assert backup.returncode == 0, backup.stderr
    restore = cli("restore", json.loads(backup.stdout)["id"], "--approver", "alice", "--env", "production", env=env)
    assert restore.returncode == 2 and "does not allow restore over the original" in one_line_error(restore.stderr)
    assert fingerprint_of(target) == at_0005


def test_production_policy_needs_a_backup_and_a_named_approver(cli, environment, prefect_api, target, at_0005,
                                                               home):
    env = {"PREFECT_API_URL": prefect_api}
    environment("production", cli_changes_allowed=True)
    refused = cli("downgrade", "-r", "0004", "--yes", "--env", "production", env=env)
    assert refused.returncode == 2
    assert one_line_error(refused.stderr) == "dbmigrate: error: the policy of production requires a backup first: add --backup"

    refused = cli("downgrade", "-r", "0004", "--yes", "--backup", "--env", "production", env=env)
    assert refused.returncode == 2
    assert one_line_error(refused.stderr) == (
        "dbmigrate: error: the policy of production requires an approval by name: pass --approver NAME "
        "(--yes is not enough) or run on a terminal")
    assert fingerprint_of(target) == at_0005

    done = cli("downgrade", "-r", "0004", "--backup", "--approver", "alice", "--env", "production", env=env)
    assert done.returncode == 0, done.stderr
    assert fingerprint_of(target).revisions == ("0004",)
    report = last_report(home)
    assert report["environment"] == "production" and report["status"] == "succeeded"
    assert report["approval"] == {"approved": True, "approver": "alice", "via": "--approver", "comment": ""}
    assert report["backup"] is not None

    backup_id = report["backup"]["id"]
    refused = cli("restore", backup_id, "--yes", "--no-safety-backup", "--env", "production", env=env)
    assert refused.returncode == 2 and "requires a backup first: drop --no-safety-backup" in one_line_error(refused.stderr)
    refused = cli("restore", backup_id, "--yes", "--env", "production", env=env)
    assert refused.returncode == 2 and "requires an approval by name" in one_line_error(refused.stderr)
    assert fingerprint_of(target).revisions == ("0004",)
    restored = cli("restore", backup_id, "--approver", "alice", "--env", "production", env=env)
    assert restored.returncode == 0, restored.stderr
    assert "restore approved by alice (--approver)" in restored.stdout
    assert fingerprint_of(target) == at_0005


def test_staging_works_as_before(cli, environment, prefect_api, target, at_0005, home):
    env = {"PREFECT_API_URL": prefect_api}
    environment("staging")
    done = cli("downgrade", "-r", "0004", "--yes", "--env", "staging", env=env)
    assert done.returncode == 0, done.stderr
    assert fingerprint_of(target).revisions == ("0004",)
    report = last_report(home)
    assert report["approval"]["via"] == "--yes" and report["backup"] is None



def test_the_requester_may_not_approve_where_the_policy_says_so(cli, environment, prefect_api, target, at_0005):
    """Item 19 on the command line: the user running it asked for the change."""
    import getpass

    environment("production", cli_changes_allowed=True, approver_must_differ=True)
    refused = cli("downgrade", "-r", "0004", "--backup", "--approver", getpass.getuser(), "--env", "production",
                  env={"PREFECT_API_URL": prefect_api})
    assert refused.returncode != 0
    assert one_line_error(refused.stderr) == (
        f"dbmigrate: error: {getpass.getuser()} asked for this run and may not approve it too: this environment "
        "requires someone else to approve: nothing was changed"), refused.stderr
    assert fingerprint_of(target) == at_0005


def test_on_a_terminal_the_approver_gives_a_name(environment, prefect_api, target, at_0005, home):
    from tests.support.pgcluster import environ_without_db

    environment("production", cli_changes_allowed=True)
    env = {**environ_without_db(), "PREFECT_API_URL": prefect_api, "DBMIGRATE_HOME": str(home)}
    args = ["downgrade", "-r", "0004", "--backup", "--yes", "--env", "production"]
    code, output = run_on_a_terminal(args, {b"[y/N]": "y", b"approver's name:": ""}, env)
    assert code == 2 and "requires the approver's name: nothing was changed" in output, output
    assert fingerprint_of(target) == at_0005

    code, output = run_on_a_terminal(args, {b"[y/N]": "y", b"approver's name:": "carol"}, env)
    assert code == 0 and "succeeded: 0005 -> 0004" in output, output
    report = last_report(home)
    assert report["approval"] == {"approved": True, "approver": "carol", "via": "terminal", "comment": ""}
