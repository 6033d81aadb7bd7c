"""``local up``: every part of the local stack started, or found running, in the order they depend
on each other: the embedded PostgreSQL with a database per environment, the Prefect server, the
blocks, the work pool, the deployments, the worker. Prefect is imported here only.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

from dbmigrate import local
from stack import tenants
from dbmigrate.errors import ConfigError, needs_prefect
from dbmigrate.policy import ENVIRONMENTS
from dbmigrate.private import generated_secret
from stack.processes import (POOL, Detached, Say, auth_file, client_environ, exports, prefect_environ, prefect_home,
                             server, worker)

DEMO_ENVIRONMENT = "development"  # the one `make demo` migrates
PREFECT_PORT = 4200  # Prefect's own default: the address its documentation and habits assume
PREFECT_PORT_VARIABLE = "DBMIGRATE_PREFECT_PORT"  # what `make demo PREFECT_PORT=...` sets: make passes no option
START_TIMEOUT_S = 120
# The server streams the runs' log lines out (off by default): `prefect deployment run --watch`
# then prints them, a failed run's one-line reason and an approval's wait among them.
LOG_STREAMING = {"PREFECT_SERVER_LOGS_STREAM_OUT_ENABLED": "true",
                 "PREFECT_SERVER_LOGS_STREAM_PUBLISHING_ENABLED": "true"}


def up(home: Path, checkout: Path, pg_port: int | None = None, prefect_port: int | None = None,
       say: Say = print, fleet: int | None = None) -> str:
    """Start (or find running) every part; the PREFECT_API_URL of the stack. ``fleet``: that many
    tenant databases per environment too, and each environment's fleet block (:mod:`stack.tenants`)."""
    home, checkout = home.resolve(), checkout.resolve()
    if not (checkout / "prefect.yaml").is_file():
        raise ConfigError(f"no prefect.yaml in {checkout}: run `dbmigrate local up` from a checkout of the repository")
    with needs_prefect("dbmigrate local up"):  # before anything starts, like a busy port
        import prefect  # noqa: F401
    port = _prefect_port(home, prefect_port)  # before anything starts: a busy port changes nothing
    pg = _postgres(home, pg_port, say)
    created = [name for name in ENVIRONMENTS if local.ensure_database(pg, name)]
    local.record_default_database(home, DEMO_ENVIRONMENT)  # the command line looks where `make demo` migrates
    say(f"databases: {', '.join(ENVIRONMENTS)}" + (f" (created {', '.join(created)})" if created else ""))
    if fleet:
        say(tenants.ensure_tenants(pg, checkout, ENVIRONMENTS, fleet))
    ui = _prefect_server(home, port, say)
    api = f"{ui}/api"
    with _talking_to(home, api):
        _blocks(home, pg, say, fleet)
        _work_pool(say)
        _deploy(home, checkout, api, say)
        _worker(home, checkout, api, say)
    say(f"UI:  {ui}  (runs, their logs and artifacts)")
    for line in exports(home, api):
        say(line)
    return api


def _prefect_port(home: Path, wanted: int | None) -> int:
    record = server(home).record()
    if record is not None:
        if wanted is not None and wanted != record["port"]:
            raise ConfigError(f"the local Prefect server already runs on port {record['port']}: "
                              f"stop the stack (dbmigrate local down) to move it to {wanted}")
        return record["port"]
    port = wanted or _port_variable() or PREFECT_PORT
    if not local.port_is_free(port):
        raise ConfigError(f"port {port} on {local.HOST} is busy: choose another with --prefect-port, or "
                          f"{PREFECT_PORT_VARIABLE}=PORT (make demo PREFECT_PORT=PORT)")
    return port


def _port_variable() -> int | None:
    value = os.environ.get(PREFECT_PORT_VARIABLE, "").strip()
    if not value:
        return None
    if not (value.isascii() and value.isdigit() and 1 <= int(value) <= 65535):
        raise ConfigError(f"{PREFECT_PORT_VARIABLE} is not a TCP port: {value!r}")
    return int(value)


def _postgres(home: Path, port: int | None, say: Say) -> local.LocalServer:
    was = local.running(home)
    if was is not None and not was.listen:  # started socket-only by an older dbmigrate
        say("postgresql: restarting to listen on TCP as well")
        local.stop(home)
        was = None
    pg = local.start(home, port)  # running on another port than the one given: refused
    say(f"postgresql: {'already running' if was else 'started'} on {pg.address} (pid {pg.pid}), "
        f"user {local.USER}, password in {local.password_file(home)}")
    return pg


def _prefect_server(home: Path, port: int, say: Say) -> str:
    part, ui = server(home), f"http://{local.HOST}:{port}"
    if part.record() is not None:
        _wait_for(lambda: _answers(ui), part, "the Prefect server")
        say(f"prefect server: already running at {ui} (pid {part.record()['pid']})")
        return ui
    record = part.start([sys.executable, "-m", "prefect", "server", "start", "--host", local.HOST, "--port", str(port)],
                        prefect_environ(home, f"{ui}/api", **LOG_STREAMING,
                                        PREFECT_SERVER_API_AUTH_STRING=generated_secret(auth_file(home))),
                        prefect_home(home), port=port, url=ui)
    _wait_for(lambda: _answers(ui), part, "the Prefect server", record)
    say(f"prefect server: started at {ui} (pid {record['pid']}, log {part.log})")
    return ui


def _answers(ui: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"{ui}/api/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def _wait_for(condition: Callable[[], bool], part: Detached, what: str, record: dict | None = None) -> None:
    record = record or part.record()
    deadline = time.monotonic() + START_TIMEOUT_S
    while not condition():
        if record is None or not part.alive(record):
            raise ConfigError(f"{what} exited: {part.last_line()} (see {part.log})")
        if time.monotonic() > deadline:
            raise ConfigError(f"{what} is not ready after {START_TIMEOUT_S}s: {part.last_line()} (see {part.log})")
        time.sleep(0.3)


@contextmanager
def _talking_to(home: Path, api: str) -> Iterator[None]:
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    client = client_environ(home, api)
    with temporary_settings(updates={PREFECT_API_URL: api, PREFECT_API_AUTH_STRING: client["PREFECT_API_AUTH_STRING"]}):
        yield


def _blocks(home: Path, pg: local.LocalServer, say: Say, fleet: int | None) -> None:
    """A DatabaseCredentials block per environment (and with ``fleet`` its DatabaseFleet block selecting
    its tenants), as `dbmigrate blocks sync --from-env` writes them."""
    from blocks.sync import sync_environment

    secret = local.password(home)
    for name in ENVIRONMENTS:
        variables = {"DB_HOST": local.HOST, "DB_PORT": str(pg.port), "DB_NAME": name, "DB_USER": local.USER,
                     "DB_PASSWORD": secret, "DB_SSLMODE": "disable",
                     **({"FLEET_QUERY": tenants.selecting_query(name)} if fleet else {})}
        for synced in sync_environment(name, variables):
            say(f"block {synced}")


def engine_job_template(python: str = sys.executable) -> dict:
    """The process pool's job template, its runs started as ``python -m prefect.engine``. Left
    unset, Prefect 3.8's process worker starts a workspace supervisor that then starts the engine:
    two Python processes importing Prefect per run, where one does (the engine runs the pull step
    itself). docs/PREFECT.md#deploying shows the same for a pool of one's own."""
    from prefect.workers.process import ProcessWorker

    template = ProcessWorker.get_default_base_job_template()
    template["variables"]["properties"]["command"]["default"] = f"{shlex.quote(python)} -m prefect.engine"
    return template


def _work_pool(say: Say) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(POOL)
            say(f"work pool {POOL}: exists")
            return
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=POOL, type="process", base_job_template=engine_job_template()))
    say(f"work pool {POOL}: created (process)")


def _deploy(home: Path, checkout: Path, api: str, say: Say) -> None:
    """``prefect deploy --all``, unless the deployments it would make are there and neither
    prefect.yaml nor the flows changed since it last ran (a deploy takes some seconds)."""
    import yaml
    from prefect.client.orchestration import get_client

    stamp, digest = prefect_home(home) / "deployed", _digest(checkout)
    wanted = {d["name"] for d in yaml.safe_load((checkout / "prefect.yaml").read_text())["deployments"]}
    with get_client(sync_client=True) as client:
        present = {d.name for d in client.read_deployments()}
    if stamp.exists() and stamp.read_text() == digest and wanted <= present:
        say("deployments: up to date (prefect.yaml and flows/ unchanged since the last prefect deploy --all)")
        return
    log = prefect_home(home) / "deploy.log"
    with open(log, "w") as out:
        done = subprocess.run([sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all"], cwd=checkout,
                              env=prefect_environ(home, api), stdout=out, stderr=subprocess.STDOUT, timeout=600,
                              check=False)
    if done.returncode != 0:
        raise ConfigError(f"prefect deploy --all failed (exit {done.returncode}): see {log}")
    stamp.write_text(digest)
    say(f"deployments: prefect deploy --all from {checkout / 'prefect.yaml'} (log {log})")


def _digest(checkout: Path) -> str:
    """What the deployments are made of: prefect.yaml and the flows' signatures and docstrings."""
    sha = hashlib.sha256()
    for path in [checkout / "prefect.yaml", *sorted((checkout / "flows").glob("*.py"))]:
        sha.update(path.name.encode() + b"\0" + path.read_bytes())
    return sha.hexdigest()


def _worker(home: Path, checkout: Path, api: str, say: Say) -> None:
    part = worker(home)
    record = part.record()
    if record is not None:
        say(f"worker: already running (pid {record['pid']}), pool {POOL}")
        return
    record = start_worker(part, home, checkout, api)
    say(f"worker: started (pid {record['pid']}), pool {POOL}, runs flows from {checkout} (log {part.log})")


def start_worker(part: Detached, home: Path, checkout: Path, api: str, name: str | None = None,
                 limit: int | None = None) -> dict:
    """A process worker of the pool started as ``part`` (the stack's own, or one more beside it:
    benchmarks/fleet.py's), once the server has heard from it; what ``start`` recorded. ``name``: the
    worker's (Prefect's default is a random one), waited for by name; ``limit``: its ``--limit``."""
    since = datetime.now(UTC) - timedelta(seconds=1)
    argv = [sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL, "--type", "process",
            *(["--name", name] if name else []), *(["--limit", str(limit)] if limit else [])]
    record = part.start(argv, worker_environ(home, checkout, api), checkout)
    _wait_for(lambda: _worker_online(since, name), part, f"the worker {name or ''}".strip(), record)
    return record


def worker_environ(home: Path, checkout: Path, api: str) -> dict[str, str]:
    """The worker's environment: the stack's, where its flows run from, and how often it asks for runs."""
    env = prefect_environ(home, api, DBMIGRATE_CHECKOUT=str(checkout), DBMIGRATE_HOME=str(home))
    # A local run is picked up within 1 s (Prefect's default: 10): half a second on average of a no-op run's
    # fixed cost (benchmarks/run_overhead.py), for one cheap query a second on the local server.
    env.setdefault("PREFECT_WORKER_QUERY_SECONDS", "1")
    return env


def _worker_online(since: datetime, name: str | None = None) -> bool:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        workers = client.read_workers_for_work_pool(POOL)
    return any(w.last_heartbeat_time and w.last_heartbeat_time >= since and name in (None, w.name) for w in workers)
