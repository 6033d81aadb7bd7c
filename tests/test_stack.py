"""`dbmigrate local up` refusing what it cannot run on (a busy port, no checkout) before it starts
anything, and the worker it starts. The stack running, the demo job and `local down`: tests/test_e2e.py."""

import socket
import subprocess

import pytest

from tests.support.helpers import REPO, run_cli

# One local stack at a time: the e2e tests and test_stack run on one worker (--dist loadgroup).
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("local-stack")]



def test_the_worker_asks_for_runs_every_second_unless_told_otherwise(home, monkeypatch):
    """A run waits for the worker's next query: the stack's worker asks every second (Prefect's default
    is 10 s, the stack's was 2 s), half a second of a run's fixed cost on average; an operator's own
    PREFECT_WORKER_QUERY_SECONDS wins."""
    from stack import provision

    monkeypatch.delenv("PREFECT_WORKER_QUERY_SECONDS", raising=False)
    assert provision.worker_environ(home, REPO, "http://127.0.0.1:9/api")["PREFECT_WORKER_QUERY_SECONDS"] == "1"
    monkeypatch.setenv("PREFECT_WORKER_QUERY_SECONDS", "5")
    assert provision.worker_environ(home, REPO, "http://127.0.0.1:9/api")["PREFECT_WORKER_QUERY_SECONDS"] == "5"


def test_local_up_refuses_busy_ports_and_starts_nothing(home):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        busy_line = (f"dbmigrate: error: port {port} on 127.0.0.1 is busy: choose another with --prefect-port, or "
                     "DBMIGRATE_PREFECT_PORT=PORT (make demo PREFECT_PORT=PORT)\n")
        refused = run_cli(home, "local", "up", "--prefect-port", str(port), process=True)
        assert refused.returncode == 2 and refused.stderr == busy_line
        by_variable = run_cli(home, "local", "up", env={"DBMIGRATE_PREFECT_PORT": str(port)}, process=True)
        assert by_variable.returncode == 2 and by_variable.stderr == busy_line
        demo = subprocess.run(["make", "demo", f"PREFECT_PORT={port}", f"DBMIGRATE_HOME={home}"], cwd=REPO,
                              capture_output=True, text=True, timeout=120)
        assert demo.returncode != 0 and busy_line in demo.stderr, demo.stdout + demo.stderr
        assert run_cli(home, "local", "status", process=True).returncode == 1

        pg = run_cli(home, "local", "start", "--pg-port", str(port), process=True)
        assert pg.returncode == 2
        assert pg.stderr == f"dbmigrate: error: port {port} on 127.0.0.1 is busy: choose another with --pg-port\n"
        assert run_cli(home, "local", "status", process=True).returncode == 1


def test_local_up_needs_a_checkout(home, tmp_path):
    elsewhere = run_cli(home, "local", "up", cwd=tmp_path, process=True)
    assert elsewhere.returncode == 2
    assert elsewhere.stderr == (f"dbmigrate: error: no prefect.yaml in {tmp_path.resolve()}: run `dbmigrate local up` "
                                "from a checkout of the repository\n")
