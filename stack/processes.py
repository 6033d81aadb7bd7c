"""The local stack's processes: the Prefect server and the worker, started detached (a session of
their own: Ctrl-C on the terminal that ran ``up`` is not theirs), their pid recorded with its start
time (a recycled pid is never taken for them) and their output in a log beside it; what a client
of the stack needs to reach its API; and ``local down``/``status``/``env``, which never import Prefect.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dbmigrate import local
from dbmigrate.private import generated_secret

POOL = "dbmigrate"
# Leases in a file under PREFECT_HOME: a server restart keeps which run holds an environment's slot.
FILESYSTEM_LEASES = "prefect.server.concurrency.lease_storage.filesystem"

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
