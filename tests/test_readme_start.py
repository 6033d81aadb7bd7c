"""README's command-line start, as written: the first commands a new user meets are ones a test runs,
against a database given by DATABASE_URL as the README says."""

from __future__ import annotations

import shlex

from tests.support.helpers import SAMPLE_HEAD, documented_commands, fingerprint_of, last_report, run_cli


def test_the_readmes_five_lines_run_as_written(home, target, url):
    commands = [shlex.split(line, comments=True) for line in
                documented_commands("README.md", "## The command line in five lines")]
    assert [argv[0] for argv in commands] == ["dbmigrate"] * 5, commands

    status, dry_run, upgrade, backups, check = [run_cli(home, *argv[1:], env={"DATABASE_URL": url})
                                                for argv in commands]

    assert [result.returncode for result in (status, dry_run, upgrade, backups, check)] == [0] * 5, (
        status.stderr, dry_run.stderr, upgrade.stderr, backups.stderr, check.stderr)
    assert "pending" in status.stdout and SAMPLE_HEAD in status.stdout, status.stdout
    assert "CREATE TABLE" in dry_run.stdout, dry_run.stdout
    assert fingerprint_of(target).revisions == (SAMPLE_HEAD,)
    report = last_report(home)
    assert (report["status"], report["revision_after"]) == ("succeeded", SAMPLE_HEAD)
    assert report["backup"]["id"] in backups.stdout, backups.stdout
