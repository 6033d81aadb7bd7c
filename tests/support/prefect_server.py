"""A real Prefect server (`prefect server start`) and process workers for the tests
of the orchestration layer failing: processes we can SIGKILL, SIGTERM and restart.

The server keeps its SQLite database and its concurrency leases under its own
PREFECT_HOME, so a restart on the same port finds the runs and the slots they hold;
leases go to the filesystem lease storage, as docs/PREFECT.md "Deploying" asks of a real server
(the default keeps them in memory and a restart forgets which run holds a slot).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.support.helpers import REPO, wait_until
from tests.support.pgcluster import free_port

PREFECT = str(Path(sys.executable).parent / "prefect")


FILESYSTEM_LEASES = "prefect.server.concurrency.lease_storage.filesystem"
MEMORY_LEASES = "prefect.server.concurrency.lease_storage.memory"  # Prefect's default


def prefect_environ(home: Path, api_url: str, lease_storage: str = FILESYSTEM_LEASES, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": api_url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": lease_storage,
        # Workers ask for runs every 2 s, not Prefect's 10: a run a test starts is picked up at once,
        # for a few requests a second on a machine the suite keeps busy.
        "PREFECT_WORKER_QUERY_SECONDS": "2",
        **extra,
    }


@dataclass
class PrefectServer:
    home: Path
    port: int = field(default_factory=free_port)
    lease_storage: str = FILESYSTEM_LEASES
    settings: dict[str, str] = field(default_factory=dict)  # more PREFECT_* settings, e.g. the scheduler's loop
    process: subprocess.Popen | None = None

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def environ(self, **extra: str) -> dict[str, str]:
        return prefect_environ(self.home, self.api_url, self.lease_storage, **{**self.settings, **extra})

    def start(self, timeout: float = 120, from_template: bool = True) -> None:
        if from_template and HOME_TEMPLATE is not None and not (self.home / "prefect.db").exists():
            _copy_template(self.home)
        with open(self.home / "server.log", "ab") as log:  # the child keeps its own descriptor
            self.process = subprocess.Popen(
                [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(self.port)],
                env=self.environ(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, (self.home / "server.log").read_text()[-3000:]
            try:
                if httpx.get(f"{self.api_url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise AssertionError(f"prefect server did not answer in {timeout}s")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is None:
            return
        _end(self.process, sig)
        self.process = None


# A new server's home starts as a copy of one a server has set up already (Prefect's database
# migrated, its block types registered: about 6 of the 10 s of CPU a first `prefect server start`
# takes), with the `dbmigrate` pool and prefect.yaml's deployments the tests run (DEPLOYMENTS:
# `prefect deploy`, about 5 s of CPU more). Made once per test session, shared by its xdist workers
# (tests/conftest.py says where).
HOME_TEMPLATE: Path | None = None
_SET_UP = ("prefect.db", "memo_store.toml")  # all a first start leaves in its home besides its log


def _copy_template(home: Path) -> None:
    import fcntl
    import shutil
    import sqlite3

    with open(HOME_TEMPLATE.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one xdist worker makes it, the others wait
        if not (HOME_TEMPLATE / "prefect.db").exists():
            making = HOME_TEMPLATE.with_suffix(".making")
            shutil.rmtree(making, ignore_errors=True)
            making.mkdir(parents=True)
            server = PrefectServer(making)
            server.start(from_template=False)
            try:
                with client_pointed_at(server.api_url):
                    pool_and_deployments(server, *(f"--name={name}" for name in DEPLOYMENTS))
            finally:
                server.stop()
            with sqlite3.connect(making / "prefect.db") as db:  # all of it in the one file copied
                db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            making.rename(HOME_TEMPLATE)
    for name in _SET_UP:
        shutil.copy2(HOME_TEMPLATE / name, home / name)


@dataclass
class Worker:
    """`prefect worker start --pool dbmigrate` as docs/PREFECT.md "Deploying" runs it: no `--limit`
    (Prefect 3.8's worker with one exits when a run it has not let go of yet is scheduled again, as
    a retry from the UI right after the run failed does)."""

    server: PrefectServer
    environ: dict[str, str]
    log: Path
    process: subprocess.Popen | None = None
    limit: int | None = None  # its --limit: flow runs at once (a test placing runs on workers)

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [PREFECT, "worker", "start", "--pool", "dbmigrate", "--type", "process",
                 *(["--limit", str(self.limit)] if self.limit else [])],
                env=self.environ, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )

    def flow_run_pids(self) -> list[int]:
        """Processes the worker started (the flow runs), newest last."""
        import psutil

        if self.process is None:
            return []
        children = psutil.Process(self.process.pid).children(recursive=True)
        return [c.pid for c in sorted(children, key=lambda c: c.create_time())]

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Signal the worker alone, as systemd or an operator stopping it would."""
        if self.process is not None:
            _end(self.process, sig, group=False)
            self.process = None

    def kill_all(self) -> None:
        """SIGKILL the worker and every flow-run process it started, as a lost machine would."""
        if self.process is None:
            return
        import psutil

        everyone = [self.process.pid, *(c.pid for c in psutil.Process(self.process.pid).children(recursive=True))]
        for pid in everyone:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.process.wait(30)
        psutil.wait_procs([p for p in map(_process, everyone) if p], timeout=30)
        self.process = None


def _process(pid: int):
    import psutil

    try:
        return psutil.Process(pid)
    except psutil.NoSuchProcess:
        return None


def _end(process: subprocess.Popen, sig: int, group: bool = True) -> None:
    if process.poll() is not None:
        return
    try:
        (os.killpg if group else os.kill)(process.pid, sig)
    except ProcessLookupError:
        return
    try:
        process.wait(60)
    except subprocess.TimeoutExpired:
        (os.killpg if group else os.kill)(process.pid, signal.SIGKILL)
        process.wait(30)


def prefect(server: PrefectServer, *args: str, cwd: Path, env: dict[str, str] | None = None) -> str:
    result = subprocess.run([PREFECT, "--no-prompt", *args], cwd=cwd, env=env or server.environ(),
                            capture_output=True, text=True, timeout=240, check=False)
    assert result.returncode == 0, f"prefect {' '.join(args)}: {result.stdout[-2000:]} {result.stderr[-2000:]}"
    return result.stdout


# The deployments of prefect.yaml these tests run (each name: db-migrate's, db-migrate-fleet's and
# db-migrate-fleet-batch's), in every server's home from the start. Not the scheduled ones (db-health,
# db-backup): the server's scheduler would give the worker their nightly runs to pick up when a test runs
# at that hour.
DEPLOYMENTS = ("development", "staging", "production", "staging-rollback")


@contextmanager
def client_pointed_at(api_url: str, settings: dict | None = None):
    """This process's Prefect client pointed at another API for a while (``settings``: more Prefect
    settings, keyed by their objects). Prefect keeps one events worker and one log worker per process, bound
    to the API that was current when they started: both are drained and dropped on the way in and out,
    so none outlives its server (a later test's flow would send its task runs there) or follows the
    harness in."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.settings import PREFECT_API_URL, temporary_settings

    def drain() -> None:
        APILogWorker.drain_all()
        EventsWorker.drain_all()

    drain()
    try:
        with temporary_settings(updates={PREFECT_API_URL: api_url, **(settings or {})}):
            yield
    finally:
        drain()


@contextmanager
def deployed(server: PrefectServer):
    """The server started from the template's home (the dbmigrate pool and prefect.yaml's DEPLOYMENTS
    there already); the test's Prefect client pointed at it."""
    server.start()
    try:
        with client_pointed_at(server.api_url):
            yield server
    finally:
        server.stop()


def pool_and_deployments(server: PrefectServer, *deploy: str) -> None:
    """The `dbmigrate` work pool as the local stack makes it (its runs started as `python -m
    prefect.engine`: docs/PREFECT.md#deploying), then `prefect deploy DEPLOY...` from this checkout;
    this process's client pointed at ``server``."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    from stack.provision import engine_job_template

    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name="dbmigrate", type="process",
                                               base_job_template=engine_job_template()), overwrite=True)
    prefect(server, "deploy", *deploy, cwd=REPO)


@contextmanager
def working(server: PrefectServer, tmp_path: Path):
    state = tmp_path / "worker-home"
    state.mkdir(exist_ok=True)
    environ = server.environ(DBMIGRATE_CHECKOUT=str(REPO), PYTHONPATH=str(REPO), DBMIGRATE_HOME=str(state))
    worker = Worker(server, environ, tmp_path / "worker.log")
    worker.start()
    try:
        yield worker
    finally:
        worker.kill_all()


def start_run(server, environment: str, ini: str, flow: str = "db-migrate", **params) -> str:
    """A run of prefect.yaml's deployment of ``flow`` for ``environment`` (db-migrate/staging,
    db-migrate-fleet/staging, db-rollback/staging-rollback, ...)."""
    from prefect.client.orchestration import get_client

    name = environment if flow.startswith("db-migrate") else f"{environment}-{flow.removeprefix('db-')}"
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name(f"{flow}/{name}")
        run = client.create_flow_run_from_deployment(
            deployment.id, parameters={"environment": environment, "alembic_config": ini, **params})
    return str(run.id)


def flow_run(run_id: str):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(run_id)


def final(run_id: str, timeout: float = 90):
    return wait_until(lambda: (r := flow_run(run_id)).state.is_final() and r, timeout, f"flow run {run_id} to end")


def run_log(run_id: str) -> str:
    """The run's log as the UI shows it (for failure messages)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with get_client(sync_client=True) as client:
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))
    return "\n".join(f"{log.level} {log.message[:400]}" for log in logs)
