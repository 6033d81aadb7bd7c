"""What a command prints when the project's env.py and revisions print and log too: under --json,
stdout is the JSON alone; the lint's offline rendering of the revisions never shows."""

import json

import pytest

from tests.support.helpers import scalar, sql
from tests.support.projects import CHATTY_NOISE, OFFLINE_WARNING, chatty_project


@pytest.fixture
def chatty(cli, url, tmp_path) -> dict:
    """The options of a chatty project (tests/support/projects.py) whose database is at r1, t holding a row."""
    ini = str(chatty_project(tmp_path))
    env = {"DATABASE_URL": url}
    assert cli("upgrade", "-r", "r1", "--yes", "--alembic-config", ini, env=env).returncode == 0
    sql(url, "INSERT INTO t VALUES (1)")
    return {"args": ("--alembic-config", ini), "env": env}


@pytest.mark.parametrize("command, key", [
    (("lint",), "revisions"), (("upgrade", "--yes"), "migrations_applied"), (("drift",), "findings"),
    (("rehearse",), "steps")])
def test_under_json_stdout_is_the_json_alone(cli, chatty, command, key):
    result = cli(*command, "--json", *chatty["args"], env=chatty["env"])
    assert result.returncode == 0, result.stderr
    assert key in json.loads(result.stdout)  # nothing before or after the JSON
    assert "env.py: a subprocess writes to stdout" in result.stderr  # not lost: on stderr
    if command[0] != "lint":  # the lint only renders offline, whose output is kept out (the next test)
        assert "env.py: loading the application" in result.stderr
        assert "env.py: application log line" in result.stderr


def test_an_upgrade_shows_what_the_revisions_print_online_not_their_offline_warnings(cli, chatty, url):
    result = cli("upgrade", "--yes", *chatty["args"], env=chatty["env"])
    assert result.returncode == 0, result.stderr
    assert scalar(url, "SELECT count(*) FROM t") == 0
    output = result.stdout + result.stderr
    assert [line for line in CHATTY_NOISE if line in output] == list(CHATTY_NOISE[:-1])
    assert OFFLINE_WARNING not in output
    assert "succeeded: r1 -> r2" in result.stdout
