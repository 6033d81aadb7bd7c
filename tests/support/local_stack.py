"""The local stack (`dbmigrate local up`) on fresh ports under a test's home, as the tests drive it."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
from sqlalchemy.engine import URL

from dbmigrate.target import DRIVER, DatabaseTarget
from tests.support.helpers import run_cli
from tests.support.pgcluster import free_port
from tests.support.prefect_server import client_pointed_at


class Stack:
    def __init__(self, home: Path):
        self.home, self.pg_port, self.prefect_port = home, free_port(), free_port()
        self.api = f"http://127.0.0.1:{self.prefect_port}/api"
        self.outputs: list[str] = []

    def cli(self, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
        """dbmigrate as a process: `local up` leaves processes behind, and the rest talk to the stack's API."""
        result = run_cli(self.home, *args, env=env, process=True)
        self.outputs.append(result.stdout + result.stderr)
        return result

    def up(self, *options: str, **env: str) -> subprocess.CompletedProcess:
        return self.cli("local", "up", "--pg-port", str(self.pg_port), "--prefect-port", str(self.prefect_port),
                        *options, env=env)

    @property
    def ui(self) -> str:
        return self.api.removesuffix("/api")

    def target(self, database: str) -> DatabaseTarget:
        """The stack's database ``database`` over TCP with the generated password."""
        return DatabaseTarget(URL.create(DRIVER, "postgres", self.password, "127.0.0.1", self.pg_port, database),
                              database)

    @property
    def client_env(self) -> dict[str, str]:
        """What a Prefect client of the stack needs (what `eval "$(dbmigrate local env)"` exports)."""
        return {"PREFECT_API_URL": self.api,
                "PREFECT_API_AUTH_STRING": (self.home / "prefect-auth").read_text().strip()}

    @contextmanager
    def talking_to(self) -> Iterator[None]:
        """This process's Prefect client pointed at the stack."""
        from prefect.settings import PREFECT_API_AUTH_STRING

        env = self.client_env
        with client_pointed_at(env["PREFECT_API_URL"], {PREFECT_API_AUTH_STRING: env["PREFECT_API_AUTH_STRING"]}):
            yield

    @property
    def password(self) -> str:
        return (self.home / "local-password").read_text().strip()

    def pids(self) -> dict[str, int]:
        prefect = self.home / "prefect"
        return {"worker": json.loads((prefect / "worker.pid").read_text())["pid"],
                "server": json.loads((prefect / "server.pid").read_text())["pid"],
                "postgresql": int((self.home / "pgdata" / "postmaster.pid").read_text().split()[0])}

    def logs(self) -> str:
        return "".join(p.read_text(errors="replace") for p in (self.home / "prefect").glob("*.log"))


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@contextmanager
def running(home: Path) -> Iterator[Stack]:
    """A stack to start under ``home``; stopped at the end whatever happened."""
    stack = Stack(home)
    try:
        yield stack
    finally:
        try:
            pids = stack.pids()
        except (OSError, ValueError):
            pids = {}
        try:
            run_cli(home, "local", "down", process=True)
        finally:
            for pid in pids.values():  # whatever down could not stop
                if alive(pid):
                    os.kill(pid, 9)
