"""Pre-flight health checks. Each check has a name, a status (ok/warn/fail), a
one-line detail, its duration, and structured data for the JSON output."""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from dbmigrate import db, revisions, schema
from dbmigrate.errors import ConfigError, DbMigrateError, UnknownRevision, VersionTableAmbiguous
from dbmigrate.revisions import Project
from dbmigrate.target import DatabaseTarget

OK, WARN, FAIL = "ok", "warn", "fail"
REHEARSAL = "the rehearsal"  # what makes a scratch database during a run (see check_scratch_server)


@dataclass
class Check:
    name: str
    status: str = OK
    detail: str = ""
    duration_s: float = 0.0
    data: dict = field(default_factory=dict)
    # A failure no run may go past: what a changing command raises instead of "health checks failed".
    refusal: DbMigrateError | None = field(default=None, compare=False)

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "status": self.status,
            "detail": self.detail,
            "duration_s": round(self.duration_s, 3),
            **({"data": self.data} if self.data else {}),
        }


def passed(checks: list[Check]) -> bool:
    return all(c.status != FAIL for c in checks)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def check_disk(backup_dir: Path | None, database_size: int | None) -> Check:
    check = Check("disk_space")
    if backup_dir is None:
        check.detail = "backups go to S3: no local disk space needed"
        return check
    existing = backup_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    usage = shutil.disk_usage(existing)
    writable = True
    try:
        backup_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=backup_dir):
            pass
    except OSError:
        writable = False
    used_pct = round(100 * usage.used / usage.total, 1) if usage.total else 0.0
    check.data = {
        "path": str(backup_dir),
        "free_bytes": usage.free,
        "used_percent": used_pct,
        "writable": writable,
        "database_size_bytes": database_size,
    }
    check.detail = f"{human_bytes(usage.free)} free ({used_pct}% used) at {backup_dir}"
    if not writable:
        check.status, check.detail = FAIL, f"backup directory {backup_dir} is not writable; {check.detail}"
    elif database_size is not None and usage.free < database_size:
        check.status = WARN
        check.detail += f"; less than the database size ({human_bytes(database_size)})"
    return check


def check_version_table(project: Project, has_table: bool, current: tuple[str, ...]) -> Check:
    check = Check("alembic_version", data={"current": list(current), "heads": project.heads})
    heads = project.heads
    if not has_table:
        check.detail = "no alembic_version table: first-time migration"
    elif problem := project.several_rows_problem(current):
        check.status, check.detail, check.refusal = FAIL, problem, VersionTableAmbiguous(problem)
    elif unknown := _unknown_revision(project, current):
        check.status, check.detail, check.refusal = FAIL, str(unknown), unknown
    elif not current:
        check.detail = "alembic_version table is empty: database is at base"
    else:
        check.detail = f"database at {', '.join(current)}"
    if len(heads) > 1 and check.status == OK:
        check.status = WARN
        check.detail += f"; the scripts have {len(heads)} heads ({', '.join(heads)}): 'head' is ambiguous"
    return check


def _unknown_revision(project: Project, current: tuple[str, ...]) -> UnknownRevision | None:
    try:
        project.require_known(current)
    except UnknownRevision as exc:
        return exc
    return None


def check_pending(project: Project, current: tuple[str, ...], target: str, upgrade: bool = True) -> Check:
    """What a run to ``target`` has to do: the revisions to apply (upgrade) or to revert (downgrade)."""
    check = Check("pending_revisions")
    try:
        resolved = project.resolve(target)
        steps = project.plan_upgrade(current, resolved) if upgrade else project.plan_downgrade(current, resolved)
    except DbMigrateError as exc:
        check.status, check.detail = WARN, str(exc)
        return check
    check.data = {"target": target, ("pending" if upgrade else "to_revert"): [s.as_dict() for s in steps]}
    what = "pending" if upgrade else "to revert"
    check.detail = (f"{len(steps)} {what} to {target}: " + ", ".join(s.revision for s in steps) if steps
                    else f"at {target}")
    return check


def check_invalid_indexes(invalid: list[str]) -> Check:
    """Invalid indexes found before a run: a WARN, since no run of ours left them (validation fails
    a run that does)."""
    check = Check("invalid_indexes", data={"invalid_indexes": invalid})
    if invalid:
        check.status = WARN
        check.detail = (f"{len(invalid)} invalid index(es): {', '.join(invalid)}: left by a failed CREATE INDEX "
                        "CONCURRENTLY, never used by queries yet updated by every write; drop and build again")
    else:
        check.detail = "no invalid index"
    return check


def check_abandoned_scratch(found: dict[str, list[str]], unread: str | None = None) -> Check:
    """dbmigrate's own scratch databases a killed run left, per server ("host:port": the database's,
    and the scratch server's): disk the next copy may need. Only those
    (:func:`db.abandoned_scratch_databases`): a database it did not make is never named.
    ``unread``: why the scratch server could not be read."""
    names = [name for on_server in found.values() for name in on_server]
    where = "; ".join(f"{', '.join(on_server)} on {server}" for server, on_server in found.items() if on_server)
    data = {"abandoned": names, "servers": found}
    if names:
        check = Check("scratch_databases", WARN, f"{len(names)} scratch database(s) dbmigrate made, left by a run "
                      f"killed outright, unused: {where}: drop them (DROP DATABASE name)", data=data)
    else:
        check = Check("scratch_databases", detail=f"no abandoned scratch database on {', '.join(found)}", data=data)
    if unread:
        check.status, check.detail = WARN, f"{check.detail}; {unread}"
    return check


def check_abandoned_scratch_on_both(target: DatabaseTarget, abandoned: list[str],
                                    scratch_server: DatabaseTarget | None, timeout: float) -> Check:
    """:func:`check_abandoned_scratch` over ``abandoned`` (beside the database) and what the scratch
    server holds: a killed run leaves its scratch database where it made it."""
    found, unread = {f"{target.host}:{target.port}": abandoned}, None
    if scratch_server is not None and (scratch_server.host, scratch_server.port) != (target.host, target.port):
        where = f"{scratch_server.host}:{scratch_server.port}"
        try:
            with db.connect(scratch_server, timeout) as conn:
                found[where] = db.abandoned_scratch_databases(conn)
        except DbMigrateError as exc:
            unread = f"the scratch server {where} could not be read: {exc}"
    return check_abandoned_scratch(found, unread)


def check_scratch_server(purpose: str, server: DatabaseTarget, database_major: int, timeout: float) -> Check:
    """Can ``purpose`` (the rehearsal) make its scratch database on ``server``: may the role CREATE
    DATABASE there, and does it run the database's major version (pg_restore, and what the
    revisions do, are the major version's)? Checked before the run takes its backup."""
    where = f"{server.host}:{server.port}"
    try:
        with db.connect(server, timeout) as conn:
            role, allowed = db.can_create_databases(conn)
            major, _ = db.server_version(conn)
    except DbMigrateError as exc:
        return Check("scratch_server", FAIL, f"{purpose} makes its scratch database on {where}: {exc}", refusal=exc)
    data = {"server": where, "role": role, "createdb": allowed, "server_version": major}
    if not allowed:
        problem = (f"{purpose} makes a scratch database on {where}, where role '{role}' may not CREATE DATABASE: "
                   f"{db.scratch_privilege_advice(role)}"
                   + (", or turn the policy's rehearsal off (rehearse=false)" if purpose == REHEARSAL else ""))
    elif major != database_major:
        problem = (f"{purpose} makes its scratch database on {where}, which runs PostgreSQL {major}, not "
                   f"{database_major} as the database does: give it a server of the same major version")
    else:
        return Check("scratch_server", detail=f"{purpose}: role '{role}' may CREATE DATABASE on {where} "
                                              f"(PostgreSQL {major})", data=data)
    return Check("scratch_server", FAIL, problem, data=data, refusal=ConfigError(problem))


def require_scratch_server(purpose: str, target: DatabaseTarget, server: DatabaseTarget | None,
                           timeout: float) -> None:
    """:func:`check_scratch_server` as a refusal, for a command that makes a scratch database
    without running the other checks (``rehearse``, ``drift``): before anything costly."""
    with db.connect(target, timeout) as conn:
        major, _ = db.server_version(conn)
    if refusal := check_scratch_server(purpose, server or target, major, timeout).refusal:
        raise refusal


def run(
    target: DatabaseTarget,
    project: Project,
    backup_dir: Path | None,
    timeout: float,
    target_revision: str = "head",
    upgrade: bool = True,
    scratch_for: str | None = None,
    scratch_server: DatabaseTarget | None = None,
) -> list[Check]:
    """The checks; with ``scratch_for`` (what will make a scratch database: "the rehearsal"), also
    whether it can, on ``scratch_server`` or else beside the database. Abandoned scratch databases
    are looked for beside the database and on ``scratch_server``."""
    checks: list[Check] = []

    def timed(check_fn, *args) -> Check:
        start = time.monotonic()
        check = check_fn(*args)
        check.duration_s = time.monotonic() - start
        checks.append(check)
        return check

    start = time.monotonic()
    try:
        with db.connect(target, timeout) as conn:
            major, version = db.server_version(conn)
            connection = Check("connection", detail=f"PostgreSQL {version} at {target.where}",
                               data={"server_version": version})
            connection.duration_s = time.monotonic() - start
            checks.append(connection)
            size = db.database_size(conn)
            has_table = revisions.has_version_table(conn)
            current = revisions.current_revisions(conn)
            invalid = schema.invalid_indexes(conn)
            abandoned = db.abandoned_scratch_databases(conn)
    except DbMigrateError as exc:
        if checks:  # connected, then reading the version table failed (a lock held on it, the server gone)
            checks.append(Check("alembic_version", FAIL, str(exc), time.monotonic() - start, refusal=exc))
        else:
            checks.append(Check("connection", FAIL, str(exc), time.monotonic() - start, refusal=exc))
        timed(check_disk, backup_dir, None)
        return checks
    timed(check_disk, backup_dir, size)
    version_check = timed(check_version_table, project, has_table, current)
    if version_check.status != FAIL:
        timed(check_pending, project, current, target_revision, upgrade)
    timed(check_invalid_indexes, invalid)
    timed(check_abandoned_scratch_on_both, target, abandoned, scratch_server, timeout)
    if scratch_for:
        timed(check_scratch_server, scratch_for, scratch_server or target, major, timeout)
    return checks
