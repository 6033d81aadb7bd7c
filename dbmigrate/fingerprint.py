"""A database's fingerprint: schema hash, per-table row counts and alembic revision.

Two equal fingerprints mean the schema and the amount of data are the same; this
is how a failed run proves it left the database as it found it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from sqlalchemy import text
from sqlalchemy.engine import Connection

from dbmigrate import db, revisions

_SCHEMA_QUERIES = (
    "SELECT table_name, column_name, data_type, is_nullable, column_default, character_maximum_length "
    "FROM information_schema.columns WHERE table_schema = current_schema() ORDER BY 1, 2",
    "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = current_schema() ORDER BY 1",
    "SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid) FROM pg_constraint "
    "WHERE connamespace = current_schema()::regnamespace ORDER BY 1, 2",
)


@dataclass(frozen=True)
class Fingerprint:
    schema_sha256: str
    row_counts: dict[str, int]
    revisions: tuple[str, ...]


def row_counts(conn: Connection) -> dict[str, int]:
    """Exact row counts of every user table, keyed ``schema.table``, in the connection's snapshot."""
    tables = conn.execute(
        text(
            "SELECT format('%I.%I', schemaname, tablename) AS qualified, schemaname || '.' || tablename AS name "
            "FROM pg_tables WHERE schemaname NOT IN ('pg_catalog', 'information_schema') ORDER BY 2"
        )
    ).all()
    return {t.name: int(db.execute_literal(conn, f"SELECT count(*) FROM {t.qualified}").scalar_one()) for t in tables}


def tables_differing(a: dict[str, int], b: dict[str, int]) -> list[str]:
    """Tables whose row counts differ between two snapshots (or that only one has)."""
    return sorted(t for t in set(a) | set(b) if a.get(t) != b.get(t))


def take(conn: Connection) -> Fingerprint:
    digest = hashlib.sha256()
    for query in _SCHEMA_QUERIES:
        rows = [list(map(str, row)) for row in conn.execute(text(query))]
        digest.update(json.dumps(rows).encode())
    return Fingerprint(digest.hexdigest(), row_counts(conn), revisions.current_revisions(conn))
