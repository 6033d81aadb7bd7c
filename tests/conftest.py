"""The fixtures: a real PostgreSQL on loopback, a fresh database per test, and a `cli`
runner that runs the command line (in this process, or as `python -m dbmigrate`) and checks
every output for the canary password. What else the tests share is in tests/support/."""

from __future__ import annotations

import functools
import os
import signal
from pathlib import Path

import pytest

from dbmigrate.target import DatabaseTarget
from tests.support import pgcluster, prefect_server
from tests.support.helpers import libpq_url, run_cli, s3_bucket_block, save_environment

os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"

# A suite started in the background of a shell without job control (`make test &` in a script, or a
# tool that runs commands so) inherits SIGINT and SIGQUIT ignored, and so would every process it starts:
# the tests that play a terminal's Ctrl-C or a runner's cancel (tests/test_github_workflow.py) then
# waited minutes for processes that could not hear it. Their processes start as from a terminal.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
if signal.getsignal(signal.SIGQUIT) == signal.SIG_IGN:
    signal.signal(signal.SIGQUIT, signal.SIG_DFL)


@pytest.fixture(scope="session", autouse=True)
def pgserver_system_user():
    pgcluster.add_system_user_once()


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
    return libpq_url(target)


@pytest.fixture
def home(tmp_path) -> Path:
    path = tmp_path / "state"
    path.mkdir()
    return path


@pytest.fixture
def cli(home):
    """Run `dbmigrate ARGS` from the repository root, as a user would (run_cli: in this process unless
    the test asks for a process)."""
    return functools.partial(run_cli, home)


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's S3 server on a loopback port: real HTTP, real multipart uploads."""
    from moto.server import ThreadedMotoServer

    port = pgcluster.free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


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


@pytest.fixture
def environment(prefect_api, target, home, monkeypatch):
    """save_environment against the test harness's API, with DBMIGRATE_HOME the test's."""
    monkeypatch.setenv("DBMIGRATE_HOME", str(home))
    return lambda name, **options: save_environment(target, name, **options)


@pytest.fixture(scope="session", autouse=True)
def prefect_home_template(tmp_path_factory):
    """Where the tests' Prefect servers find the home they start from (prefect_server.HOME_TEMPLATE):
    beside the xdist workers' base directories, so the session makes it once."""
    root = tmp_path_factory.getbasetemp()
    prefect_server.HOME_TEMPLATE = (root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root) / "prefect-home"


# The xdist groups (each a module or two owning a server), by the wall time they took, heaviest first
# (2026-12-06). With `--no-loadscope-reorder` xdist hands the work units out in collection order, the
# next to whichever worker has two tests or fewer left: the longest start first and the run does not end
# on a long group started late (xdist's own order, by test count, started the orchestration server's
# and the fleet's sixth and eighth).
GROUPS_HEAVIEST_FIRST = (
    "prefect-server-fleet", "local-stack", "prefect-server-orchestration-processes",
    "prefect-server-orchestration-server", "prefect-server-github-workflow", "prefect-server-deployments",
    "prefect-server-approval-ui", "application-venv", "prefect-server-alerts",
)


def pytest_collection_modifyitems(items):
    """Run alone, the unit layer (tests/unit: no servers, about a second) runs first: a broken rule
    shows at once, not after the servers have started. On xdist workers, the groups go first,
    heaviest first (GROUPS_HEAVIEST_FIRST), then every test on its own."""
    def group(item) -> str | None:
        marker = item.get_closest_marker("xdist_group")
        return marker.args[0] if marker else None

    if os.environ.get("PYTEST_XDIST_WORKER"):
        order = {name: index for index, name in enumerate(GROUPS_HEAVIEST_FIRST)}
        items.sort(key=lambda item: order.get(group(item), len(order)))
    else:
        items.sort(key=lambda item: not item.nodeid.startswith("tests/unit/"))
