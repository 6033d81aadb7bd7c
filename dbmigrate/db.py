"""Connections to the target database, with a bounded wait and a clear reason on failure,
and the databases dbmigrate creates beside it (scratch copies, restores into a new database)."""

from __future__ import annotations

import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

from sqlalchemy import create_engine, text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import NullPool

from dbmigrate.errors import (
    BackupFailed,
    ConfigError,
    ConnectionFailed,
    ConnectionLost,
    DbMigrateError,
    LockWaitTimeout,
    first_line,
)
from dbmigrate.target import DRIVER, DatabaseTarget, libpq_timeout, pgoptions

DEFAULT_CONNECT_TIMEOUT = 10.0
LOCK_NOT_AVAILABLE = "55P03"  # SQLSTATE of lock_timeout (and NOWAIT)

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
    """The process's engine for this URL and these options, made on first use. NullPool: no
    connection outlives its ``with`` (a run holds none between steps); one engine per URL, so
    SQLAlchemy reads the server's dialect details once, not on every connection of a run."""
    url = target.sqlalchemy_url(timeout, DRIVER)
    key = (url, repr(kwargs))
    if (made := _engines.get(key)) is None:
        while len(_engines) >= _ENGINES_KEPT:  # a long-lived process (a test session) meets many databases
            _engines.pop(next(iter(_engines)), None)
        made = _engines.setdefault(key, create_engine(url, poolclass=NullPool, **kwargs))
    return made


_ENGINES_KEPT = 32
_engines: dict[tuple[str, str], Engine] = {}


@contextmanager
def connect(target: DatabaseTarget, timeout: float = DEFAULT_CONNECT_TIMEOUT, **kwargs) -> Iterator[Connection]:
    """A connection, or ConnectionFailed naming the reason (never the password).

    Its waits are bounded too: a lock it needs is waited for ``timeout`` seconds, then
    LockWaitTimeout names the session holding it; losing the server mid-session is a
    ConnectionLost, whatever statement noticed it."""
    lock_wait = libpq_timeout(timeout)
    options = pgoptions(f"-c lock_timeout={lock_wait * 1000}", base=target.query_options)
    kwargs["connect_args"] = {"options": options, **kwargs.get("connect_args", {})}
    try:
        conn = engine(target, timeout, **kwargs).connect()
    except DBAPIError as exc:
        raise ConnectionFailed(target.where, target.redact(failure_reason(exc, timeout))) from None
    except UnicodeError:  # psycopg resolves names itself; IDNA rejects malformed ones
        raise ConnectionFailed(target.where, "invalid host name") from None
    try:
        yield conn
    except DbMigrateError:
        raise
    except Exception as exc:
        if is_lost(conn):  # whatever failed, the reason is the server going away
            raise ConnectionLost(target.where) from None
        if getattr(getattr(exc, "orig", None), "sqlstate", None) == LOCK_NOT_AVAILABLE:
            raise LockWaitTimeout(_lock_wait_failure(conn, exc, lock_wait)) from None
        raise
    finally:
        _close(conn)


def _close(conn: Connection) -> None:
    """Close, rolling back what is open. A connection the server dropped has nothing left to roll
    back: failing to is no news, and must not hide the error that ended the session."""
    try:
        conn.close()
    except DBAPIError:
        if not is_lost(conn):
            raise


def is_lost(conn: Connection) -> bool:
    """Has the server gone away from under this connection?"""
    if conn.closed or conn.invalidated:
        return True
    raw = conn.connection.dbapi_connection
    return raw is None or raw.closed or raw.broken


def _lock_wait_failure(conn: Connection, exc: BaseException, waited: int) -> str:
    """Which lock a statement of ours gave up on, and who holds it. The cancelled statement
    does not say which relation it waited for: the holders of the locks that block reads,
    those the statement names first."""
    try:
        conn.rollback()
        holders = conn.execute(text(
            "SELECT c.relname, l.mode, a.pid, a.application_name FROM pg_locks l "
            "JOIN pg_class c ON c.oid = l.relation JOIN pg_stat_activity a ON a.pid = l.pid "
            "WHERE l.granted AND l.mode = 'AccessExclusiveLock' AND l.pid <> pg_backend_pid() "
            "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
            "ORDER BY a.backend_start"
        )).all()
    except Exception:  # naming the holder is a courtesy: the timeout is the error
        holders = []
    statement = str(getattr(exc, "statement", "") or "")
    holders.sort(key=lambda h: h.relname not in statement)
    if not holders:
        return f"timed out after {waited}s waiting for a lock (its holder has gone since)"
    h = holders[0]
    return (f"timed out after {waited}s waiting for a lock on {h.relname}: {h.mode} held by "
            f"backend pid {h.pid} ('{h.application_name or 'unknown'}'); raise --timeout to wait longer")


def server_version(conn: Connection) -> tuple[int, str]:
    """(major version number, full version string) of the server."""
    num = int(conn.execute(text("SHOW server_version_num")).scalar_one())
    full = conn.execute(text("SHOW server_version")).scalar_one()
    return num // 10000, str(full)


def database_size(conn: Connection) -> int:
    return int(conn.execute(text("SELECT pg_database_size(current_database())")).scalar_one())


def abandoned_scratch_databases(conn: Connection) -> list[str]:
    """The tool's own scratch databases on the server that nobody is connected to: what a run killed
    outright (SIGKILL, a lost machine) left behind, since every other way out drops them. Its own:
    the exact name it gives them and the comment it sets on them, so a database someone else named
    ``dbmigrate_...`` (a ``restore --target-db``, a user's) is never one."""
    return list(conn.execute(text(
        "SELECT d.datname FROM pg_database d WHERE d.datname ~ :pattern "
        "AND shobj_description(d.oid, 'pg_database') = :marker AND NOT EXISTS "
        "(SELECT 1 FROM pg_stat_activity a WHERE a.datname = d.datname) ORDER BY 1"),
        {"pattern": SCRATCH_NAME, "marker": SCRATCH_MARKER}).scalars())


def can_create_databases(conn: Connection) -> tuple[str, bool]:
    """The session's role, and whether it may CREATE DATABASE (an attribute, never inherited)."""
    role, allowed = conn.execute(text(
        "SELECT rolname, rolcreatedb OR rolsuper FROM pg_roles WHERE rolname = current_user")).one()
    return role, allowed


def identifier(name: str) -> str:
    """``name`` as one quoted SQL identifier, whatever it holds (quotes, spaces, semicolons)."""
    return '"' + name.replace('"', '""') + '"'


def execute_literal(conn: Connection, statement: str):
    """Run ``statement`` as written: no ':name' or '%s' in a quoted name is taken for a parameter."""
    return conn.exec_driver_sql(statement.replace("%", "%%"))  # psycopg reads '%%' as '%'


SCRATCH_PREFIX = "dbmigrate_"
SCRATCH_LABELS = ("rehearsal", "drift", "verify")  # the rehearsal's copy, drift's replay, a backup's verify-restore
SCRATCH_NAME = rf"^{SCRATCH_PREFIX}({'|'.join(SCRATCH_LABELS)})_[0-9a-f]{{8}}$"  # a PostgreSQL regex
SCRATCH_MARKER = "dbmigrate scratch database: made for one run, dropped when it ends"
PERMISSION_DENIED = "42501"


@dataclass(frozen=True)
class DatabaseShape:
    """What a new database takes from the live one so that the same SQL means the same there:
    encoding, collation and ctype (and the ICU or builtin locale), and the database-level
    settings (``ALTER DATABASE ... SET``: search_path above all)."""

    encoding: str
    collate: str
    ctype: str
    provider: str  # c (libc), i (icu), b (builtin, PostgreSQL 17)
    locale: str | None  # the ICU or builtin locale
    settings: tuple[str, ...]  # "name=value", as pg_db_role_setting keeps them

    @classmethod
    def of(cls, conn: Connection) -> DatabaseShape:
        # to_jsonb: the locale columns differ between versions (daticulocale, then datlocale).
        row = conn.execute(text(
            "SELECT pg_encoding_to_char(d.encoding), to_jsonb(d), coalesce((SELECT s.setconfig FROM "
            "pg_db_role_setting s WHERE s.setdatabase = d.oid AND s.setrole = 0), '{}') "
            "FROM pg_database d WHERE d.datname = current_database()")).one()
        encoding, columns, settings = row
        return cls(encoding, columns["datcollate"], columns["datctype"], columns.get("datlocprovider", "c"),
                   columns.get("datlocale") or columns.get("daticulocale"), tuple(settings))

    def create_statement(self, name: str) -> str:
        """From template0: whatever a DBA added to template1 (an extension, a helper function) is
        not in the copy, which holds only what a restore or the migrations put there."""
        locale = {"i": f" LOCALE_PROVIDER icu ICU_LOCALE {literal(self.locale or '')}",
                  "b": f" LOCALE_PROVIDER builtin BUILTIN_LOCALE {literal(self.locale or '')}"}.get(self.provider, "")
        return (f"CREATE DATABASE {identifier(name)} TEMPLATE template0 ENCODING {literal(self.encoding)} "
                f"LC_COLLATE {literal(self.collate)} LC_CTYPE {literal(self.ctype)}{locale}")


def literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def create_database(target: DatabaseTarget, name: str, timeout: float, server: DatabaseTarget | None = None,
                    comment: str | None = None) -> DatabaseTarget:
    """A new empty database ``name`` shaped like ``target``'s (:class:`DatabaseShape`), on ``server``
    (a server of its own: any database there, as a role that may CREATE DATABASE) or else beside
    ``target``'s; ``comment`` is set on it by the very next statement (no statement makes both: a
    process killed between the two leaves the database without it)."""
    with connect(target, timeout) as conn:
        shape = DatabaseShape.of(conn)
    where = server or target
    with connect(where, timeout, isolation_level="AUTOCOMMIT") as conn:
        try:
            execute_literal(conn, shape.create_statement(name))
        except DBAPIError as exc:
            raise _not_created(where, conn, exc, name) from None
        try:
            if comment is not None:
                execute_literal(conn, f"COMMENT ON DATABASE {identifier(name)} IS {literal(comment)}")
            _apply_settings(conn, name, shape.settings)
        except BaseException:
            execute_literal(conn, f"DROP DATABASE IF EXISTS {identifier(name)} WITH (FORCE)")
            raise
    return where.with_database(name)


def scratch_database(target: DatabaseTarget, label: str, timeout: float,
                     server: DatabaseTarget | None = None) -> DatabaseTarget:
    """:func:`create_database` under a new scratch name, marked as the tool's own (its name and
    comment: see :func:`abandoned_scratch_databases`)."""
    return create_database(target, f"{SCRATCH_PREFIX}{label}_{uuid.uuid4().hex[:8]}", timeout, server, SCRATCH_MARKER)


def _not_created(where: DatabaseTarget, conn: Connection, exc: DBAPIError, name: str) -> DbMigrateError:
    reason = f"CREATE DATABASE {identifier(name)} on {where.host}:{where.port}: {first_line(exc.orig)}"
    if getattr(exc.orig, "sqlstate", None) != PERMISSION_DENIED or not name.startswith(SCRATCH_PREFIX):
        return BackupFailed(reason)
    role, _ = can_create_databases(conn)
    return ConfigError(f"{reason}: {scratch_privilege_advice(role)}")


def scratch_privilege_advice(role: str) -> str:
    return (f"grant it (ALTER ROLE {identifier(role)} CREATEDB), or give dbmigrate a server of its own for "
            "scratch databases (DBMIGRATE_SCRATCH_URL, or the policy's scratch_server block)")


def _apply_settings(conn: Connection, name: str, settings: tuple[str, ...]) -> None:
    """The live database's ``ALTER DATABASE ... SET`` on the copy. Each value is set in this session
    first and stored FROM CURRENT: PostgreSQL parses it as it did the original (a list such as
    search_path stays a list). A setting the role may not make (superuser-only: logging and the
    like, which do not change what SQL means) is left out."""
    for entry in settings:
        setting, _, value = entry.partition("=")
        try:
            conn.execute(text("SELECT set_config(:name, :value, false)"), {"name": setting, "value": value})
        except DBAPIError as exc:
            if getattr(exc.orig, "sqlstate", None) == PERMISSION_DENIED:
                continue
            raise
        execute_literal(conn, f"ALTER DATABASE {identifier(name)} SET {identifier(setting)} FROM CURRENT")


@contextmanager
def scratch(target: DatabaseTarget, label: str, timeout: float,
            server: DatabaseTarget | None = None) -> Iterator[DatabaseTarget]:
    """:func:`scratch_database`, dropped on the way out whatever happened."""
    copy = scratch_database(target, label, timeout, server)
    try:
        yield copy
    finally:
        drop_database(server or target, copy.database, timeout)


def drop_database(target: DatabaseTarget, name: str, timeout: float) -> None:
    _outside_transaction(target, f"DROP DATABASE IF EXISTS {identifier(name)} WITH (FORCE)", timeout)


def _outside_transaction(target: DatabaseTarget, statement: str, timeout: float) -> None:
    with connect(target, timeout, isolation_level="AUTOCOMMIT") as conn:
        try:
            execute_literal(conn, statement)
        except DBAPIError as exc:  # no permission, a name in use
            raise BackupFailed(f"{statement}: {str(exc.orig).strip().splitlines()[0]}") from None
