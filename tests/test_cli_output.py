"""What the operator's terminal shows: output piped into a reader that stops early (`| head`),
and Alembic's own INFO lines only when asked for with -v (issue 15, items 23 and 24)."""

import os

import pytest

from tests.support.helpers import sql, stderr_lines


@pytest.mark.parametrize("args", [["status", "--json"], ["status"], ["heads", "--json"], ["local", "status"]],
                         ids=" ".join)
def test_a_reader_that_stops_reading_gets_no_traceback(args, cli, url):
    """`dbmigrate ... | head -2`, with head gone before the first write: the worst case."""
    reader, writer = os.pipe()
    os.close(reader)
    try:
        result = cli(*args, env={"DATABASE_URL": url}, stdout=writer)
    finally:
        os.close(writer)
    assert result.stderr == ""
    assert result.returncode == 141, "as a Unix tool killed by SIGPIPE"


def test_alembic_info_lines_only_with_verbose(cli, url, target):
    env = {"DATABASE_URL": url}
    upgrade = cli("upgrade", "-r", "0002", "--yes", env=env)
    assert upgrade.returncode == 0 and upgrade.stderr == ""
    assert cli("drift", env=env).stderr == ""
    downgrade = cli("downgrade", "-r", "0001", "--yes", env=env)
    assert downgrade.returncode == 0 and downgrade.stderr == ""

    verbose = cli("upgrade", "-r", "0002", "--yes", "-v", env=env)
    assert verbose.returncode == 0
    assert "INFO  [alembic.runtime.migration] Running upgrade 0001 -> 0002" in verbose.stderr
    assert stderr_lines(verbose.stderr) == []
    assert sql(target, "SELECT version_num FROM alembic_version") == [("0002",)]
