"""The local stack: the Prefect side of dbmigrate on this machine, every part on 127.0.0.1 and
its state under the home (``dbmigrate local up|down|status``):

- the embedded PostgreSQL (:mod:`dbmigrate.local`) on loopback TCP, with one database per
  environment (``development``, ``staging``, ``production``);
- a Prefect server (``prefect server start``) whose PREFECT_HOME is ``<home>/prefect``, its API
  closed to whoever lacks the auth string generated into ``<home>/prefect-auth`` (0600): anyone on
  the machine reaches 127.0.0.1, and the blocks hold the database's password;
- the block types and a ``DatabaseCredentials`` block per environment, written by the code
  ``dbmigrate blocks sync`` runs (:func:`blocks.sync.sync_environment`); the work pool
  ``dbmigrate``; ``prefect deploy --all`` from the checkout;
- a process worker of that pool, running the flows from the checkout.

The server and the worker are started detached (a session of their own: Ctrl-C on the terminal
that ran ``up`` is not theirs), their pid recorded with its start time (a recycled pid is never
taken for them) and their output in a log beside it. ``down`` stops the worker first (no run
is left talking to a server that went away), then the server, then PostgreSQL. Prefect is
imported only inside ``up``: ``status`` and ``down`` never pay for it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from dbmigrate import fleet_local, local
from dbmigrate.errors import ConfigError, needs_prefect
from dbmigrate.private import generated_secret

ENVIRONMENTS = ("development", "staging", "production")
DEMO_ENVIRONMENT = "development"  # the one `make demo` migrates
POOL = "dbmigrate"
PREFECT_PORT = 4200  # Prefect's own default: the address its documentation and habits assume
PREFECT_PORT_VARIABLE = "DBMIGRATE_PREFECT_PORT"  # what `make demo PREFECT_PORT=...` sets: make passes no option
# Leases in a file under PREFECT_HOME: a server restart keeps which run holds an environment's slot.
FILESYSTEM_LEASES = "prefect.server.concurrency.lease_storage.filesystem"
START_TIMEOUT_S = 120
# The server streams the runs' log lines out (off by default): `prefect deployment run --watch`
# then prints them, a failed run's one-line reason and an approval's wait among them.
LOG_STREAMING = {"PREFECT_SERVER_LOGS_STREAM_OUT_ENABLED": "true",
                 "PREFECT_SERVER_LOGS_STREAM_PUBLISHING_ENABLED": "true"}

Say = Callable[[str], None]


def prefect_home(home: Path) -> Path:
    return home.resolve() / "prefect"


def auth_file(home: Path) -> Path:
    return home.resolve() / "prefect-auth"


def client_environ(home: Path, api: str) -> dict[str, str]:
    """What a Prefect client of the stack needs: its API and the server's auth string."""
    return {"PREFECT_API_URL": api, "PREFECT_API_AUTH_STRING": generated_secret(auth_file(home))}


def exports(home: Path, api: str) -> list[str]:
    """The lines that point a shell at the stack (``eval``), the auth string read from its file."""
    return [f"export PREFECT_API_URL={api}", f'export PREFECT_API_AUTH_STRING="$(cat {shlex.quote(str(auth_file(home)))})"']


@dataclass(frozen=True)
class Detached:
    """A long-running process of the stack: started in a session of its own, recorded in
    ``<name>.pid`` (JSON: pid, start time, and what else ``start`` was told), logged to ``<name>.log``."""

    name: str
    directory: Path

    @property
    def pidfile(self) -> Path:
        return self.directory / f"{self.name}.pid"

    @property
    def log(self) -> Path:
        return self.directory / f"{self.name}.log"

    def record(self) -> dict | None:
        """What ``start`` recorded, if the process it names is still that process and alive."""
        try:
            record = json.loads(self.pidfile.read_text())
        except (OSError, ValueError):
            return None
        process = _process(record.get("pid"))
        if process is None or abs(process.create_time() - record.get("started", 0)) > 1:
            return None
        return record

    def start(self, argv: list[str], env: dict[str, str], cwd: Path, **facts) -> dict:
        import psutil

        self.directory.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:  # the child keeps its own descriptor
            child = subprocess.Popen(argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        record = {"pid": child.pid, "started": psutil.Process(child.pid).create_time(), **facts}
        self.pidfile.write_text(json.dumps(record) + "\n")
        return record

    def alive(self, record: dict) -> bool:
        return _process(record["pid"]) is not None

    def stop(self, timeout: float = 30) -> int | None:
        """SIGTERM to the process and everything it started, SIGKILL to what is left after
        ``timeout``; the pid it had, or None if it was not running."""
        import psutil

        record = self.record()
        self.pidfile.unlink(missing_ok=True)
        leader = _process(record["pid"]) if record else None
        if leader is None:
            return None
        family = [leader, *leader.children(recursive=True)]
        for process in family:
            _signal(process, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while any(_running(p) for p in family) and time.monotonic() < deadline:
            time.sleep(0.1)
        for process in family:
            _signal(process, signal.SIGKILL)
        psutil.wait_procs(family, timeout=5)
        return record["pid"]

    def last_line(self) -> str:
        try:
            return (self.log.read_text(errors="replace").strip().splitlines() or ["no output"])[-1]
        except OSError:
            return "no log"


def server(home: Path) -> Detached:
    return Detached("server", prefect_home(home))


def worker(home: Path) -> Detached:
    return Detached("worker", prefect_home(home))


def _process(pid):
    import psutil

    try:
        process = psutil.Process(pid)
        return process if _running(process) else None
    except (psutil.Error, TypeError, ValueError):
        return None


def _running(process) -> bool:
    import psutil

    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _signal(process, sig: int) -> None:
    import psutil

    try:
        process.send_signal(sig)
    except psutil.Error:
        pass


# --- up -----------------------------------------------------------------------------------

def up(home: Path, checkout: Path, pg_port: int | None = None, prefect_port: int | None = None,
       say: Say = print, fleet: int | None = None) -> str:
    """Start (or find running) every part; the PREFECT_API_URL of the stack. ``fleet``: that many
    tenant databases per environment too, and each environment's fleet block (:mod:`dbmigrate.fleet_local`)."""
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
        say(fleet_local.ensure_tenants(pg, checkout, ENVIRONMENTS, fleet))
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


def prefect_environ(home: Path, api: str, **extra: str) -> dict[str, str]:
    """The environment of the stack's Prefect processes."""
    return {
        **os.environ,
        "PREFECT_HOME": str(prefect_home(home)),
        **client_environ(home, api),
        "PREFECT_UI_API_URL": api,  # what the browser's UI calls
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": FILESYSTEM_LEASES,
        **extra,
    }


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
                     **({"FLEET_QUERY": fleet_local.selecting_query(name)} if fleet else {})}
        for synced in sync_environment(name, variables):
            say(f"block {synced}")


def _work_pool(say: Say) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(POOL)
            say(f"work pool {POOL}: exists")
            return
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=POOL, type="process",
                                                   base_job_template=ProcessWorker.get_default_base_job_template()))
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
    since = datetime.now(UTC) - timedelta(seconds=1)
    env = prefect_environ(home, api, DBMIGRATE_CHECKOUT=str(checkout), DBMIGRATE_HOME=str(home))
    env.setdefault("PREFECT_WORKER_QUERY_SECONDS", "2")  # a local run starts within 2 s (Prefect's default: 10)
    record = part.start([sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL, "--type", "process"],
                        env, checkout)
    _wait_for(lambda: _worker_online(since), part, "the worker", record)
    say(f"worker: started (pid {record['pid']}), pool {POOL}, runs flows from {checkout} (log {part.log})")


def _worker_online(since: datetime) -> bool:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        workers = client.read_workers_for_work_pool(POOL)
    return any(w.last_heartbeat_time and w.last_heartbeat_time >= since for w in workers)


# --- down, status -------------------------------------------------------------------------

def down(home: Path, say: Say = print) -> None:
    """Stop the worker, then the server, then PostgreSQL."""
    for label, part in (("worker", worker(home)), ("prefect server", server(home))):
        pid = part.stop()
        say(f"{label}: stopped (pid {pid})" if pid else f"{label}: not running")
    say("postgresql: stopped" if local.stop(home) else "postgresql: not running")


def api_url(home: Path) -> str | None:
    """The stack's PREFECT_API_URL while its server runs."""
    record = server(home).record()
    return f"{record['url']}/api" if record else None


def status(home: Path) -> list[str]:
    """One line per Prefect part, and how to reach the server (the PostgreSQL line is the CLI's own)."""
    lines = []
    for label, part in (("prefect server", server(home)), ("worker", worker(home))):
        record = part.record()
        where = record and (record["url"] if part.name == "server" else f"pool {POOL}")
        lines.append(f"{label}: running, pid {record['pid']}, {where} (log {part.log})" if record
                     else f"{label}: not running")
    api = api_url(home)
    if api:
        lines += [f"UI: {api.removesuffix('/api')}", f"PREFECT_API_URL={api}"]
    return lines
