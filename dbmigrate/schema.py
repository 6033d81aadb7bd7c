"""A database's schema read from PostgreSQL's catalogs, one object at a time, so two
schemas can be compared object by object (see :mod:`dbmigrate.drift`).

Every object is named as an operator would look it up: ``schema.table`` for tables,
views and sequences, ``schema.table.column`` for columns, ``schema.table.constraint``
for constraints, triggers and policies (their names are unique per table),
``schema.index`` for indexes, ``schema.function(argument types)`` for functions, and
``on table schema.table to ROLE`` for what a role was granted on an object.
System schemas, Alembic's version table and what an extension created are left out:
they are not the project's.

Owners and grantees are role names, except the role that ran the migrations (the owner of
the version table; where there is none, the session's role): it is "the migrating role" on
both sides, since the scratch database the migrations are replayed into is owned by whoever
checks for drift, not necessarily by whoever ran them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from sqlalchemy import text
from sqlalchemy.engine import Connection

from dbmigrate.revisions import VERSION_TABLE

_USER_SCHEMA = "n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\\_%'"


def _not_from_extension(catalog: str, oid: str) -> str:
    return (f"NOT EXISTS (SELECT 1 FROM pg_depend e WHERE e.classid = '{catalog}'::regclass "
            f"AND e.objid = {oid} AND e.deptype = 'e')")


# Not Alembic's version table, nor a relation an extension made (the extension is the object compared).
_OURS = f"c.relname <> '{VERSION_TABLE}' AND {_not_from_extension('pg_class', 'c.oid')}"
_MIGRATING_ROLE = (f"coalesce((SELECT v.relowner FROM pg_class v WHERE v.relname = '{VERSION_TABLE}' "
                   "AND v.relkind IN ('r', 'p') ORDER BY v.oid LIMIT 1), "
                   "(SELECT r.oid FROM pg_roles r WHERE r.rolname = current_user))")


def _role(oid: str) -> str:
    return (f"CASE WHEN {oid} = 0 THEN 'PUBLIC' WHEN {oid} = {_MIGRATING_ROLE} THEN 'the migrating role' "
            f"ELSE pg_get_userbyid({oid})::text END")


def _comment(oid: str, catalog: str) -> str:
    return f"coalesce(quote_literal(obj_description({oid}, '{catalog}')), 'none')"


_INDEXES = ("SELECT {} FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
            "JOIN pg_namespace n ON n.oid = c.relnamespace JOIN pg_class t ON t.oid = i.indrelid "
            "JOIN pg_namespace tn ON tn.oid = t.relnamespace ")
_RELATION_KIND = ("CASE c.relkind WHEN 'r' THEN 'table' WHEN 'p' THEN 'table' WHEN 'v' THEN 'view' "
                  "WHEN 'm' THEN 'materialized view' WHEN 'S' THEN 'sequence' ELSE 'foreign table' END")
_RELATION = "n.nspname || '.' || c.relname"
_FUNCTION = "n.nspname || '.' || p.proname || '(' || pg_get_function_identity_arguments(p.oid) || ')'"


def _grants(what: str, name: str, acl: str, default_acl: str, owner: str, source: str, where: str) -> str:
    """One row per role granted something on an object: its privileges. The owner's own go with
    owning it; an ACL is NULL until a first GRANT or REVOKE: the defaults (a function's: EXECUTE to PUBLIC)."""
    privileges = ("string_agg(a.privilege_type || CASE WHEN a.is_grantable THEN ' WITH GRANT OPTION' ELSE '' END, "
                  "', ' ORDER BY a.privilege_type)")
    return (f"SELECT 'grant', 'on ' || {what} || ' ' || {name} || ' to ' || {_role('a.grantee')}, {name}, "
            f"{privileges}, {privileges} FROM {source}, aclexplode(coalesce({acl}, acldefault('{default_acl}', "
            f"{owner}))) a WHERE {where} AND a.grantee <> {owner} GROUP BY 1, 2, 3")


# Each query returns (kind, name, parent, shown, attributes...) rows; the attribute names follow.
# An attribute labelled "" is shown by its value alone ("unlogged", "disabled").
_QUERIES = (
    (("schema",), ("owner",),
     f"SELECT 'schema', n.nspname, NULL, '', {_role('n.nspowner')} FROM pg_namespace n WHERE {_USER_SCHEMA}"),
    (("extension",), ("version",),
     "SELECT 'extension', extname, NULL, extversion, extversion FROM pg_extension"),
    (("table", "partitioned table"),
     ("", "row level security", "options", "partition key", "partition of", "owner", "comment"),
     ("SELECT CASE c.relkind WHEN 'p' THEN 'partitioned table' ELSE 'table' END, "
      f"{_RELATION}, NULL, '', CASE c.relpersistence WHEN 'u' THEN 'unlogged' ELSE 'logged' END, "
      "CASE WHEN c.relrowsecurity THEN 'enabled' ELSE 'disabled' END "
      "|| CASE WHEN c.relforcerowsecurity THEN ', forced' ELSE '' END, "
      "coalesce(array_to_string(c.reloptions, ', '), 'none'), "
      "coalesce(pg_get_partkeydef(c.oid), 'none'), "
      "CASE WHEN c.relispartition THEN (SELECT pn.nspname || '.' || pc.relname FROM pg_inherits h "
      "JOIN pg_class pc ON pc.oid = h.inhparent JOIN pg_namespace pn ON pn.oid = pc.relnamespace "
      "WHERE h.inhrelid = c.oid) || ' ' || pg_get_expr(c.relpartbound, c.oid) ELSE 'none' END, "
      f"{_role('c.relowner')}, {_comment('c.oid', 'pg_class')} "
      "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
      f"WHERE c.relkind IN ('r', 'p') AND {_USER_SCHEMA} AND {_OURS}")),
    (("view", "materialized view"), ("definition", "options", "owner", "comment"),
     (f"SELECT {_RELATION_KIND}, {_RELATION}, NULL, '', pg_get_viewdef(c.oid), "
      f"coalesce(array_to_string(c.reloptions, ', '), 'none'), {_role('c.relowner')}, "
      f"{_comment('c.oid', 'pg_class')} FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
      f"WHERE c.relkind IN ('v', 'm') AND {_USER_SCHEMA} AND {_OURS}")),
    (("sequence",), ("type", "increment", "start", "minimum", "maximum", "cycle", "owner"),
     (f"SELECT 'sequence', {_RELATION}, NULL, '', format_type(s.seqtypid, NULL), "
      "s.seqincrement::text, s.seqstart::text, s.seqmin::text, s.seqmax::text, "
      f"CASE WHEN s.seqcycle THEN 'cycle' ELSE 'no cycle' END, {_role('c.relowner')} "
      "FROM pg_sequence s JOIN pg_class c ON c.oid = s.seqrelid JOIN pg_namespace n ON n.oid = c.relnamespace "
      f"WHERE {_USER_SCHEMA} AND {_OURS}")),
    (("column",), ("type", "", "default", "identity", "generated", "collation", "comment"),
     (f"SELECT 'column', {_RELATION} || '.' || a.attname, {_RELATION}, "
      "format_type(a.atttypid, a.atttypmod), format_type(a.atttypid, a.atttypmod), "
      "CASE WHEN a.attnotnull THEN 'NOT NULL' ELSE 'nullable' END, "
      "coalesce(pg_get_expr(d.adbin, d.adrelid), 'none'), "
      "CASE a.attidentity WHEN 'a' THEN 'always' WHEN 'd' THEN 'by default' ELSE 'none' END, "
      "CASE a.attgenerated WHEN 's' THEN 'stored' WHEN 'v' THEN 'virtual' ELSE 'none' END, "
      # the type's own collation (text's is the database's) is the default; only another one is named
      "coalesce((SELECT quote_ident(co.collname) FROM pg_collation co JOIN pg_type ty ON ty.oid = a.atttypid "
      "WHERE co.oid = a.attcollation AND a.attcollation <> ty.typcollation), 'default'), "
      "coalesce(quote_literal(col_description(c.oid, a.attnum)), 'none') "
      "FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace "
      "LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum "
      f"WHERE a.attnum > 0 AND NOT a.attisdropped AND c.relkind IN ('r', 'p') AND {_USER_SCHEMA} "
      f"AND {_OURS}")),
    # Indexes that back a primary key, unique or exclusion constraint are compared as that constraint;
    # an invalid index is not what any migration meant to build (see invalid_indexes). A partitioned
    # table's index is read like any other, and so is each partition's.
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
      f"{_RELATION} || '.' || k.conname, {_RELATION}, pg_get_constraintdef(k.oid), pg_get_constraintdef(k.oid) "
      "FROM pg_constraint k JOIN pg_class c ON c.oid = k.conrelid JOIN pg_namespace n ON n.oid = c.relnamespace "
      f"WHERE k.contype IN ('p', 'f', 'u', 'c', 'x') AND {_USER_SCHEMA} AND {_OURS}")),
    # Foreign key triggers and the like are the constraint's (tgisinternal).
    (("trigger",), ("definition", ""),
     (f"SELECT 'trigger', {_RELATION} || '.' || t.tgname, {_RELATION}, pg_get_triggerdef(t.oid), "
      "pg_get_triggerdef(t.oid), CASE t.tgenabled WHEN 'D' THEN 'disabled' WHEN 'R' THEN 'enabled on replicas only' "
      "WHEN 'A' THEN 'enabled always' ELSE 'enabled' END "
      "FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace "
      f"WHERE NOT t.tgisinternal AND {_USER_SCHEMA} AND {_OURS}")),
    # The roles a policy applies to are read like owners (CREATE POLICY ... TO CURRENT_USER names one).
    (("policy",), ("definition",),
     (f"SELECT 'policy', {_RELATION} || '.' || p.polname, {_RELATION}, d.definition, d.definition "
      "FROM pg_policy p JOIN pg_class c ON c.oid = p.polrelid JOIN pg_namespace n ON n.oid = c.relnamespace, "
      f"LATERAL (SELECT string_agg(x.role, ', ' ORDER BY x.role) AS roles FROM (SELECT {_role('r')} AS role "
      "FROM unnest(p.polroles) r) x) pr, LATERAL (SELECT concat_ws(' ', "
      "CASE WHEN NOT p.polpermissive THEN 'AS RESTRICTIVE' END, 'FOR ' || CASE p.polcmd WHEN 'r' THEN 'SELECT' "
      "WHEN 'a' THEN 'INSERT' WHEN 'w' THEN 'UPDATE' WHEN 'd' THEN 'DELETE' ELSE 'ALL' END, 'TO ' || pr.roles, "
      "'USING (' || pg_get_expr(p.polqual, p.polrelid) || ')', "
      "'WITH CHECK (' || pg_get_expr(p.polwithcheck, p.polrelid) || ')') AS definition) d "
      f"WHERE {_USER_SCHEMA} AND {_OURS}")),
    (("function", "procedure"), ("definition", "owner", "comment"),
     ("SELECT CASE p.prokind WHEN 'p' THEN 'procedure' ELSE 'function' END, "
      f"{_FUNCTION}, NULL, '', pg_get_functiondef(p.oid), {_role('p.proowner')}, {_comment('p.oid', 'pg_proc')} "
      "FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
      f"WHERE p.prokind IN ('f', 'p') AND {_USER_SCHEMA} AND {_not_from_extension('pg_proc', 'p.oid')}")),
    (("enum",), ("values", "owner", "comment"),
     ("SELECT 'enum', n.nspname || '.' || t.typname, NULL, v.labels, v.labels, "
      f"{_role('t.typowner')}, {_comment('t.oid', 'pg_type')} "
      "FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace, LATERAL (SELECT string_agg("
      "quote_literal(e.enumlabel), ', ' ORDER BY e.enumsortorder) AS labels FROM pg_enum e "
      "WHERE e.enumtypid = t.oid) v "
      f"WHERE t.typtype = 'e' AND {_USER_SCHEMA} AND {_not_from_extension('pg_type', 't.oid')}")),
    (("domain",), ("type", "", "default", "owner", "comment"),
     ("SELECT 'domain', n.nspname || '.' || t.typname, NULL, format_type(t.typbasetype, t.typtypmod), "
      "format_type(t.typbasetype, t.typtypmod), CASE WHEN t.typnotnull THEN 'NOT NULL' ELSE 'nullable' END, "
      f"coalesce(t.typdefault, 'none'), {_role('t.typowner')}, {_comment('t.oid', 'pg_type')} "
      "FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace "
      f"WHERE t.typtype = 'd' AND {_USER_SCHEMA} AND {_not_from_extension('pg_type', 't.oid')}")),
    # A domain's NOT NULL (a constraint too in PostgreSQL 17) is the domain's nullability.
    (("domain constraint",), ("definition",),
     ("SELECT 'domain constraint', n.nspname || '.' || t.typname || '.' || k.conname, "
      "n.nspname || '.' || t.typname, pg_get_constraintdef(k.oid), pg_get_constraintdef(k.oid) "
      "FROM pg_constraint k JOIN pg_type t ON t.oid = k.contypid JOIN pg_namespace n ON n.oid = t.typnamespace "
      f"WHERE k.contype = 'c' AND {_USER_SCHEMA} AND {_not_from_extension('pg_type', 't.oid')}")),
    (("grant",), ("privileges",),
     " UNION ALL ".join((
         _grants("'schema'", "n.nspname", "n.nspacl", "n", "n.nspowner", "pg_namespace n", _USER_SCHEMA),
         _grants(_RELATION_KIND, _RELATION, "c.relacl", "r", "c.relowner",
                 "pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace",
                 f"c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f') AND {_USER_SCHEMA} AND {_OURS}"),
         _grants("'column'", f"{_RELATION} || '.' || t.attname", "t.attacl", "c", "c.relowner",
                 "pg_attribute t JOIN pg_class c ON c.oid = t.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace",
                 f"t.attnum > 0 AND NOT t.attisdropped AND t.attacl IS NOT NULL AND {_USER_SCHEMA} AND {_OURS}"),
         _grants("CASE p.prokind WHEN 'p' THEN 'procedure' ELSE 'function' END", _FUNCTION, "p.proacl", "f",
                 "p.proowner", "pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace",
                 f"p.prokind IN ('f', 'p') AND {_USER_SCHEMA} AND {_not_from_extension('pg_proc', 'p.oid')}"),
     ))),
)
_ATTRIBUTES = {kind: names for kinds, names, _ in _QUERIES for kind in kinds}
# What pg_get_indexdef and pg_get_triggerdef say before the part worth showing.
_DEFINITION_HEAD = {"index": re.compile(r"^CREATE (UNIQUE )?INDEX \S+ ON (ONLY )?"),
                    "trigger": re.compile(r"^CREATE (CONSTRAINT )?TRIGGER \S+ ")}


@dataclass(frozen=True)
class SchemaObject:
    kind: str  # table, column, index, primary key, ...
    name: str
    parent: str | None  # the table of a column, index or constraint; the object of a grant
    shown: str  # what it is, in brief: a column's type, a constraint's definition
    attributes: tuple[tuple[str, str], ...]  # (label, value) pairs compared one by one

    @property
    def key(self) -> tuple[str, str]:
        return self.name, self.kind

    def described(self) -> str:
        return f"{self.kind} {self.name}" + (f" ({self.shown})" if self.shown else "")


def _shown(kind: str, shown: str) -> str:
    """ "CREATE INDEX ix ON public.t USING btree (a)" -> "on public.t USING btree (a)",
    "CREATE TRIGGER tr BEFORE UPDATE ON public.t ..." -> "BEFORE UPDATE ON public.t ..." """
    if kind == "index":
        return _DEFINITION_HEAD[kind].sub(lambda m: (m.group(1) or "").lower() + "on ", shown)
    if kind == "trigger":
        return _DEFINITION_HEAD[kind].sub("", shown)
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
