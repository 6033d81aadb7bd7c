"""Drift: does the database's schema still equal what its migrations build, and its models?

The revision the database claims is replayed into a scratch database on the same server (or
on a server of its own, ``Settings.scratch_server``), made from template0 like the database
and dropped afterwards whatever happened, and both schemas are read from the catalogs and
compared object by object (:mod:`dbmigrate.schema`), so any hand-made change (an index
added in a hurry, a column dropped outside Alembic) is named. Where the project's env.py
sets ``target_metadata``, Alembic's ``compare_metadata`` also compares the database with
the models. Invalid indexes are findings too. Nothing here changes the database: the replay
is confined to the scratch database (:func:`dbmigrate.isolation.confined`), and a revision that
reaches outside it fails the check (OutsideTheCopy) instead of finding no drift.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from alembic.autogenerate import compare_metadata
from alembic.runtime.environment import EnvironmentContext

from dbmigrate import db, health, isolation, migrate, revisions, schema
from dbmigrate.errors import DriftNotChecked, OutsideTheCopy, VersionTableAmbiguous, first_line
from dbmigrate.health import FAIL, OK, WARN, Check
from dbmigrate.revisions import Project
from dbmigrate.settings import Settings
from dbmigrate.target import DatabaseTarget

NO_MODELS = "no models: compare_metadata skipped"
MODELS = "models compared (compare_metadata)"
SHOWN_IN_DETAIL = 3


@dataclass
class Drift:
    revision: str  # the revision replayed, as messages show it ("base" when none)
    findings: list[str]  # one line each, naming the object
    models: str  # MODELS, NO_MODELS, or why they were not compared
    duration_s: float

    def summary(self) -> str:
        """One line: the verdict, then the first findings."""
        skipped = "" if self.models == MODELS else "; " + self.models
        if not self.findings:
            return f"schema matches the migrations at {self.revision}" + (skipped or " and the models")
        more = len(self.findings) - SHOWN_IN_DETAIL
        return (f"{len(self.findings)} difference(s) from the migrations at {self.revision}: "
                + "; ".join(self.findings[:SHOWN_IN_DETAIL]) + (f" (and {more} more)" if more > 0 else "") + skipped)

    def as_dict(self) -> dict:
        return {"revision": self.revision, "drift": bool(self.findings), "findings": self.findings,
                "models": self.models}


def find(target: DatabaseTarget, settings: Settings) -> Drift:
    """Compare the database with what its migrations build (and its models); raises
    VersionTableAmbiguous, UnknownRevision or DriftNotChecked when it cannot."""
    started = time.monotonic()
    project = settings.project(target)
    with db.connect(target, settings.connect_timeout) as conn:
        current = revisions.current_revisions(conn)
        project.require_one_row(current)
        project.require_known(current)
        live = schema.read(conn)
        invalid = schema.invalid_indexes(conn)
    health.require_scratch_server("drift's replay", target, settings.scratch_server, settings.connect_timeout)
    expected = _replayed(target, settings, current)
    findings = [f"invalid index {index} (a failed CREATE INDEX CONCURRENTLY leaves one: drop it, build it again)"
                for index in invalid]
    findings += differences(live, expected)
    # The models describe the head: below it, every pending revision would be a finding.
    if set(current) == set(project.heads):
        from_models = model_differences(project, settings.limits)
        findings += [f"models: {line}" for line in from_models or ()]
        models = NO_MODELS if from_models is None else MODELS
    else:
        models = f"models not compared: the database is not at head ({revisions.shown(project.heads)})"
    return Drift(revisions.shown(current), findings, models, time.monotonic() - started)


def check(target: DatabaseTarget, settings: Settings) -> Check:
    """:func:`find` as the db-health flow's check: FAIL with ``data["findings"]`` when there is drift."""
    started = time.monotonic()
    try:
        found = find(target, settings)
    except VersionTableAmbiguous as exc:
        return Check("drift", WARN, f"not checked: {exc}", time.monotonic() - started)
    except OutsideTheCopy as exc:  # worse than drift: replaying a revision changed the database
        return Check("drift", FAIL, str(exc), time.monotonic() - started)
    return Check("drift", FAIL if found.findings else OK, found.summary(), found.duration_s, found.as_dict())


def _replayed(target: DatabaseTarget, settings: Settings, current: tuple[str, ...]) -> dict:
    """The schema the migrations build up to ``current``, replayed into a scratch database."""
    with db.scratch(target, "drift", settings.connect_timeout, settings.scratch_server) as scratch:
        if current:
            try:
                with isolation.confined(target, scratch, settings.connect_timeout, "drift's scratch database"):
                    migrate.run(settings.project(scratch), current[0], upgrade=True, limits=settings.limits,
                                on_step=lambda step: None)
            except OutsideTheCopy:
                raise
            except Exception as exc:  # a revision can fail with anything: say which, in one line
                raise DriftNotChecked(
                    f"replaying the migrations up to {current[0]} into a scratch database failed: "
                    f"{scratch.redact(first_line(exc))}") from None
        with db.connect(scratch, settings.connect_timeout) as conn:
            if revisions.current_revisions(conn) != current:  # env.py connected elsewhere: compare nothing
                raise DriftNotChecked(
                    "the migrations did not run in the scratch database: the project's env.py must connect "
                    "with sqlalchemy.url (dbmigrate sets it to the scratch database), not a URL of its own")
            return schema.read(conn)


def differences(live: dict, expected: dict) -> list[str]:
    """What differs, one line per object, each object after the table (or object) it belongs to;
    the columns, indexes, constraints and grants of an object only one side has are that
    object's finding, not more lines."""
    whole = {name for name, kind in live.keys() ^ expected.keys() if kind != "extension"}  # its name may be a schema's
    findings = []
    for key in sorted(live.keys() | expected.keys(), key=lambda k: ((live.get(k) or expected[k]).parent or k[0], k)):
        have, want = live.get(key), expected.get(key)
        obj = have or want
        if obj.parent in whole:
            continue
        if want is None:
            findings.append(f"extra {obj.described()}")
        elif have is None:
            findings.append(f"missing {obj.described()}")
        else:
            findings += [_changed(obj, label, a, b)
                         for (label, a), (_, b) in zip(have.attributes, want.attributes) if a != b]
    return findings


def _changed(obj: schema.SchemaObject, label: str, have: str, want: str) -> str:
    """One line: a value that spans lines (a view's query, a function's body) is not shown."""
    if "\n" in have + want:
        return f"{obj.kind} {obj.name}: {label} differs"
    return f"{obj.kind} {obj.name}: {label + ' ' if label else ''}{have} in the database, {want} in the migrations"


def model_differences(project: Project, limits: migrate.SessionLimits) -> list[str] | None:
    """Alembic's compare_metadata of the database against the project's models, as findings;
    None when env.py sets no ``target_metadata``. The metadata is obtained as ``alembic check``
    does: env.py runs, and hands its configured context (models included) to our function."""
    found: dict = {}

    def compare(rev, context) -> list:
        metadata = context.opts.get("target_metadata")
        if metadata is not None:
            default_schema = context.dialect.default_schema_name
            found["lines"] = [_model_line(diff, default_schema, context.dialect)
                              for diff in _flat(compare_metadata(context, metadata))]
        return []  # nothing to run

    # dont_mutate: the version table is not created where there is none.
    with migrate.session_limits(limits), EnvironmentContext(project.config, project.script, fn=compare,
                                                            as_sql=False, dont_mutate=True):
        project.script.run_env()
    return sorted(found["lines"]) if "lines" in found else None


def _flat(diffs: list) -> list[tuple]:
    """compare_metadata groups the changes of one column in a list."""
    return [d for diff in diffs for d in (diff if isinstance(diff, list) else [diff])]


def _model_line(diff: tuple, default_schema: str, dialect) -> str:
    """One compare_metadata difference in the words of the migrations' findings: "extra" is in
    the database, not in the models; "missing" in the models, not in the database."""
    op = diff[0]
    side = "missing" if op.startswith("add_") else "extra"

    def qualified(schema_name, *names) -> str:
        return ".".join((schema_name or default_schema, *names))

    def rendered(value) -> str:
        value = getattr(value, "arg", value)  # a server default's expression
        if value is None:
            return "none"
        if hasattr(value, "compile"):
            return str(value.compile(dialect=dialect))
        return str(value)

    if op in ("add_table", "remove_table"):
        return f"{side} table {qualified(diff[1].schema, diff[1].name)}"
    if op in ("add_column", "remove_column"):
        _, schema_name, table, column = diff
        return f"{side} column {qualified(schema_name, table, column.name)} ({rendered(column.type)})"
    if op in ("add_index", "remove_index"):
        return f"{side} index {qualified(diff[1].table.schema, diff[1].name)}"
    if op in ("add_constraint", "remove_constraint", "add_fk", "remove_fk"):
        constraint = diff[1]
        kind = "foreign key" if op.endswith("_fk") else "constraint"
        return f"{side} {kind} {qualified(constraint.table.schema, constraint.table.name, str(constraint.name))}"
    if op.startswith("modify_"):
        _, schema_name, table, column, _, old, new = diff
        what = op.removeprefix("modify_")
        if what == "nullable":
            old, new = ("nullable" if v else "NOT NULL" for v in (old, new))
            return f"column {qualified(schema_name, table, column)}: {old} in the database, {new} in the models"
        return (f"column {qualified(schema_name, table, column)}: {what} {rendered(old)} in the database, "
                f"{rendered(new)} in the models")
    return f"{op.replace('_', ' ')}: {' '.join(str(part) for part in diff[1:])}"
