"""The orchestration tests' Prefect server (one per module: each module is an xdist group, so the
two run side by side), their worker (one per test: tests kill it) and environments."""

from __future__ import annotations

import pytest

from tests.support.helpers import save_environment
from tests.support.prefect_server import PrefectServer, deployed, working


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with deployed(PrefectServer(tmp_path_factory.mktemp("prefect-home"))) as server:
        yield server


@pytest.fixture
def worker(server, tmp_path):
    with working(server, tmp_path) as worker:
        yield worker


@pytest.fixture
def blocks(target):
    """Credentials and a quick policy for an environment, saved to the real server."""
    return lambda name, **policy: save_environment(target, name, **policy)
