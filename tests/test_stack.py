"""`dbmigrate local up|status|down`: the local stack on fresh ports (the embedded PostgreSQL on
loopback TCP, a real `prefect server start`, blocks, deployments, a process worker), and the main
job run the way operators and the GitHub workflow run it: `prefect deployment run --watch`."""

import base64
import json
import os
import socket
import stat
import subprocess
import threading
import time

import psycopg
import pytest

from dbmigrate.policy import ENVIRONMENTS
from tests.support.helpers import REPO, SAMPLE_HEAD, open_to_others, reports_in, run_cli
from tests.support.local_stack import Stack, alive
from tests.support.prefect_server import PREFECT

# One local stack at a time: the e2e tests and test_stack run on one worker (--dist loadgroup).
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("local-stack")]



def test_local_up_runs_the_stack_and_the_main_job_then_down_stops_it_in_order(stack):
    started = time.monotonic()
    first = stack.up()
    took = time.monotonic() - started
    assert first.returncode == 0, first.stdout + first.stderr
    assert f"export PREFECT_API_URL={stack.api}" in first.stdout.splitlines()
    assert f"UI:  http://127.0.0.1:{stack.prefect_port}  (runs, their logs and artifacts)" in first.stdout

    password_file = stack.home / "local-password"
    assert stat.S_IMODE(password_file.stat().st_mode) == 0o600
    for database in ENVIRONMENTS:
        with psycopg.connect(host="127.0.0.1", port=stack.pg_port, user="postgres", password=stack.password,
                             dbname=database) as conn:
            assert conn.execute("SELECT current_database()").fetchone() == (database,)
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(host="127.0.0.1", port=stack.pg_port, user="postgres", password="wrong", dbname="staging")

    status = stack.cli("local", "status")
    assert status.returncode == 0
    assert status.stdout.startswith("running: pid ")
    for line in (f"tcp: 127.0.0.1:{stack.pg_port}, user postgres, password in {password_file}",
                 f"UI: http://127.0.0.1:{stack.prefect_port}", f"PREFECT_API_URL={stack.api}"):
        assert line in status.stdout.splitlines()
    assert f"prefect server: running, pid {stack.pids()['server']}, http://127.0.0.1:{stack.prefect_port}" \
        in status.stdout
    assert f"worker: running, pid {stack.pids()['worker']}, pool dbmigrate" in status.stdout

    _blocks_reach_their_databases(stack)
    auth_file = stack.home / "prefect-auth"
    assert stack.cli("local", "env").stdout == (f"export PREFECT_API_URL={stack.api}\n"
                                                f'export PREFECT_API_AUTH_STRING="$(cat {auth_file})"\n')
    assert stat.S_IMODE(auth_file.stat().st_mode) == 0o600
    _the_api_refuses_whoever_lacks_the_auth_string(stack)

    second = stack.up()
    assert second.returncode == 0, second.stderr
    for part in ("postgresql: already running", "prefect server: already running", "worker: already running",
                 "work pool dbmigrate: exists", "deployments: up to date"):
        assert part in second.stdout
    assert [line for line in second.stdout.splitlines() if line.startswith("block ")] == [
        f"block dbmigrate-database-credentials/{name}: unchanged" for name in ENVIRONMENTS]

    run = subprocess.run([PREFECT, "deployment", "run", "db-migrate/development", "--watch"], cwd=REPO,
                         env={**os.environ, **stack.client_env}, capture_output=True, text=True, timeout=300,
                         check=False)
    stack.outputs.append(run.stdout + run.stderr)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "Flow run finished successfully in 'Completed'." in run.stdout
    report = json.loads(reports_in(stack.home)[-1].read_text())
    assert (report["environment"], report["status"], report["revision_after"]) == (
        "development", "succeeded", SAMPLE_HEAD)
    with psycopg.connect(host="127.0.0.1", port=stack.pg_port, user="postgres", password=stack.password,
                         dbname="development") as conn:
        assert conn.execute("SELECT version_num FROM alembic_version").fetchall() == [(SAMPLE_HEAD,)]
    # Prefect's database (the key that decrypts the blocks), the logs, the run's backup and report: owner-only.
    assert (stack.home / "prefect" / "prefect.db").exists() and any((stack.home / "backups").rglob("*.json"))
    assert open_to_others(stack.home) == []
    # the command line, with no --env or URL, looks at the database the demo migrated
    status = stack.cli("status")
    assert status.returncode == 0 and status.stderr == "", status.stderr
    where, *state = status.stdout.splitlines()[:4]
    assert where.endswith(f":{stack.pg_port}/development (development)"), where
    assert state == [f"current:  {SAMPLE_HEAD}", f"head:     {SAMPLE_HEAD}", "pending:  0"]
    assert stack.cli("check").stdout == f"up to date: database at {SAMPLE_HEAD}\n"

    pids = stack.pids()
    gone = _watch_exits(pids)
    down = stack.cli("local", "down")
    assert down.returncode == 0, down.stderr
    assert down.stdout.splitlines() == [f"worker: stopped (pid {pids['worker']})",
                                        f"prefect server: stopped (pid {pids['server']})", "postgresql: stopped"]
    time.sleep(0.3)
    assert gone["worker"] < gone["server"] < gone["postgresql"], gone
    after = stack.cli("local", "status")
    assert after.returncode == 1
    assert after.stdout.splitlines() == [f"not running (data directory {stack.home.resolve() / 'pgdata'})",
                                         "prefect server: not running", "worker: not running"]
    no_env = stack.cli("local", "env")
    assert no_env.returncode == 2 and no_env.stderr.startswith("dbmigrate: error: the local Prefect server is not "
                                                               "running")

    secret = stack.password
    for where in [*stack.outputs, stack.logs(), *(p.read_text() for p in reports_in(stack.home))]:
        assert secret not in where
    print(f"first local up: {took:.1f}s")


def _blocks_reach_their_databases(stack: Stack) -> None:
    """load_target works for each environment's block, over TCP with the generated password."""
    from blocks import load_target
    from dbmigrate import db

    with stack.talking_to():
        for name in ENVIRONMENTS:
            target = load_target(name)
            assert (target.environment, target.host, target.port) == (name, "127.0.0.1", stack.pg_port)
            with db.connect(target) as conn:
                assert conn.exec_driver_sql("SELECT current_database()").scalar() == name


def _the_api_refuses_whoever_lacks_the_auth_string(stack: Stack) -> None:
    """Another user of the machine reaches 127.0.0.1: without the auth string the blocks' secrets
    (the database's password) stay closed; the health check stays open."""
    import httpx

    filter_secrets = f"{stack.api}/block_documents/filter"
    anonymous = httpx.post(filter_secrets, json={"include_secrets": True}, timeout=10)
    assert anonymous.status_code == 401 and stack.password not in anonymous.text
    wrong = httpx.post(filter_secrets, json={"include_secrets": True}, auth=("wrong", ""), timeout=10)
    assert wrong.status_code == 401
    assert httpx.get(f"{stack.api}/health", timeout=10).status_code == 200
    owner = httpx.post(filter_secrets, json={"include_secrets": True}, timeout=10,
                       headers={"Authorization": "Basic " + base64.b64encode(
                           stack.client_env["PREFECT_API_AUTH_STRING"].encode()).decode()})
    assert owner.status_code == 200 and stack.password in owner.text


def _watch_exits(pids: dict[str, int]) -> dict[str, float]:
    """When each process disappears, watched from now on in the background."""
    gone: dict[str, float] = {}

    def watch():
        deadline = time.monotonic() + 120
        while len(gone) < len(pids) and time.monotonic() < deadline:
            for name, pid in pids.items():
                if name not in gone and not alive(pid):
                    gone[name] = time.monotonic()
            time.sleep(0.01)

    threading.Thread(target=watch, daemon=True).start()
    return gone


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
