"""`dbmigrate blocks sync --env NAME --from-env` on a real Prefect API: what GitHub Actions and
operators run to set an environment up. Only what changed is written, no value is ever printed."""

import json
import uuid

import pytest

from tests.support.helpers import one_line_error
from tests.support.pgcluster import CANARY_PASSWORD

AWS_SECRET = "aws-" + CANARY_PASSWORD  # holds the canary: the cli fixture fails on any output showing it


def _variables(target, **overrides) -> dict[str, str]:
    return {"DB_HOST": "127.0.0.1", "DB_PORT": str(target.port), "DB_NAME": target.database, "DB_USER": "postgres",
            "DB_PASSWORD": CANARY_PASSWORD, "DB_SSLMODE": "disable", **overrides}


@pytest.fixture
def sync(cli, prefect_api):
    def run(environment: str, variables: dict[str, str]):
        return cli("blocks", "sync", "--env", environment, "--from-env",
                   env={"PREFECT_API_URL": prefect_api, **variables})
    return run


def no_alerts(name: str) -> str:
    return f"alerts of {name}: none (ALERT_WEBHOOK_URL or ALERT_SLACK_WEBHOOK_URL not set)"


def _credentials(name: str):
    from blocks import DatabaseCredentials

    return DatabaseCredentials.load(name)


def test_sync_creates_then_changes_only_what_changed(sync, cli, target, prefect_api):
    from blocks import DatabaseCredentials

    name = "env-" + uuid.uuid4().hex[:8]
    created = sync(name, _variables(target))
    assert created.returncode == 0, created.stderr
    assert created.stdout.splitlines() == [f"dbmigrate-database-credentials/{name}: created", no_alerts(name)]
    block = _credentials(name)
    assert (block.host, block.port, block.database, block.username, block.password.get_secret_value(),
            block.sslmode) == ("127.0.0.1", target.port, target.database, "postgres", CANARY_PASSWORD, "disable")
    status = cli("status", "--json", "--env", name, env={"PREFECT_API_URL": prefect_api})
    assert status.returncode == 0 and json.loads(status.stdout)["database"]["name"] == target.database

    # a field set in the UI, not by the variables: kept by every later sync
    DatabaseCredentials(**{**dict(block), "connect_timeout": 33}).save(name, overwrite=True)
    again = sync(name, _variables(target))
    assert again.stdout.splitlines() == [f"dbmigrate-database-credentials/{name}: unchanged", no_alerts(name)]

    changed = sync(name, _variables(target, DB_PORT="6543", DB_PASSWORD=CANARY_PASSWORD + "-new"))
    assert changed.returncode == 0, changed.stderr
    assert changed.stdout.splitlines() == [f"dbmigrate-database-credentials/{name}: updated: port, password",
                                           no_alerts(name)]
    block = _credentials(name)
    assert (block.port, block.password.get_secret_value(), block.connect_timeout, block.database) == (
        6543, CANARY_PASSWORD + "-new", 33, target.database)


def test_sync_refuses_missing_or_bad_variables_and_writes_nothing(sync, target):
    name = "env-" + uuid.uuid4().hex[:8]
    missing = sync(name, _variables(target, DB_HOST="", DB_PASSWORD=""))
    assert missing.returncode == 2
    assert one_line_error(missing.stderr) == (
        f"dbmigrate: error: missing DB_HOST, DB_PASSWORD: set them to sync the blocks of {name}")

    bad_port = sync(name, _variables(target, DB_PORT="5432x"))
    assert bad_port.returncode == 2 and one_line_error(bad_port.stderr).startswith("dbmigrate: error: DB_PORT: ")

    half_pair = sync(name, _variables(target, BACKUP_BUCKET="b", AWS_ACCESS_KEY_ID="AKIA"))
    assert half_pair.returncode == 2
    assert "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY go together" in one_line_error(half_pair.stderr)

    with pytest.raises(ValueError):
        _credentials(name)


def test_sync_creates_a_bucket_pair_that_backups_go_to(sync, cli, target, prefect_api, s3_endpoint, home):
    """BACKUP_BUCKET and the AWS_* variables: an S3Bucket and its AwsCredentials, referenced, usable as
    s3-bucket/<env>-backups by a run; a second sync finds all three unchanged."""
    from prefect_aws import S3Bucket

    from tests.support.helpers import s3_bucket_block

    name = "env-" + uuid.uuid4().hex[:8]
    bucket = "sync-" + uuid.uuid4().hex[:8]
    s3_bucket_block(s3_endpoint, bucket).credentials.get_s3_client().create_bucket(Bucket=bucket)
    variables = _variables(target, BACKUP_BUCKET=bucket, BACKUP_BUCKET_FOLDER="dbmigrate",
                           AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY=AWS_SECRET, AWS_REGION="us-east-1",
                           AWS_ENDPOINT_URL=s3_endpoint)
    created = sync(name, variables)
    assert created.returncode == 0, created.stderr
    assert created.stdout.splitlines() == [
        f"dbmigrate-database-credentials/{name}: created",
        f"aws-credentials/{name}-aws: created",
        f"s3-bucket/{name}-backups: created",
        no_alerts(name),
        (f"backups of {name}: s3-bucket/{name}-backups (a run's backup_storage parameter, "
         f"or DBMIGRATE_BACKUP_STORAGE=s3-bucket/{name}-backups on its worker)"),
    ]
    stored = S3Bucket.load(f"{name}-backups")
    assert (stored.bucket_name, stored.bucket_folder) == (bucket, "dbmigrate")
    assert stored.credentials.aws_client_parameters.endpoint_url == s3_endpoint

    taken = cli("backup", "--env", name, "--storage", f"s3-bucket/{name}-backups", "--json",
                env={"PREFECT_API_URL": prefect_api})
    assert taken.returncode == 0, taken.stderr
    assert json.loads(taken.stdout)["location"].startswith(f"s3://{bucket}/dbmigrate/{name}/")
    assert not (home / "backups").exists()

    again = sync(name, variables)
    assert [line.rsplit(": ", 1)[1] for line in again.stdout.splitlines()[:3]] == ["unchanged"] * 3
    moved = sync(name, {**variables, "BACKUP_BUCKET_FOLDER": "elsewhere"})
    assert moved.stdout.splitlines()[:3] == [f"dbmigrate-database-credentials/{name}: unchanged",
                                             f"aws-credentials/{name}-aws: unchanged",
                                             f"s3-bucket/{name}-backups: updated: bucket_folder"]



@pytest.mark.parametrize("variable, value, problem", [
    ("DB_HOST", "db.example.com\n", "holds a control character (a newline?)"),
    ("DB_HOST", "db'.example.com", "holds a quote"),
    ("DB_HOST", "db.example.com ", "begins or ends with a space"),
    ("DB_HOST", "db example com", "is not a host name, an IP address or a socket directory"),
    ("DB_NAME", "x" * 100_000, "is 100000 bytes long: PostgreSQL names are at most 63"),
    ("DB_NAME", "\u00e9" * 32, "is 64 bytes long: PostgreSQL names are at most 63"),
    ("DB_USER", "postgres\nroot", "holds a control character (a newline?)"),
    ("DB_USER", '"postgres"', "holds a quote"),
], ids=["host newline", "host quote", "host trailing space", "host with spaces", "name of 100000", "name of 64 bytes",
        "user newline", "user quoted"])
def test_sync_refuses_a_host_or_name_no_connection_could_use(variable, value, problem, target, prefect_api):
    from blocks.sync import sync_environment
    from dbmigrate.errors import ConfigError

    name = "env-" + uuid.uuid4().hex[:8]
    with pytest.raises(ConfigError) as refused:
        sync_environment(name, _variables(target, **{variable: value}), alerts=True)
    assert str(refused.value) == f"{variable} {problem}: nothing was written"
    with pytest.raises(ValueError):
        _credentials(name)


@pytest.mark.parametrize("environment", ["Staging", "e" * 64])
def test_sync_refuses_an_environment_prefect_cannot_name_a_block_after(environment, target, prefect_api):
    from blocks.sync import sync_environment
    from dbmigrate.errors import ConfigError

    with pytest.raises(ConfigError, match="^not an environment name: .*it names Prefect blocks: up to 63 lowercase "
                                          "letters, digits and -"):
        sync_environment(environment, _variables(target))


def test_sync_refuses_an_underscore_in_one_line_before_writing(sync, target):
    """Prefect's block names allow no '_', though the environment's own name check did."""
    result = sync("my_env", _variables(target))
    assert result.returncode == 2
    assert one_line_error(result.stderr) == ("dbmigrate: error: not an environment name: 'my_env' (it names Prefect "
                                             "blocks: up to 63 lowercase letters, digits and -)")
    with pytest.raises(ValueError):
        _credentials("my_env")


def test_sync_takes_a_socket_directory_and_an_ipv6_address(target, prefect_api):
    from blocks.sync import sync_environment

    for host in ("/var/run/postgresql", "::1"):
        name = "env-" + uuid.uuid4().hex[:8]
        sync_environment(name, _variables(target, DB_HOST=host))
        assert _credentials(name).host == host
