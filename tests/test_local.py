"""The embedded local database: what the command line uses with no URL and no block."""

import json

from tests.helpers import SAMPLE_HEAD


def test_local_database_is_started_reused_and_stopped(cli, home):
    try:
        first = cli("upgrade", "--backup", "--yes")
        assert first.returncode == 0, first.stderr
        assert "succeeded: base -> 0006" in first.stdout

        status = cli("local", "status")
        assert status.returncode == 0 and status.stdout.startswith("running: pid ")
        assert str(home.resolve() / "pgdata") in status.stdout

        state = json.loads(cli("status", "--json").stdout)
        assert state["environment"] == "local" and state["current"] == [SAMPLE_HEAD]

        second = cli("upgrade", "--backup", "--yes")
        assert second.returncode == 0 and "nothing to do: database already at 0006" in second.stdout
    finally:
        stop = cli("local", "stop")
    assert stop.returncode == 0 and stop.stdout.strip() == "stopped"
    after = cli("local", "status")
    assert after.returncode == 1 and after.stdout.startswith("not running")
