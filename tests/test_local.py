"""The embedded local database: what the command line uses with no URL and no block."""

import json
import os
import stat

from tests.support.helpers import SAMPLE_HEAD, open_to_others


def started(home) -> str:
    return (f"dbmigrate: started the embedded PostgreSQL in {home.resolve() / 'pgdata'} (it was not running; "
            "dbmigrate local stop stops it)\n")


def test_local_database_is_started_reused_and_stopped(cli, home):
    try:
        first = cli("upgrade", "--backup", "--yes")
        assert first.returncode == 0, first.stderr
        assert "succeeded: base -> 0006" in first.stdout
        assert first.stderr == started(home), "a command that starts the server says so"
        dumps = home.parent / "dumps"
        assert cli("backup", "--storage", str(dumps)).returncode == 0
        _owner_only(home, dumps)

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


def _owner_only(home, dumps):
    """The dumps, manifests, reports, the password and the embedded PostgreSQL's files: no group or
    other bits (the home made 0755 by the fixture is tightened too). As root, pgserver runs PostgreSQL
    as its own user, who may only pass through the home (0711) to its data directory."""
    assert stat.S_IMODE(home.stat().st_mode) == (0o711 if os.geteuid() == 0 else 0o700)
    assert stat.S_IMODE(dumps.stat().st_mode) == 0o700
    assert {"backups", "reports", "pgdata", "local-password"} <= {path.name for path in home.iterdir()}
    assert any(dumps.rglob("*.json")) and any((home / "reports").iterdir())
    assert open_to_others(home) == [] and open_to_others(dumps) == []
