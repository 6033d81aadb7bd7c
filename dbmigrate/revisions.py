"""The Alembic project (alembic.ini + script directory) and revision arithmetic.

Works with any project whose env.py reads ``sqlalchemy.url``: the URL is set on
the in-memory Config and never written to disk.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from alembic.config import Config
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection

from dbmigrate.errors import ConfigError, RevisionError, UnknownRevision, VersionTableAmbiguous
from dbmigrate.target import DatabaseTarget

DEFAULT_CONFIG = "alembic.ini"
VERSION_TABLE = "alembic_version"
# A revision id, head(s), base, +N/-N, REV+N or BRANCH@REV. Alembic asserts on "", "@" or "REV@".
_SYNTAX = re.compile(r"[\w.+-]+(@[\w.+-]+)?", re.ASCII)


def check_syntax(revision: str) -> str:
    if not _SYNTAX.fullmatch(revision):
        raise RevisionError(
            f"malformed revision {revision!r}: expected a revision id, head, heads, base, +N, -N or BRANCH@REV"
        )
    return revision


def label(revisions: tuple[str, ...] | list[str]) -> str | None:
    """The revision(s) as reports and backups record them: joined with ',', None at base."""
    return ",".join(revisions) or None


def shown(revisions: str | tuple[str, ...] | list[str] | None) -> str:
    """Revision(s) as messages show them: a recorded label as it is, several revisions joined
    with ', ', and 'base' when there is none."""
    if revisions is None or isinstance(revisions, str):
        return revisions or "base"
    return ", ".join(revisions) or "base"


@dataclass(frozen=True)
class PlannedStep:
    """One revision a run will apply (upgrade) or revert (downgrade)."""

    revision: str
    message: str

    def as_dict(self) -> dict:
        return {"revision": self.revision, "message": self.message}


@dataclass
class Project:
    config: Config
    script: ScriptDirectory

    @property
    def heads(self) -> list[str]:
        return list(self.script.get_heads())

    def check_known(self, revisions: tuple[str, ...]) -> list[str]:
        """Revisions in the database that these scripts do not know."""
        unknown = []
        for rev in revisions:
            try:
                self.script.get_revision(rev)
            except CommandError:
                unknown.append(rev)
        return unknown

    def ancestors(self, revision: str) -> set[str]:
        """Every revision below ``revision`` (not itself)."""
        return {r.revision for r in self.script.iterate_revisions(revision, "base")} - {revision}

    def several_rows_problem(self, current: tuple[str, ...]) -> str | None:
        """What is wrong with a version table holding several rows, or None if it holds at most one.

        The one rule for every command that changes the database: Alembic would plan
        from each row, so overlapping rows (one an ancestor of another) make it revert
        or re-apply revisions the database never had, and even separate branches are
        left to a human. Nothing is guessed."""
        if len(current) <= 1:
            return None
        if unknown := self.check_known(current):
            relation = f"{', '.join(unknown)} unknown to the migration scripts"
        else:
            pairs = [f"{a} is an ancestor of {b}" for b in current for a in current if a in self.ancestors(b)]
            relation = "; ".join(pairs) or "separate branches"
        return (f"{VERSION_TABLE} holds {len(current)} rows: {', '.join(current)} ({relation}): "
                "fix the table by hand; dbmigrate will not guess")

    def require_one_row(self, current: tuple[str, ...]) -> None:
        """Refuse (before anything runs) a database whose version table holds several rows."""
        if problem := self.several_rows_problem(current):
            raise VersionTableAmbiguous(problem)

    def require_known(self, current: tuple[str, ...]) -> None:
        """Refuse (before anything runs) a database at a revision these scripts do not know."""
        if unknown := self.check_known(current):
            raise UnknownRevision(f"the database is at revision {', '.join(unknown)}, "
                                  "which the migration scripts do not know")

    def resolve(self, revision: str) -> str:
        """Validate a target: one known revision, 'heads', 'base', or relative."""
        check_syntax(revision)
        heads = self.heads
        if revision == "head" and len(heads) > 1:
            raise RevisionError(
                f"'head' is ambiguous: the scripts have {len(heads)} heads ({', '.join(heads)}); "
                "name one revision, or merge the heads with 'alembic merge'"
            )
        if revision in ("head", "heads", "base") or revision[:1] in "+-":
            return revision
        try:
            scripts = self.script.get_revisions(revision)
        except CommandError:
            raise RevisionError(f"unknown revision '{revision}': not in the migration scripts") from None
        if len(scripts) != 1 or scripts[0] is None:
            raise RevisionError(f"unknown revision '{revision}'")
        return scripts[0].revision

    def plan_upgrade(self, current: tuple[str, ...], target: str) -> list[PlannedStep]:
        """The steps up to ``target``; a target below the database's revision is refused (Alembic
        would have nothing to do, and a run "to" it would read as if the database went there)."""
        if below := [rev for rev in current if target == "base" or target in self.ancestors(rev)]:
            raise RevisionError(
                f"cannot upgrade to {target}: the database is at {shown(below)}, above it; to go back to {target}, "
                f"downgrade (dbmigrate downgrade -r {target}, or the db-rollback deployment)")
        # _upgrade_revs is what alembic.command.upgrade runs; using it keeps our plan
        # identical to what Alembic will execute.
        try:
            steps = self.script._upgrade_revs(target, current)
        except CommandError as exc:
            raise RevisionError(_one_line(exc, f"cannot upgrade to '{target}'")) from None
        return [PlannedStep(s.revision.revision, s.doc or "") for s in steps]

    def plan_downgrade(self, current: tuple[str, ...], target: str) -> list[PlannedStep]:
        if target.startswith("+"):
            raise RevisionError(f"'{target}' moves up: use upgrade")
        try:
            steps = self.script._downgrade_revs(target, current)
        except CommandError as exc:
            if "not a valid downgrade target" in str(exc):
                raise RevisionError(
                    f"cannot downgrade to {target}: it is not below the current revision {shown(current)}"
                ) from None
            raise RevisionError(_one_line(exc, f"cannot downgrade to '{target}'")) from None
        return [PlannedStep(s.revision.revision, s.doc or "") for s in steps]


def _one_line(exc: Exception, fallback: str) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else fallback


def load(config_path: str | None, target: DatabaseTarget | None = None, timeout: float | None = None,
         project_logging: bool = True) -> Project:
    """Load alembic.ini (``--alembic-config``, ``ALEMBIC_CONFIG``, or ./alembic.ini).

    ``project_logging=False`` keeps the project's env.py from configuring Python logging:
    every Alembic template calls ``fileConfig(config.config_file_name)`` when that name is
    set, and fileConfig shuts down every handler in the process (a Prefect flow's run log
    among them) and disables the loggers it does not name."""
    path = Path(config_path or os.environ.get("ALEMBIC_CONFIG") or DEFAULT_CONFIG)
    if not path.is_file():
        raise ConfigError(f"alembic config not found: {path} (use --alembic-config PATH or ALEMBIC_CONFIG)")
    config = Config(str(path))
    if not project_logging:
        config.file_config  # read the file (and %(here)s) now, while the name is still known
        config.config_file_name = None
    if not config.get_main_option("script_location"):
        raise ConfigError(f"{path} has no 'script_location' in its [alembic] section")
    try:
        script = ScriptDirectory.from_config(config)
        script.get_heads()  # loads every revision file: a broken one fails here, not mid-run
    except CommandError as exc:
        raise ConfigError(f"alembic scripts in {path}: {_one_line(exc, 'cannot be loaded')}") from None
    if target is not None:
        # ConfigParser interpolates '%': escape it so passwords with '%' survive.
        config.set_main_option("sqlalchemy.url", target.sqlalchemy_url(timeout).replace("%", "%%"))
    return Project(config, script)


def has_version_table(conn: Connection) -> bool:
    return inspect(conn).has_table(VERSION_TABLE)


def current_revisions(conn: Connection) -> tuple[str, ...]:
    """The revision(s) stamped in the database; empty before the first migration."""
    if not has_version_table(conn):
        return ()
    return tuple(sorted(conn.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalars()))


def current_label(conn: Connection) -> str | None:
    """The revision(s) as backups and reports name them (see :func:`label`)."""
    return label(current_revisions(conn))
