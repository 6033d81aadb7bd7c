"""A database and how to reach it without leaking the password.

A leaf module: it imports nothing else of dbmigrate but its errors. Which database a
command works on is decided where it is used (``dbmigrate.cli.resolve``, the flows).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from dbmigrate.errors import ConfigError

DRIVER = "postgresql+psycopg"  # dbmigrate's own sessions, whatever the URL names
# A URL naming one of these keeps it for the project's env.py (``sqlalchemy.url``): its migrations run
# with the driver the user chose. Any other (a plain postgresql://, which SQLAlchemy 2.0 reads as
# psycopg2) gets DRIVER, as before.
PROJECT_DRIVERS = (DRIVER, "postgresql+psycopg2")
URL_SHAPE = "postgresql://USER:PASSWORD@HOST:PORT/DATABASE"
# On every session the tool opens (its own, env.py's, pg_dump's): the server checks each second
# that the client is still there and ends the statement of one that died (SIGKILL, a lost host)
# instead of running it, locks held, to the end.
CONNECTION_CHECK = "-c client_connection_check_interval=1000"


def pgoptions(*settings: str, base: str | None = None) -> str:
    """libpq ``options`` for a session: ``base`` (default: the user's PGOPTIONS), the
    connection check, then ``settings`` (later ``-c`` win)."""
    base = os.environ.get("PGOPTIONS", "") if base is None else base
    return " ".join(part for part in (base.strip(), CONNECTION_CHECK, *settings) if part)


def libpq_timeout(seconds: float) -> int:
    """libpq counts whole seconds and treats anything below 2 as 2."""
    return max(2, math.ceil(seconds))


@dataclass(frozen=True)
class DatabaseTarget:
    """A database and the name of the environment it belongs to.

    ``url`` holds the password and the driver the project's migrations run with; nothing here
    renders it except :meth:`sqlalchemy_url` (handed to SQLAlchemy in-process: dbmigrate's own
    engines, and Alembic) and :meth:`libpq_env` (handed to child processes through their
    environment, never argv).
    """

    url: URL
    environment: str

    @property
    def host(self) -> str:
        # A unix-socket URL carries the socket directory as ?host=...
        return str(self.url.query.get("host") or self.url.host or "localhost")

    @property
    def port(self) -> int:
        return int(self.url.port or self.url.query.get("port") or 5432)

    @property
    def database(self) -> str:
        return self.url.database or self.url.username or "postgres"

    @property
    def where(self) -> str:
        """Human-readable location, safe to print: host:port/database."""
        return f"{self.host}:{self.port}/{self.database}"

    def describe(self) -> dict:
        """The report's ``database`` entry: never the password."""
        return {"host": self.host, "port": self.port, "name": self.database, "user": self.url.username}

    def sqlalchemy_url(self, connect_timeout: float | None = None, driver: str | None = None) -> str:
        """The URL, password included, with the URL's own driver (what the project's env.py gets)
        or ``driver``."""
        url = self.url.set(drivername=driver) if driver else self.url
        if connect_timeout:
            url = url.update_query_dict({"connect_timeout": str(libpq_timeout(connect_timeout))})
        return url.render_as_string(hide_password=False)

    def libpq_env(self) -> dict[str, str]:
        """libpq environment variables for child processes such as pg_dump."""
        env = {"PGHOST": self.host, "PGPORT": str(self.port), "PGDATABASE": self.database}
        if self.url.username:
            env["PGUSER"] = self.url.username
        if self.url.password:
            env["PGPASSWORD"] = str(self.url.password)
        env["PGOPTIONS"] = pgoptions(base=self.query_options)
        for key, var in (("sslmode", "PGSSLMODE"), ("connect_timeout", "PGCONNECT_TIMEOUT")):
            if key in self.url.query:
                env[var] = str(self.url.query[key])
        return env

    @property
    def query_options(self) -> str | None:
        """The URL's own ``?options=`` (libpq then ignores PGOPTIONS), if it has one."""
        options = self.url.query.get("options")
        return None if options is None else str(options)

    def with_database(self, name: str) -> DatabaseTarget:
        return DatabaseTarget(self.url.set(database=name), self.environment)

    def redact(self, text: str) -> str:
        """Remove the password from any text before it is shown or stored."""
        password = self.url.password
        return text.replace(str(password), "***") if password else text


def parse_url(raw: str, environment: str = "url") -> DatabaseTarget:
    """Parse a SQLAlchemy/libpq URL; the message never repeats the URL (it may hold a password)."""
    try:
        url = make_url(raw.strip())
    except (ArgumentError, ValueError):
        raise ConfigError(f"malformed database URL: expected {URL_SHAPE}") from None
    backend = url.get_backend_name()
    if backend not in ("postgresql", "postgres"):
        raise ConfigError(f"unsupported database URL scheme '{url.drivername}': expected {URL_SHAPE}")
    if url.port is not None and not 0 < url.port < 65536:
        raise ConfigError(f"malformed database URL: port {url.port} is out of range")
    if "password" in url.query:  # libpq's ?password=: make it the URL's, which pg_dump's env and redact() use
        password = url.query["password"]
        url = url.difference_update_query(["password"]).set(
            password=password[-1] if isinstance(password, tuple) else password)
    return DatabaseTarget(url.set(drivername=url.drivername if url.drivername in PROJECT_DRIVERS else DRIVER),
                          environment)
