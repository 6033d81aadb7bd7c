"""The ``dbmigrate`` command line.

Exit codes: 0 success; 1 the operation ran and failed (a failed health check, a
failed migration, ``check`` with pending revisions); 2 bad input or an
unreachable database, with nothing changed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from dbmigrate import __version__, db, health, local, pipeline, revisions
from dbmigrate.errors import ConfirmationRefused, DbMigrateError
from dbmigrate.migrate import SessionLimits
from dbmigrate.report import DRY_RUN, NOOP, SUCCEEDED
from dbmigrate.target import DatabaseTarget, resolve

EPILOG = """\
Which database: --url or DATABASE_URL; else --env NAME (a Prefect DatabaseCredentials
block); else the embedded local PostgreSQL under .dbmigrate/ (started on first use).
Exit codes: 0 ok, 1 the operation failed, 2 bad input or unreachable database."""


def _seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {value!r}") from None
    if seconds < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {value}")
    return seconds


def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    where = common.add_argument_group("database and project")
    where.add_argument(
        "--url", help="database URL, postgresql://user:pass@host:port/db (prefer DATABASE_URL: argv is visible in ps)"
    )
    where.add_argument("--env", metavar="NAME", help="environment: the DatabaseCredentials block named NAME")
    where.add_argument(
        "--alembic-config", metavar="PATH", help="alembic.ini of the project (default: ALEMBIC_CONFIG or ./alembic.ini)"
    )
    where.add_argument(
        "--home",
        type=Path,
        default=Path(os.environ.get("DBMIGRATE_HOME", ".dbmigrate")),
        help="state directory: embedded database, backups, reports (default: DBMIGRATE_HOME or .dbmigrate)",
    )
    where.add_argument(
        "--timeout",
        type=_seconds,
        default=db.DEFAULT_CONNECT_TIMEOUT,
        metavar="S",
        help=f"seconds to wait for a database connection (default {db.DEFAULT_CONNECT_TIMEOUT:g}, minimum 2)",
    )
    common.add_argument("--json", action="store_true", help="print machine-readable JSON on stdout")
    return common


def _migration_options(parser: argparse.ArgumentParser, revision_required: bool) -> None:
    parser.add_argument(
        "--revision",
        "-r",
        required=revision_required,
        default=None if revision_required else "head",
        help="target revision" + ("" if revision_required else " (default: head)"),
    )
    parser.add_argument("--dry-run", action="store_true", help="print the SQL of the pending range; change nothing")
    parser.add_argument("--backup", action="store_true", help="pg_dump the database before migrating")
    parser.add_argument("--skip-health-checks", action="store_true", help="skip the pre-flight checks")
    parser.add_argument("--skip-validation", action="store_true", help="skip the post-migration validation")
    parser.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
    parser.add_argument("--json-report", type=Path, metavar="PATH", help="also write the JSON report here")
    limits = parser.add_argument_group("limits")
    limits.add_argument(
        "--lock-wait", type=_seconds, default=0.0, metavar="S",
        help="seconds to wait if another migration of this database is running (default 0: fail at once)",
    )
    limits.add_argument(
        "--lock-timeout", type=_seconds, default=SessionLimits.lock_timeout_s, metavar="S",
        help=f"PostgreSQL lock_timeout for migration statements (default {SessionLimits.lock_timeout_s:g}, 0 = none)",
    )
    limits.add_argument(
        "--statement-timeout", type=_seconds, default=SessionLimits.statement_timeout_s, metavar="S",
        help="PostgreSQL statement_timeout for migration statements (default 0 = none)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dbmigrate",
        description="Safe PostgreSQL migrations with Alembic: health checks, backup, migrate, validate, report.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"dbmigrate {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = _common()

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[common], help=help_text, description=help_text, epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)

    add("health", "pre-flight checks: connection, disk space, alembic version table, pending revisions")
    add("status", "current revision(s), head(s) and pending revisions")
    add("heads", "head revision(s) of the migration scripts")
    add("check", "exit 0 at head, 1 when revisions are pending, 2 on error")
    _migration_options(add("upgrade", "health checks, backup, upgrade, validation and report"), False)
    _migration_options(add("downgrade", "like upgrade, towards an older revision"), True)
    generate = add("generate", "create a new revision file")
    generate.add_argument("-m", "--message", required=True, help="what the revision does")
    generate.add_argument("--autogenerate", action="store_true", help="compare models with the database")
    generate.add_argument("--rev-id", help="revision id to use instead of a random one")

    local_cmd = sub.add_parser("local", help="manage the embedded local PostgreSQL")
    local_sub = local_cmd.add_subparsers(dest="local_command", required=True, metavar="ACTION")
    for name, text in (("start", "start it (commands start it on first use anyway)"),
                       ("status", "is it running, where, and its URL (no password: trust over a socket)"),
                       ("stop", "stop it")):
        action = local_sub.add_parser(name, help=text, description=text)
        action.add_argument("--home", type=Path, default=Path(os.environ.get("DBMIGRATE_HOME", ".dbmigrate")))
    return parser


def _print_json(data) -> None:
    print(json.dumps(data, indent=2, default=str))


def _settings(args) -> pipeline.Settings:
    limits = SessionLimits(
        getattr(args, "lock_timeout", SessionLimits.lock_timeout_s),
        getattr(args, "statement_timeout", SessionLimits.statement_timeout_s),
    )
    return pipeline.Settings(
        home=args.home,
        alembic_config=args.alembic_config,
        connect_timeout=args.timeout,
        guard_wait_s=getattr(args, "lock_wait", 0.0),
        limits=limits,
    )


def cmd_health(args, target: DatabaseTarget, settings: pipeline.Settings) -> int:
    project = settings.project(target)
    checks = health.run(target, project, settings.backup_dir, settings.connect_timeout)
    overall = "fail" if not health.passed(checks) else ("warn" if any(c.status == "warn" for c in checks) else "ok")
    if args.json:
        _print_json({"status": overall, "environment": target.environment, "database": target.describe(),
                     "checks": [c.as_dict() for c in checks]})
    else:
        for c in checks:
            print(f"{c.status.upper():4}  {c.name:18} {c.detail}  ({c.duration_s * 1000:.0f} ms)")
        print(f"health: {overall}")
    return 0 if overall != "fail" else 1


def _state(target: DatabaseTarget, settings: pipeline.Settings) -> dict:
    project = settings.project(target)
    with db.connect(target, settings.connect_timeout) as conn:
        current = revisions.current_revisions(conn)
    if unknown := project.check_known(current):
        raise DbMigrateError(f"the database is at revision {', '.join(unknown)}, which the migration scripts do not know")
    heads = project.heads
    pending = project.plan_upgrade(current, "heads")
    return {
        "environment": target.environment,
        "database": target.describe(),
        "current": list(current),
        "heads": heads,
        "pending": [p.as_dict() for p in pending],
        "at_head": not pending,
    }


def cmd_status(args, target, settings) -> int:
    state = _state(target, settings)
    if args.json:
        _print_json(state)
        return 0
    print(f"database: {target.where} ({target.environment})")
    print(f"current:  {', '.join(state['current']) or 'base (no revision applied)'}")
    print(f"head:     {', '.join(state['heads'])}")
    print(f"pending:  {len(state['pending'])}")
    for p in state["pending"]:
        print(f"  {p['revision']}  {p['message']}")
    return 0


def cmd_check(args, target, settings) -> int:
    state = _state(target, settings)
    if args.json:
        _print_json(state)
    elif state["at_head"]:
        print(f"up to date: database at {', '.join(state['current']) or 'base'}")
    else:
        print(f"{len(state['pending'])} revision(s) pending: {', '.join(p['revision'] for p in state['pending'])}")
    return 0 if state["at_head"] else 1


def cmd_heads(args, settings) -> int:
    project = settings.project()
    heads = [{"revision": h, "message": project.script.get_revision(h).doc} for h in project.heads]
    if args.json:
        _print_json(heads)
    else:
        for h in heads:
            print(f"{h['revision']} (head)  {h['message']}")
    return 0


def _confirm_on_terminal(operation: str, target: DatabaseTarget):
    def confirm(plan: pipeline.Plan) -> bool:
        if not sys.stdin.isatty():
            raise ConfirmationRefused(f"refusing to {operation} without confirmation: no terminal to ask on (pass --yes)")
        print(f"{operation} {target.where} ({target.environment}) from {plan.revision_before or 'base'}:")
        for step in plan.steps:
            print(f"  {step.revision}  {step.message}")
        answer = input(f"apply {len(plan.steps)} revision(s)? [y/N] ")
        return answer.strip().lower() in ("y", "yes")

    return confirm


def cmd_migrate(args, target, settings) -> int:
    request = pipeline.Request(
        operation=args.command,
        revision=args.revision,
        dry_run=args.dry_run,
        backup=args.backup,
        skip_health_checks=args.skip_health_checks,
        skip_validation=args.skip_validation,
        json_report=args.json_report,
    )
    confirm = (lambda plan: True) if args.yes else _confirm_on_terminal(args.command, target)
    outcome = pipeline.execute(target, settings, request, confirm)
    report = outcome.report
    if args.json:
        _print_json({**report.as_dict(), "report_path": str(outcome.report_path), "sql": outcome.sql})
    else:
        _print_outcome(outcome)
    if outcome.error is not None:
        print(f"dbmigrate: error: {target.redact(str(outcome.error))}", file=sys.stderr)
        return outcome.error.exit_code
    return 0


def _print_outcome(outcome: pipeline.Outcome) -> None:
    report = outcome.report
    before = report.revision_before or "base"
    if outcome.sql is not None:
        print(outcome.sql, end="")
    if report.backup:
        b = report.backup
        print(f"backup:   {b['location']} ({b['size_bytes']} bytes, sha256 {b['sha256'][:12]}, {b['duration_s']}s)")
    verb = "applied: " if report.operation == "upgrade" else "reverted:"
    for step in report.migrations_applied:
        print(f"{verb} {step['revision']}  {step['message']}  ({step['duration_s']}s)")
    if report.status == NOOP:
        summary = f"had nothing to do: database already at {before}"
    elif report.status == DRY_RUN:
        summary = f"dry run: {len(report.migrations_planned)} revision(s) from {before}; nothing was changed"
    elif report.status == SUCCEEDED:
        summary = f"succeeded: {before} -> {report.revision_after or 'base'}"
    elif report.error["phase"] in ("migrate", "validate"):
        summary = f"failed in {report.error['phase']}: database at {report.revision_after or 'base'}"
    else:
        summary = f"failed in {report.error['phase']}: nothing was changed"
    print(f"{report.operation} {summary} ({report.as_dict()['duration_s']}s)")
    print(f"report:   {outcome.report_path}")


def cmd_generate(args, settings) -> int:
    from alembic import command

    target = resolve(args.url, args.env, args.home) if args.autogenerate else None
    project = settings.project(target)
    # Alembic prints "Generating <path> ... done" itself.
    command.revision(project.config, message=args.message, autogenerate=args.autogenerate, rev_id=args.rev_id)
    return 0


def cmd_local(args) -> int:
    if args.local_command == "start":
        server = local.start(args.home)
        print(f"running: pid {server.pid}, data in {server.data_dir}, url {server.url()}")
    elif args.local_command == "stop":
        print("stopped" if local.stop(args.home) else "not running")
    else:
        server = local.running(args.home)
        if server is None:
            print(f"not running (data directory {local.data_dir(args.home)})")
            return 1
        print(f"running: pid {server.pid}, data in {server.data_dir}, url {server.url()}")
    return 0


def run(args) -> int:
    if args.command == "local":
        return cmd_local(args)
    settings = _settings(args)
    if args.command == "heads":
        return cmd_heads(args, settings)
    if args.command == "generate":
        return cmd_generate(args, settings)
    target = resolve(args.url, args.env, args.home)
    handler = {"health": cmd_health, "status": cmd_status, "check": cmd_check,
               "upgrade": cmd_migrate, "downgrade": cmd_migrate}[args.command]
    try:
        return handler(args, target, settings)
    except DbMigrateError as exc:
        exc.message = target.redact(exc.message)
        raise


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except DbMigrateError as exc:
        print(f"dbmigrate: error: {exc}", file=sys.stderr)
        return 2 if args.command == "check" else exc.exit_code
    except KeyboardInterrupt:
        print("dbmigrate: interrupted", file=sys.stderr)
        return 130
