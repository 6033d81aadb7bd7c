"""A database's schema read from PostgreSQL's catalogs, one object at a time, so two
schemas can be compared object by object (see :mod:`dbmigrate.drift`).

Every object is named as an operator would look it up: ``schema.table`` for tables,
views and sequences, ``schema.table.column`` for columns, ``schema.table.constraint``
for constraints (their names are unique per table), ``schema.index`` for indexes.
System schemas and Alembic's version table are left out: they are not the project's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from sqlalchemy import text
from sqlalchemy.engine import Connection

from dbmigrate.revisions import VERSION_TABLE

_USER_SCHEMA = "n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\\_%'"
# Not Alembic's version table, nor a relation an extension made (the extension is the object compared).
_OURS = (f"c.relname <> '{VERSION_TABLE}' AND NOT EXISTS (SELECT 1 FROM pg_depend e "
         "WHERE e.classid = 'pg_class'::regclass AND e.objid = c.oid AND e.deptype = 'e')")
_INDEXES = ("SELECT {} FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
            "JOIN pg_namespace n ON n.oid = c.relnamespace JOIN pg_class t ON t.oid = i.indrelid "
            "JOIN pg_namespace tn ON tn.oid = t.relnamespace ")

# Each query returns (kind, name, parent, shown, attributes...) rows; the attribute names follow.
_QUERIES = (
    (("schema",), (),
     f"SELECT 'schema', n.nspname, NULL, '' FROM pg_namespace n WHERE {_USER_SCHEMA}"),
    (("extension",), ("version",),
     "SELECT 'extension', extname, NULL, extversion, extversion FROM pg_extension"),
    (("table",), (),
     ("SELECT CASE c.relkind WHEN 'p' THEN 'partitioned table' ELSE 'table' END, n.nspname || '.' || c.relname, "
      "NULL, '' FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
      f"WHERE c.relkind IN ('r', 'p') AND {_USER_SCHEMA} AND {_OURS}")),
    (("view", "materialized view"), ("definition",),
     ("SELECT CASE c.relkind WHEN 'v' THEN 'view' ELSE 'materialized view' END, n.nspname || '.' || c.relname, "
      "NULL, '', pg_get_viewdef(c.oid) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
      f"WHERE c.relkind IN ('v', 'm') AND {_USER_SCHEMA} AND {_OURS}")),
    (("sequence",), ("type", "increment", "start", "minimum", "maximum", "cycle"),
     ("SELECT 'sequence', n.nspname || '.' || c.relname, NULL, '', format_type(s.seqtypid, NULL), "
      "s.seqincrement::text, s.seqstart::text, s.seqmin::text, s.seqmax::text, "
      "CASE WHEN s.seqcycle THEN 'cycle' ELSE 'no cycle' END "
      "FROM pg_sequence s JOIN pg_class c ON c.oid = s.seqrelid JOIN pg_namespace n ON n.oid = c.relnamespace "
      f"WHERE {_USER_SCHEMA} AND {_OURS}")),
    (("column",), ("type", "", "default", "identity", "generated"),
     ("SELECT 'column', n.nspname || '.' || c.relname || '.' || a.attname, n.nspname || '.' || c.relname, "
      "format_type(a.atttypid, a.atttypmod), format_type(a.atttypid, a.atttypmod), "
      "CASE WHEN a.attnotnull THEN 'NOT NULL' ELSE 'nullable' END, "
      "coalesce(pg_get_expr(d.adbin, d.adrelid), 'none'), "
      "CASE a.attidentity WHEN 'a' THEN 'always' WHEN 'd' THEN 'by default' ELSE 'none' END, "
      "CASE a.attgenerated WHEN 's' THEN 'stored' WHEN 'v' THEN 'virtual' ELSE 'none' END "
      "FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace "
      "LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum "
      f"WHERE a.attnum > 0 AND NOT a.attisdropped AND c.relkind IN ('r', 'p') AND {_USER_SCHEMA} "
      f"AND {_OURS}")),
    # Indexes that back a primary key, unique or exclusion constraint are compared as that constraint;
    # an invalid index is not what any migration meant to build (see invalid_indexes).
    (("index",), ("definition",),
     (_INDEXES.format("'index', n.nspname || '.' || c.relname, tn.nspname || '.' || t.relname, "
                      "pg_get_indexdef(i.indexrelid), pg_get_indexdef(i.indexrelid)")
      + f"WHERE i.indisvalid AND {_USER_SCHEMA} AND t.relname <> '{VERSION_TABLE}' AND NOT EXISTS "
      "(SELECT 1 FROM pg_constraint k WHERE k.conindid = i.indexrelid AND k.contype IN ('p', 'u', 'x'))")),
    # NOT NULL (PostgreSQL 18 lists them here too) is the column's nullability.
    (("primary key", "foreign key", "unique constraint", "check constraint", "exclusion constraint"),
     ("definition",),
     ("SELECT CASE k.contype WHEN 'p' THEN 'primary key' WHEN 'f' THEN 'foreign key' WHEN 'u' THEN "
      "'unique constraint' WHEN 'c' THEN 'check constraint' ELSE 'exclusion constraint' END, "
      "n.nspname || '.' || c.relname || '.' || k.conname, n.nspname || '.' || c.relname, "
      "pg_get_constraintdef(k.oid), pg_get_constraintdef(k.oid) "
      "FROM pg_constraint k JOIN pg_class c ON c.oid = k.conrelid JOIN pg_namespace n ON n.oid = c.relnamespace "
      f"WHERE k.contype IN ('p', 'f', 'u', 'c', 'x') AND {_USER_SCHEMA} AND {_OURS}")),
)
_ATTRIBUTES = {kind: names for kinds, names, _ in _QUERIES for kind in kinds}
_INDEX_HEAD = re.compile(r"^CREATE (UNIQUE )?INDEX \S+ ON (ONLY )?")


@dataclass(frozen=True)
class SchemaObject:
    kind: str  # table, column, index, primary key, ...
    name: str
    parent: str | None  # the table of a column, index or constraint
    shown: str  # what it is, in brief: a column's type, a constraint's definition
    attributes: tuple[tuple[str, str], ...]  # (label, value) pairs compared one by one

    @property
    def key(self) -> tuple[str, str]:
        return self.name, self.kind

    def described(self) -> str:
        return f"{self.kind} {self.name}" + (f" ({self.shown})" if self.shown else "")


def _shown(kind: str, shown: str) -> str:
    if kind == "index":  # "CREATE INDEX ix ON public.t USING btree (a)" -> "on public.t USING btree (a)"
        return _INDEX_HEAD.sub(lambda m: (m.group(1) or "").lower() + "on ", shown)
    return shown


def read(conn: Connection) -> dict[tuple[str, str], SchemaObject]:
    """Every object of the database's own schemas, keyed (name, kind)."""
    objects = {}
    for _, _, query in _QUERIES:
        for kind, name, parent, shown, *values in conn.execute(text(query)):
            obj = SchemaObject(kind, name, parent, _shown(kind, shown),
                               tuple((label, _shown(kind, str(value))) for label, value in zip(_ATTRIBUTES[kind], values)))
            objects[obj.key] = obj
    return objects


def invalid_indexes(conn: Connection) -> list[str]:
    """The invalid indexes (``pg_index.indisvalid = false``: what a failed ``CREATE INDEX
    CONCURRENTLY`` leaves, which the planner never uses yet every write maintains), each as
    ``schema.index on schema.table``."""
    return list(conn.execute(text(
        _INDEXES.format("n.nspname || '.' || c.relname || ' on ' || tn.nspname || '.' || t.relname")
        + f"WHERE NOT i.indisvalid AND {_USER_SCHEMA} ORDER BY 1")).scalars())
