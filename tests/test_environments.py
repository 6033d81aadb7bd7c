"""--env NAME: credentials from a DatabaseCredentials block on a real Prefect API."""

import json
import subprocess
import sys
import time

import pytest

from tests.support.helpers import REPO, fingerprint_of, last_report, one_line_error
from tests.support.pgcluster import CANARY_PASSWORD, environ_without_db, free_port


@pytest.fixture
def staging(prefect_api, target):
    from blocks import DatabaseCredentials

    DatabaseCredentials.register_type_and_schema()
    DatabaseCredentials(
        host="127.0.0.1", port=target.port, database=target.database, username="postgres",
        password=CANARY_PASSWORD, sslmode="disable", connect_timeout=5,
    ).save("staging", overwrite=True)
    return {"PREFECT_API_URL": prefect_api}


def test_blocks_register_with_the_prefect_cli(prefect_api):
    env = {**environ_without_db(), "PREFECT_API_URL": prefect_api}
    result = subprocess.run([sys.executable, "-m", "prefect", "block", "register", "-m", "blocks"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "dbmigrate Database Credentials" in result.stdout


def test_upgrade_with_env_reads_the_block(cli, staging, home, target):
    status = cli("status", "--json", "--env", "staging", env=staging)
    assert status.returncode == 0, status.stderr
    state = json.loads(status.stdout)
    assert state["environment"] == "staging" and state["database"]["name"] == target.database

    result = cli("upgrade", "--env", "staging", "--backup", "--yes", env=staging)
    assert result.returncode == 0, result.stderr
    report = last_report(home)
    assert report["environment"] == "staging" and report["status"] == "succeeded"
    assert f"/backups/staging/{target.database}/" in report["backup"]["location"]


def test_env_errors_are_one_line(cli, staging, url):
    missing = cli("status", "--env", "nope", env=staging)
    assert missing.returncode == 2
    assert missing.stderr.strip() == (
        "dbmigrate: error: no DatabaseCredentials block named 'nope' "
        "(create one, see docs/ENVIRONMENTS.md#environments-prefect-blocks)"
    )
    both = cli("status", "--env", "staging", env={**staging, "DATABASE_URL": url})
    assert both.returncode == 2 and "DATABASE_URL is also set" in both.stderr

    closed = f"http://127.0.0.1:{free_port()}/api"
    down = cli("status", "--env", "staging", env={"PREFECT_API_URL": closed})
    assert down.returncode == 2
    assert down.stderr.startswith(f"dbmigrate: error: the Prefect API at {closed} is unreachable: ")
    assert len(down.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("command", [["status", "--env", "staging"],
                                     ["blocks", "sync", "--env", "staging", "--from-env"]])
def test_no_prefect_api_is_one_fast_line_and_no_server(command, tmp_path, target):
    """With PREFECT_API_URL unset (in the environment and in any profile) Prefect would start a
    throw-away server of its own, then find no block in it: refused at once instead."""
    import psutil

    env = {k: v for k, v in environ_without_db().items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), DBMIGRATE_HOME=str(tmp_path / "state"),
               DB_HOST="127.0.0.1", DB_NAME="app", DB_USER="postgres", DB_PASSWORD=CANARY_PASSWORD)
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "dbmigrate", *command], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    children = set()
    while proc.poll() is None:
        try:
            children |= {" ".join(c.cmdline()) for c in psutil.Process(proc.pid).children(recursive=True)}
        except psutil.Error:
            pass
        time.sleep(0.05)
    elapsed = time.monotonic() - started
    out, err = proc.communicate()
    assert proc.returncode == 2 and not out
    assert err == ("dbmigrate: error: no Prefect API: set PREFECT_API_URL (your server's, or the one "
                   "`dbmigrate local up` prints)\n")
    assert not children, f"started {children}"
    assert elapsed < 10, f"took {elapsed:.1f}s"


def test_a_block_can_name_the_embedded_servers_socket(cli, prefect_api, home):
    """host: the socket directory, no password (the socket trusts this machine's users)."""
    from blocks import DatabaseCredentials
    from dbmigrate import local

    try:
        assert cli("local", "start").returncode == 0
        server = local.running(home)
        DatabaseCredentials(host=server.socket_dir, port=server.port, database="app", username="postgres",
                            sslmode="disable").save("on-the-socket", overwrite=True)
        status = cli("status", "--json", "--env", "on-the-socket", env={"PREFECT_API_URL": prefect_api})
        assert status.returncode == 0, status.stderr
        state = json.loads(status.stdout)
        assert state["database"] == {"host": server.socket_dir, "port": server.port, "name": "app",
                                     "user": "postgres"}
    finally:
        cli("local", "stop")


def test_backups_to_an_s3_bucket_block(cli, staging, s3_endpoint, target, home):
    from tests.support.helpers import s3_bucket_block

    block = s3_bucket_block(s3_endpoint, "staging-backups", "dbmigrate")
    block.credentials.get_s3_client().create_bucket(Bucket="staging-backups")
    block.save("staging-backups", overwrite=True)
    env = {**staging, "DBMIGRATE_BACKUP_STORAGE": "s3-bucket/staging-backups"}

    taken = cli("backup", "--env", "staging", "--json", env=env)
    assert taken.returncode == 0, taken.stderr
    manifest = json.loads(taken.stdout)
    assert manifest["location"] == f"s3://staging-backups/dbmigrate/{manifest['key']}"
    assert manifest["key"].startswith(f"staging/{target.database}/")

    upgraded = cli("upgrade", "--env", "staging", "--backup", "--yes", env=env)
    assert upgraded.returncode == 0, upgraded.stderr
    listed = json.loads(cli("backups", "list", "--env", "staging", "--json", env=env).stdout)
    assert len(listed) == 2 and listed[1]["id"] == manifest["id"]
    assert not (home / "backups").exists(), "nothing may be written to local disk when storage is S3"

    missing = cli("backups", "list", "--env", "staging", "--storage", "s3-bucket/nope", env=staging)
    assert missing.returncode == 2 and "no S3Bucket block named 'nope'" in missing.stderr


def test_a_backup_storage_naming_a_missing_block_says_how_to_create_it(cli, staging, target, home):
    """`upgrade --backup` fails in the backup phase, one line saying how to create the block; nothing changed."""
    before = fingerprint_of(target)
    result = cli("upgrade", "--env", "staging", "--backup", "--yes",
                 env={**staging, "DBMIGRATE_BACKUP_STORAGE": "s3-bucket/backups"})
    missing = ("no S3Bucket block named 'backups': create it (`dbmigrate blocks sync --env ENV --from-env` with "
               "BACKUP_BUCKET set, or a prefect-aws S3Bucket block saved as 'backups' in the Prefect UI), or give "
               "another backup storage (see docs/BACKUPS.md#storage)")
    assert result.returncode == 2 and one_line_error(result.stderr) == f"dbmigrate: error: {missing}"
    assert "upgrade failed in backup: nothing was changed" in result.stdout
    report = last_report(home)
    assert report["error"]["phase"] == "backup" and report["backup"] is None
    assert fingerprint_of(target) == before
    assert sorted(p.name for p in home.iterdir()) == ["reports"], "nothing but the report was written"

    backup = cli("backup", "--env", "staging", "--storage", "s3-bucket/backups", env=staging)
    assert backup.returncode == 2 and one_line_error(backup.stderr) == f"dbmigrate: error: {missing}"


def test_env_takes_the_environment_the_block_records(cli, environment, prefect_api, target):
    """--env replica, a block recording production's database: the command works on production."""
    from blocks import DatabaseCredentials

    environment("replica", database_of="production")
    status = cli("status", "--json", "--env", "replica", env={"PREFECT_API_URL": prefect_api})
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["environment"] == "production"

    hostile = DatabaseCredentials.model_construct(  # what a hand-edited document may hold
        host="127.0.0.1", port=target.port, database=target.database, username="postgres",
        password=CANARY_PASSWORD, sslmode="disable", connect_timeout=5, environment="../../etc")
    hostile.save("hostile", overwrite=True)
    refused = cli("status", "--env", "hostile", env={"PREFECT_API_URL": prefect_api})
    assert refused.returncode == 2
    assert refused.stderr.startswith("dbmigrate: error: DatabaseCredentials block 'hostile' is invalid: environment:")
    assert len(refused.stderr.strip().splitlines()) == 1
