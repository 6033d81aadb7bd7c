"""Connections to the target database, with a bounded wait and a clear reason on failure."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from sqlalchemy import create_engine, text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import NullPool

from dbmigrate.errors import ConnectionFailed
from dbmigrate.target import DatabaseTarget, libpq_timeout

DEFAULT_CONNECT_TIMEOUT = 10.0

# libpq's wording, lowercased, mapped to what an operator needs to know.
_REASONS = (
    (("password authentication failed", "no password supplied", "authentication failed"), "authentication failed"),
    (("could not translate host name", "failed to resolve host", "name or service not known",
      "temporary failure in name resolution"),
     "DNS lookup failed: unknown host"),
    (("connection refused",), "connection refused: no server listening at that address"),
    (("timeout expired", "timed out"), "timed out"),
    (("no such file or directory",), "no server listening on that socket"),
    (("does not exist",), "database does not exist"),
    (("no pg_hba.conf entry",), "rejected by the server's pg_hba.conf"),
)


def failure_reason(exc: BaseException, timeout: float) -> str:
    message = str(getattr(exc, "orig", None) or exc)
    lowered = message.lower()
    for needles, reason in _REASONS:
        if any(needle in lowered for needle in needles):
            return f"timed out after {libpq_timeout(timeout)}s" if reason == "timed out" else reason
    return message.strip().splitlines()[-1] if message.strip() else type(exc).__name__


def engine(target: DatabaseTarget, timeout: float = DEFAULT_CONNECT_TIMEOUT, **kwargs) -> Engine:
    # NullPool: a CLI run opens few connections, and no pooled connection may outlive the command.
    return create_engine(target.sqlalchemy_url(timeout), poolclass=NullPool, **kwargs)


@contextmanager
def connect(target: DatabaseTarget, timeout: float = DEFAULT_CONNECT_TIMEOUT, **kwargs) -> Iterator[Connection]:
    """A connection, or ConnectionFailed naming the reason (never the password)."""
    eng = engine(target, timeout, **kwargs)
    try:
        try:
            conn = eng.connect()
        except DBAPIError as exc:
            raise ConnectionFailed(target.where, target.redact(failure_reason(exc, timeout))) from None
        except UnicodeError:  # psycopg resolves names itself; IDNA rejects malformed ones
            raise ConnectionFailed(target.where, "invalid host name") from None
        with conn:
            yield conn
    finally:
        eng.dispose()


def server_version(conn: Connection) -> tuple[int, str]:
    """(major version number, full version string) of the server."""
    num = int(conn.execute(text("SHOW server_version_num")).scalar_one())
    full = conn.execute(text("SHOW server_version")).scalar_one()
    return num // 10000, str(full)


def database_size(conn: Connection) -> int:
    return int(conn.execute(text("SELECT pg_database_size(current_database())")).scalar_one())


def identifier(name: str) -> str:
    """``name`` as one quoted SQL identifier, whatever it holds (quotes, spaces, semicolons)."""
    return '"' + name.replace('"', '""') + '"'


def execute_literal(conn: Connection, statement: str):
    """Run ``statement`` as written: no ':name' or '%s' in a quoted name is taken for a parameter."""
    return conn.exec_driver_sql(statement.replace("%", "%%"))  # psycopg reads '%%' as '%'
