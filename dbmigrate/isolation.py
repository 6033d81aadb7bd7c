"""Revisions run on a scratch copy (the rehearsal, drift's replay) only ever read the real database.

:func:`confined` is what both wrap around running the project's revisions on the copy:

- every environment variable that names the real database (a URL, a libpq ``key=value`` string,
  ``PGDATABASE``) names the copy instead, so a revision or an env.py that connects on its own
  from the environment reaches the copy;
- a statement sent through SQLAlchemy to any other PostgreSQL database is refused before it runs;
- since a revision may also connect without SQLAlchemy (``psycopg.connect``, a ``psql``
  subprocess) or change what a dropped copy does not take with it (roles, role settings,
  tablespaces, databases), the real database's fingerprint and the cluster's shared objects are
  read before and after: any difference fails the run (:class:`OutsideTheCopy`), naming it.

The real database and its server are only read here, whichever server the copy is on.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from urllib.parse import quote

from psycopg.conninfo import conninfo_to_dict, make_conninfo
from sqlalchemy import event, text
from sqlalchemy.engine import URL, Connection, Engine, make_url

from dbmigrate import db, fingerprint
from dbmigrate.errors import ConfigError, OutsideTheCopy
from dbmigrate.fingerprint import Fingerprint
from dbmigrate.target import DatabaseTarget, pgoptions

READ_ONLY = "-c default_transaction_read_only=on"

SETTINGS = "the settings of"
# The server's shared objects, which outlive any database: name -> how it is now.
_CLUSTER = {
    "role": "SELECT rolname, concat_ws(' ', CASE WHEN rolsuper THEN 'SUPERUSER' END, CASE WHEN rolcreaterole "
            "THEN 'CREATEROLE' END, CASE WHEN rolcreatedb THEN 'CREATEDB' END, CASE WHEN rolcanlogin THEN 'LOGIN' "
            "END, CASE WHEN rolreplication THEN 'REPLICATION' END, CASE WHEN rolbypassrls THEN 'BYPASSRLS' END, "
            "'CONNECTION LIMIT ' || rolconnlimit, 'VALID UNTIL ' || rolvaliduntil) FROM pg_roles",
    "membership": "SELECT m.rolname || ' in ' || r.rolname, '' FROM pg_auth_members a "
                  "JOIN pg_roles r ON r.oid = a.roleid JOIN pg_roles m ON m.oid = a.member",
    # a scratch database's own settings go with it
    SETTINGS: "SELECT concat_ws(' in database ', 'role ' || r.rolname, d.datname), array_to_string(s.setconfig, "
              "', ') FROM pg_db_role_setting s LEFT JOIN pg_roles r ON r.oid = s.setrole "
              "LEFT JOIN pg_database d ON d.oid = s.setdatabase "
              f"WHERE d.datname IS NULL OR NOT starts_with(d.datname, '{db.SCRATCH_PREFIX}')",
    "tablespace": "SELECT spcname, concat_ws(' ', nullif(pg_tablespace_location(oid), ''), "
                  "array_to_string(spcoptions, ',')) FROM pg_tablespace",
    "database": f"SELECT datname, '' FROM pg_database WHERE NOT starts_with(datname, '{db.SCRATCH_PREFIX}')",
}


@dataclass(frozen=True)
class Surroundings:
    """What a revision on the copy must leave as it was: the real database and its server's shared objects."""

    database: Fingerprint
    cluster: dict[str, dict[str, str]]  # kind -> name -> description

    @classmethod
    def read(cls, target: DatabaseTarget, timeout: float) -> Surroundings:
        with db.connect(target, timeout) as conn:
            return cls(fingerprint.take(conn), {kind: _described(conn, query) for kind, query in _CLUSTER.items()})

    def changes(self, after: Surroundings) -> list[str]:
        """What differs in ``after``, one phrase each."""
        was, now = self.database, after.database
        found = ["the schema of the database"] if was.schema_sha256 != now.schema_sha256 else []
        if was.revisions != now.revisions:
            found.append(f"its revision ({' '.join(was.revisions) or 'none'} -> {' '.join(now.revisions) or 'none'})")
        found += [f"the rows of {table} ({was.row_counts.get(table, 'no table')} -> "
                  f"{now.row_counts.get(table, 'no table')})"
                  for table in fingerprint.tables_differing(was.row_counts, now.row_counts)]
        for kind, before in self.cluster.items():
            current = after.cluster[kind]
            if kind == SETTINGS:  # a role without settings has none: no row
                found += [f"{kind} {name}: {before.get(name, 'none')} -> {current.get(name, 'none')}"
                          for name in sorted(before.keys() | current.keys()) if before.get(name) != current.get(name)]
                continue
            found += [f"{kind} {name} created" for name in sorted(current.keys() - before.keys())]
            found += [f"{kind} {name} dropped" for name in sorted(before.keys() - current.keys())]
            found += [f"{kind} {name}: {before[name] or 'none'} -> {current[name] or 'none'}"
                      for name in sorted(before.keys() & current.keys()) if before[name] != current[name]]
        return found


def _described(conn: Connection, query: str) -> dict[str, str]:
    return {str(name): str(description or "") for name, description in conn.execute(text(query))}


@contextmanager
def confined(target: DatabaseTarget, copy: DatabaseTarget, timeout: float, copy_named: str) -> Iterator[None]:
    """Run the body (revisions on ``copy``) so that it only reads ``target``; ``copy_named`` is how
    messages name the copy ("the rehearsal's copy"). Raises OutsideTheCopy when the real database or
    the cluster changed meanwhile, whatever else the body raised."""
    before = Surroundings.read(target, timeout)
    try:
        with _refused_elsewhere(copy, copy_named), environment_at(target, copy):
            yield
    except Exception:
        _require_unchanged(target, before, timeout, copy_named)
        raise
    _require_unchanged(target, before, timeout, copy_named)


def _require_unchanged(target: DatabaseTarget, before: Surroundings, timeout: float, copy_named: str) -> None:
    changed = before.changes(Surroundings.read(target, timeout))
    if changed:
        raise OutsideTheCopy(f"a revision reaches outside {copy_named}: while it ran on the copy, "
                             f"{target.where} and its server changed: {'; '.join(changed)} (what it changed stays "
                             "changed: undo it by hand, and give the revision the connection Alembic runs it with)")


@contextmanager
def rendering(target: DatabaseTarget) -> Iterator[None]:
    """Alembic's offline mode (the lint, ``--dry-run``, the approval page's SQL) runs each revision's
    ``upgrade()`` to render it: meanwhile what names ``target`` in the environment names it read-only
    (``default_transaction_read_only``), and SQLAlchemy sends no statement to any PostgreSQL database."""
    options = pgoptions(READ_ONLY, base=target.query_options)
    read_only = DatabaseTarget(target.url.update_query_dict({"options": options}), target.environment)
    with _refused_elsewhere(None, "the offline rendering (no database)"), environment_at(target, read_only):
        yield


@contextmanager
def _refused_elsewhere(copy: DatabaseTarget | None, copy_named: str) -> Iterator[None]:
    """A statement any SQLAlchemy engine sends to a PostgreSQL database but ``copy``'s is refused before it runs."""

    def refuse(conn: Connection, *_) -> None:
        if conn.dialect.name == "postgresql" and (copy is None or conn.engine.url.database != copy.database):
            raise ConfigError(f"env.py connected to database '{conn.engine.url.database}', not {copy_named}: "
                              "its statement was refused there; give env.py the URL dbmigrate sets (config "
                              "'sqlalchemy.url', or DATABASE_URL)")

    event.listen(Engine, "before_cursor_execute", refuse)
    try:
        yield
    finally:
        event.remove(Engine, "before_cursor_execute", refuse)


@contextmanager
def environment_at(target: DatabaseTarget, copy: DatabaseTarget) -> Iterator[None]:
    """Every environment variable that names ``target``'s database names ``copy`` meanwhile."""
    saved = dict(os.environ)
    redirected = {name: value for name, value in ((name, _at_copy(value, target, copy))
                                                  for name, value in saved.items()) if value is not None}
    if saved.get("PGDATABASE") == target.database:  # libpq's defaults: the copy's server too
        redirected.update(copy.libpq_env())
    os.environ.update(redirected)
    try:
        yield
    finally:
        for name in redirected:
            if name in saved:
                os.environ[name] = saved[name]
            else:
                os.environ.pop(name, None)


def _at_copy(value: str, target: DatabaseTarget, copy: DatabaseTarget) -> str | None:
    """``value`` pointed at ``copy`` when it is a PostgreSQL URL or libpq string naming ``target``'s database."""
    value = value.strip()
    if value.startswith(("postgresql", "postgres")) and "://" in value:
        try:
            url = make_url(value)
        except Exception:  # not a URL after all
            return None
        if url.database != target.database:
            return None
        return _rendered(copy.url.set(drivername=url.drivername))
    if "dbname=" in value:
        try:
            params = conninfo_to_dict(value)
        except Exception:  # not a libpq string after all
            return None
        if params.get("dbname") != target.database:
            return None
        return make_conninfo(value, host=copy.host, port=str(copy.port), dbname=copy.database,
                             user=copy.url.username, password=copy.url.password, options=copy.query_options)
    return None


def _rendered(url: URL) -> str:
    """``url`` as libpq reads it: its options percent-encoded (SQLAlchemy writes a space as '+')."""
    options = url.query.get("options")
    if options is None:
        return url.render_as_string(hide_password=False)
    rendered = url.difference_update_query(["options"]).render_as_string(hide_password=False)
    return f"{rendered}{'&' if '?' in rendered else '?'}options={quote(str(options), safe='')}"
