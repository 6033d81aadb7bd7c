"""The embedded local database: what the command line uses with no URL and no block."""

import json

from tests.helpers import SAMPLE_HEAD


def started(home) -> str:
    return (f"dbmigrate: started the embedded PostgreSQL in {home.resolve() / 'pgdata'} (it was not running; "
            "dbmigrate local stop stops it)\n")


def test_local_database_is_started_reused_and_stopped(cli, home):
    try:
        first = cli("upgrade", "--backup", "--yes")
        assert first.returncode == 0, first.stderr
        assert "succeeded: base -> 0006" in first.stdout
        assert first.stderr == started(home), "a command that starts the server says so"

        status = cli("local", "status")
        assert status.returncode == 0 and status.stdout.startswith("running: pid ")
        assert str(home.resolve() / "pgdata") in status.stdout

        state = json.loads(cli("status", "--json").stdout)
        assert state["environment"] == "local" and state["current"] == [SAMPLE_HEAD]

        second = cli("upgrade", "--backup", "--yes")
        assert second.returncode == 0 and "nothing to do: database already at 0006" in second.stdout
        assert second.stderr == ""
    finally:
        stop = cli("local", "stop")
    assert stop.returncode == 0 and stop.stdout.strip() == "stopped"
    after = cli("local", "status")
    assert after.returncode == 1 and after.stdout.startswith("not running")
    try:
        again = cli("status")
        assert again.returncode == 0 and again.stderr == started(home), "the server the user stopped came back"
    finally:
        assert cli("local", "stop").stdout.strip() == "stopped"
