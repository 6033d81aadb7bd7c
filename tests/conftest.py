"""Shared fixtures: a real PostgreSQL on loopback, a fresh database per test, and a
`cli` runner that executes the installed command line and checks every output for
the canary password."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote

import pytest

from dbmigrate import db, fingerprint
from dbmigrate.target import DatabaseTarget
from tests import pgcluster
from tests.pgcluster import CANARY_PASSWORD

os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"

REPO = Path(__file__).resolve().parent.parent
SAMPLE_CONFIG = REPO / "alembic.ini"
SAMPLE_HEAD = "0006"


def assert_no_canary(text: str, where: str) -> None:
    for form in (CANARY_PASSWORD, quote(CANARY_PASSWORD, safe="")):
        assert form not in text, f"the password leaked into {where}"


@pytest.fixture(scope="session")
def pg_cluster(tmp_path_factory):
    with pgcluster.running(tmp_path_factory.mktemp("pg")) as cluster:
        yield cluster


@pytest.fixture
def db_name(pg_cluster):
    name = pg_cluster.create_database()
    yield name
    pg_cluster.drop_database(name)


@pytest.fixture
def target(pg_cluster, db_name) -> DatabaseTarget:
    return pg_cluster.target(db_name)


@pytest.fixture
def url(target) -> str:
    return target.url.set(drivername="postgresql").render_as_string(hide_password=False)


@pytest.fixture
def home(tmp_path) -> Path:
    path = tmp_path / "state"
    path.mkdir()
    return path


def one_line_error(stderr: str) -> str:
    """The one line a failed command prints (Alembic's own INFO lines aside)."""
    lines = [line for line in stderr.splitlines() if not line.startswith("INFO  [alembic")]
    assert len(lines) == 1 and lines[0].startswith("dbmigrate: error: "), stderr
    return lines[0]


def run_on_a_terminal(args: list[str], answers: dict[bytes, str], env: dict) -> tuple[int, str]:
    """dbmigrate on a real pseudo-terminal, answering each prompt once as it appears."""
    import pty

    pid, fd = pty.fork()
    if pid == 0:
        os.chdir(REPO)
        os.execve(sys.executable, [sys.executable, "-m", "dbmigrate", *args], env)
    output, pending = b"", dict(answers)
    while True:
        try:
            chunk = os.read(fd, 1024)
        except OSError:
            break
        if not chunk:
            break
        output += chunk
        for prompt in [p for p in pending if p in output]:
            os.write(fd, pending.pop(prompt).encode() + b"\n")
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), output.decode()


def recording_pg_dump(target: DatabaseTarget, directory: Path) -> tuple[Path, Path]:
    """A pass-through pg_dump in ``directory``/bin (for PG_BIN_DIR) that logs its argv, and
    whether it got a password through its environment, to the returned log file."""
    from dbmigrate import pgtools

    with db.connect(target) as conn:
        real = pgtools.find("pg_dump", db.server_version(conn)[0])
    shim_dir, log = directory / "bin", directory / "pg_dump.log"
    shim_dir.mkdir()
    (shim_dir / "pg_dump").write_text(
        "#!/bin/sh\n"
        f'printf "argv: %s\\n" "$*" >> {log}\n'
        f'[ -n "$PGPASSWORD" ] && echo "password: from environment" >> {log}\n'
        f'exec {real} "$@"\n'
    )
    (shim_dir / "pg_dump").chmod(0o755)
    return shim_dir, log


def fingerprint_of(target: DatabaseTarget) -> fingerprint.Fingerprint:
    with db.connect(target) as conn:
        return fingerprint.take(conn)


def reports_in(home: Path) -> list[Path]:
    return sorted((home / "reports").glob("*.json"))


@pytest.fixture
def cli(home):
    """Run `python -m dbmigrate ARGS` from the repository root, as a user would."""

    def run(*args: str, env: dict | None = None, input: str | None = None, cwd: Path = REPO):
        environ = {**pgcluster.environ_without_db(), "DBMIGRATE_HOME": str(home), **(env or {})}
        result = subprocess.run(
            [sys.executable, "-m", "dbmigrate", *args],
            cwd=cwd, env=environ, input=input or "", capture_output=True, text=True, timeout=240,
        )
        assert_no_canary(result.stdout + result.stderr, f"the output of dbmigrate {' '.join(args[:1])}")
        assert "Traceback" not in result.stderr, result.stderr
        for report in reports_in(home):
            assert_no_canary(report.read_text(), str(report))
        return result

    return run


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's S3 server on a loopback port: real HTTP, real multipart uploads."""
    from moto.server import ThreadedMotoServer

    port = pgcluster.free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


def s3_bucket_block(endpoint: str, bucket: str, folder: str = "", client_config: dict | None = None):
    """A prefect-aws S3Bucket block for the moto endpoint (not saved to any API)."""
    from prefect_aws import AwsCredentials, S3Bucket
    from prefect_aws.client_parameters import AwsClientParameters

    credentials = AwsCredentials(
        aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1",
        aws_client_parameters=AwsClientParameters(endpoint_url=endpoint, config=client_config),
    )
    return S3Bucket(bucket_name=bucket, credentials=credentials, bucket_folder=folder)


@pytest.fixture
def s3_storage(s3_endpoint):
    import uuid

    from dbmigrate.storage import S3Storage

    bucket = "backups-" + uuid.uuid4().hex[:8]
    storage = S3Storage.from_block(s3_bucket_block(s3_endpoint, bucket, "db-backups"))
    storage.client.create_bucket(Bucket=bucket)
    return storage


@pytest.fixture(scope="session")
def prefect_api():
    """A real Prefect API (temporary server and database) for blocks and flows."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()


def save_environment(target: DatabaseTarget, name: str, database_of: str | None = None, port: int | None = None,
                     **policy) -> str:
    """Save blocks for the environment ``name`` to the current Prefect API: credentials of the
    test's database and a quick policy. ``database_of`` saves the database under that block
    name instead, recorded as belonging to the environment ``database_of`` (no policy block
    then); ``port`` points the block at another port."""
    from blocks import DatabaseCredentials, EnvironmentPolicy

    DatabaseCredentials(
        host="127.0.0.1", port=port or target.port, database=target.database, username="postgres",
        password=CANARY_PASSWORD, sslmode="disable", connect_timeout=5,
        **({"environment": database_of} if database_of else {}),
    ).save(name, overwrite=True)
    if database_of:
        return name
    # A test whose approver never comes fails in two minutes, not the default hour.
    quick = {"retry_delay_s": 0.2, "approval_poll_s": 1, "approval_timeout_s": 120}
    EnvironmentPolicy(**{**quick, **policy}).save(name, overwrite=True)
    return name


@pytest.fixture
def environment(prefect_api, target, home, monkeypatch):
    """save_environment against the test harness's API, with DBMIGRATE_HOME the test's."""
    monkeypatch.setenv("DBMIGRATE_HOME", str(home))
    return lambda name, **options: save_environment(target, name, **options)
