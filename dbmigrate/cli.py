"""The ``dbmigrate`` command line.

Exit codes: 0 success; 1 the operation ran and failed (a failed health check, a
failed migration, ``check`` with pending revisions, ``drift`` with differences, ``lint`` with findings at or above the
blocking level); 2 bad input or an
unreachable database, with nothing changed; 3 the upgrade or downgrade succeeded
but its report could not be written (the report is then printed on stderr).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import getpass
import json
import logging
import math
import os
import select
import signal
import sys
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from dbmigrate import (__version__, backup, catalogue, db, drift, fleet_cli, health, local, overview, phases, pipeline,
                       private, restore, revisions)
from dbmigrate.errors import ConfigError, ConfirmationRefused, DbMigrateError, RevisionError, needs_prefect
from dbmigrate.lockretry import LockRetries
from dbmigrate.migrate import SessionLimits
from dbmigrate.lint import LintResult
from dbmigrate.policy import LINT_LEVELS, Policy
from dbmigrate.rehearsal import rehearse
from dbmigrate.report import DRY_RUN, NOOP, SUCCEEDED, Approval, Rehearsal, Report
from dbmigrate.settings import Settings
from dbmigrate.target import DatabaseTarget, parse_url

EPILOG = """\
Which database: --url or DATABASE_URL; else --env NAME (a Prefect DatabaseCredentials
block); else the embedded local PostgreSQL under .dbmigrate/ (started on first use).
Exit codes: 0 ok, 1 the operation failed, 2 bad input or unreachable database,
3 succeeded but the report could not be written."""

SYNC_VARIABLES = """\
variables: DB_HOST, DB_NAME, DB_USER, DB_PASSWORD (required), DB_PORT (default 5432),
DB_SSLMODE (default prefer); BACKUP_BUCKET, BACKUP_BUCKET_FOLDER, AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_REGION, AWS_ENDPOINT_URL (S3-compatible stores);
ALERT_WEBHOOK_URL (JSON subject/body), ALERT_SLACK_WEBHOOK_URL (a Slack incoming webhook): alerts;
FLEET_MEMBERS (credentials blocks), FLEET_DATABASES (on DB_HOST) or FLEET_QUERY (SQL selecting them),
FLEET_CANARY, FLEET_SKIP_UNREACHABLE: the DatabaseFleet block NAME-fleet. Needs PREFECT_API_URL."""

MAX_SECONDS = 2_147_483  # PostgreSQL keeps its timeouts as int milliseconds: about 24.8 days
MAX_DAYS = 36_500
MAX_JOBS = 128


class _Parser(argparse.ArgumentParser):
    """Bad input is one line on stderr and exit 2, like every other error."""

    def error(self, message: str):
        self.exit(2, f"dbmigrate: error: {message} (see '{self.prog} --help')\n")


def _number(unit: str, maximum: float, minimum: float = 0.0):
    """An argparse type: a finite number from minimum to maximum (nan and inf are refused)."""

    def parse(value: str) -> float:
        try:
            number = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number of {unit}: {value!r}") from None
        if not (math.isfinite(number) and minimum <= number <= maximum):
            raise argparse.ArgumentTypeError(
                f"must be a number of {unit} from {minimum:.10g} to {maximum:.10g}: {value!r}")
        return number

    return parse


_seconds = _number("seconds", MAX_SECONDS)
_lock_timeout = _number("seconds", MAX_SECONDS, minimum=0.001)  # 0 would be "wait forever"


def _lock_timeouts(value: str) -> tuple[float, ...]:
    """--lock-retries: the lock_timeout of each attempt, comma-separated."""
    return tuple(_lock_timeout(part.strip()) for part in value.split(","))
_connect_seconds = _number("seconds", MAX_SECONDS, minimum=1)  # libpq takes 0 as "wait forever"
_days = _number("days", MAX_DAYS)


def _positive_int(value: str) -> int:
    if not (value.isascii() and value.isdigit() and int(value) >= 1):
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1: {value!r}")
    return int(value)


def _port(value: str) -> int:
    port = _positive_int(value)
    if port > 65535:
        raise argparse.ArgumentTypeError(f"not a TCP port: {value!r}")
    return port


def _jobs(value: str) -> int:
    jobs = _positive_int(value)
    if jobs > MAX_JOBS:
        raise argparse.ArgumentTypeError(f"at most {MAX_JOBS} parallel jobs: {value!r}")
    return jobs


def _revision(value: str) -> str:
    try:
        return revisions.check_syntax(value)
    except RevisionError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _approver(value: str) -> str:
    name = value.strip()
    if not name or not name.isprintable() or len(name) > 100:
        raise argparse.ArgumentTypeError(f"not a name: {value!r}")
    return name


def _report_path(value: str) -> Path:
    """--json-report: refused before anything changes if it can never be written."""
    path = Path(value)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{value!r} is a directory: name a file")
    parent = next(p for p in path.absolute().parents if p.exists())
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"cannot create {value!r}: {parent} is not a writable directory")
    return path


def _common() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
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
        help="state directory: embedded database, backups, reports (default: DBMIGRATE_HOME or .dbmigrate)",
    )
    where.add_argument(
        "--timeout",
        type=_connect_seconds,
        default=db.DEFAULT_CONNECT_TIMEOUT,
        metavar="S",
        help=f"seconds to wait for a database connection (libpq waits at least 2), and for a lock the "
        f"tool's own queries need (PostgreSQL lock_timeout; default {db.DEFAULT_CONNECT_TIMEOUT:g}; "
        "migration statements: --lock-timeout)",
    )
    where.add_argument(
        "--storage",
        metavar="SPEC",
        help="where backups go: a directory; s3://BUCKET[/FOLDER] with boto3's credentials (AWS_* variables, "
        "AWS_ENDPOINT_URL); or s3-bucket/BLOCK for a prefect-aws S3Bucket block "
        "(default: DBMIGRATE_BACKUP_STORAGE or <home>/backups)",
    )
    common.add_argument("--json", action="store_true", help="print machine-readable JSON on stdout")
    common.add_argument("--verbose", "-v", action="store_true",
                        help="let the project's env.py set up logging as its alembic.ini says (Alembic's INFO "
                             "lines on stderr: each revision as it runs); without it only warnings are shown")
    return common


def _dump_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("backup")
    group.add_argument("--compression", default="auto", metavar="METHOD[:LEVEL]",
                       help="pg_dump compression: auto (zstd if this pg_dump has it, else gzip), zstd, gzip or none")
    group.add_argument("--verify-restore", action="store_true",
                       help="also restore the backup into a scratch database and compare row counts")
    group.add_argument("--jobs", "-j", type=_jobs, default=1, metavar="N",
                       help="N > 1: pg_dump's parallel directory format (local storage only), for large databases")


def _migration_options(parser: argparse.ArgumentParser, revision_required: bool) -> None:
    parser.add_argument(
        "--revision",
        "-r",
        type=_revision,
        required=revision_required,
        default=None if revision_required else "head",
        help="target revision" + ("" if revision_required else " (default: head)"),
    )
    parser.add_argument("--dry-run", action="store_true", help="print the SQL of the pending range; change nothing")
    parser.add_argument("--backup", action="store_true", help="back the database up before migrating")
    parser.add_argument("--skip-health-checks", action="store_true", help="skip the pre-flight checks")
    parser.add_argument("--skip-validation", action="store_true", help="skip the post-migration validation")
    _confirmation_options(parser)
    parser.add_argument("--json-report", type=_report_path, metavar="PATH", help="also write the JSON report here")
    limits = parser.add_argument_group("limits")
    limits.add_argument(
        "--guard-wait", "--lock-wait", dest="guard_wait", type=_seconds, default=0.0, metavar="S",
        help="seconds to wait for the guard (one run per database, an advisory lock) while another migration "
        "of this database runs (default 0: fail at once; --lock-wait is its old name)",
    )
    limits.add_argument(
        "--lock-timeout", type=_seconds, default=SessionLimits.lock_timeout_s, metavar="S",
        help="PostgreSQL lock_timeout for migration statements: how long each waits for a lock another session "
        f"holds (default {SessionLimits.lock_timeout_s:g}, 0 = none)",
    )
    limits.add_argument(
        "--statement-timeout", type=_seconds, default=SessionLimits.statement_timeout_s, metavar="S",
        help="PostgreSQL statement_timeout for migration statements (default 0 = none)",
    )
    limits.add_argument(
        "--lock-retries", type=_lock_timeouts, default=(), metavar="S,S,...",
        help="lock-safe execution: try the migration with these short lock_timeouts in turn (e.g. 0.1,0.5,1,2,5; "
        "the last repeats; replaces --lock-timeout), rolling back and pausing between attempts, so the "
        "application's queries never queue long behind a lock the migration waits for. Only a revision the "
        "failed attempt's rollback undid is tried again (default: off, one attempt)",
    )
    limits.add_argument(
        "--lock-retry-pause", type=_seconds, default=LockRetries.pause_s, metavar="S",
        help=f"with --lock-retries: seconds between attempts (default {LockRetries.pause_s:g})",
    )
    limits.add_argument(
        "--lock-retry-total", type=_seconds, default=LockRetries.total_s, metavar="S",
        help=f"with --lock-retries: give up after S seconds, naming the sessions that held the lock "
        f"(default {LockRetries.total_s:g})",
    )


def _confirmation_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
    parser.add_argument("--approver", type=_approver, metavar="NAME",
                        help="approve as NAME without asking (recorded in the report); needed instead of --yes "
                             "where the environment's policy requires an approval")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
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
    add("overview", "every environment (with PREFECT_API_URL: each DatabaseCredentials block; else this database), "
                    "read in parallel: current revision, head, pending, the last run and its outcome (the reports "
                    "under the home), the newest restorable backup")
    add("history", "the revisions applied (and reverted) by the runs whose reports are under the home, oldest "
                   "first: when, by whom, how long, the run's outcome and link (--env NAME: that environment only)")
    add("check", "exit 0 at head, 1 when revisions are pending, 2 on error")
    add("drift", "compare the schema with what the migrations build up to the database's revision (replayed into "
                 "a scratch database) and with the models where env.py has them; list each difference and "
                 "invalid index; exit 0 when there is none, 1 when there is drift, 2 on error")
    lint_cmd = add("lint", "lint the SQL of each pending revision with squawk (lock safety); exit 0 when no finding "
                           "is at or above the blocking level (--env: the environment's lint_level; else warning), "
                           "1 when one is, 2 on error")
    lint_cmd.add_argument("--revision", "-r", type=_revision, default="head",
                          help="lint the pending revisions up to this one (default: head)")
    migrating = {}
    for name, text, required in (("upgrade", "health checks, backup, upgrade, validation and report", False),
                                 ("downgrade", "like upgrade, towards an older revision", True)):
        parser_ = migrating[name] = add(name, text)
        _migration_options(parser_, required)
        _dump_options(parser_)
    migrating["upgrade"].add_argument("--rehearse", action="store_true",
                         help="before asking for approval, back up, restore the backup into a scratch database and "
                              "run the revisions there first (implies --backup)")
    migrating["upgrade"].add_argument("--expect-current", type=_revision, metavar="REV",
                         help="refuse, changing nothing, unless the database is at REV (base: none) from the plan "
                              "until the guard is held: the revision a separately approved plan started from")
    migrating["upgrade"].add_argument("--lint-level", choices=LINT_LEVELS,
                         help="lint findings at or above LEVEL stop the run before anything changes "
                              "(default: --env's policy; without --env they only warn)")
    rehearse = add("rehearse", "back up, restore the backup into a scratch database, run the pending revisions there "
                               "and report each one's duration, locks and rewrites; the database is not changed")
    rehearse.add_argument("--revision", "-r", type=_revision, default="head", help="target revision (default: head)")
    _dump_options(rehearse)
    _dump_options(add("backup", "pg_dump the database into the backup storage, verified, with a manifest"))
    restore = add("restore", "restore a backup into a new database (--target-db) or over the original")
    restore.add_argument("backup_id", metavar="BACKUP_ID", help="as shown by 'dbmigrate backups list'")
    restore.add_argument("--target-db", metavar="NAME", help="restore into this new database instead")
    restore.add_argument("--no-safety-backup", action="store_true",
                         help="over the original: do not back up its current state first")
    restore.add_argument("--jobs", "-j", type=_jobs, default=1, metavar="N",
                         help="into a new database: restore a directory-format backup with N parallel jobs")
    _confirmation_options(restore)
    restore.add_argument("--lock-timeout", type=_seconds, default=SessionLimits.lock_timeout_s, metavar="S",
                         help="over the original: PostgreSQL lock_timeout for the restore's statements: give up "
                         "when a lock is not granted within S seconds, rather than queue the application's "
                         f"queries behind it (default {SessionLimits.lock_timeout_s:g})")
    backups = sub.add_parser("backups", help="list or prune the backups of a database")
    backups_sub = backups.add_subparsers(dest="backups_command", required=True, metavar="ACTION")
    backups_sub.add_parser("list", parents=[common], help="valid backups, newest first",
                           description="valid backups (with a manifest), newest first")
    prune = backups_sub.add_parser("prune", parents=[common], help="delete old backups",
                                   description="delete old backups; the newest verified one is always kept")
    prune.add_argument("--keep-last", type=int, required=True, metavar="N", help="keep the newest N backups")
    prune.add_argument("--keep-days", type=_days, metavar="D", help="and keep every backup younger than D days")
    prune.add_argument("--dry-run", action="store_true", help="show what would be deleted")
    generate = add("generate", "create a new revision file")
    generate.add_argument("-m", "--message", required=True, help="what the revision does")
    generate.add_argument("--autogenerate", action="store_true", help="compare models with the database")
    generate.add_argument("--rev-id", help="revision id to use instead of a random one")

    fleet_cli.add_parser(sub, common)

    local_cmd = sub.add_parser("local", help="the embedded local PostgreSQL, and the local Prefect stack")
    local_sub = local_cmd.add_subparsers(dest="local_command", required=True, metavar="ACTION")
    for name, text in (
        ("start", "start the embedded PostgreSQL (commands start it on first use anyway)"),
        ("status", ("the embedded PostgreSQL (where, its URL: no password over the socket; the TCP password's "
                    "file) and the local stack's Prefect server and worker; exit 1 when PostgreSQL is not running")),
        ("stop", "stop the embedded PostgreSQL"),
        ("up", ("the local stack, on 127.0.0.1: the embedded PostgreSQL with the databases development, staging "
                "and production, a Prefect server, their DatabaseCredentials blocks, the work pool dbmigrate, "
                "prefect deploy --all from this checkout, and a process worker (run it from the checkout)")),
        ("down", "stop the local stack: the worker, then the Prefect server, then PostgreSQL"),
        ("env", "print the exports of PREFECT_API_URL and PREFECT_API_AUTH_STRING (read from its file) for the "
                "running stack: eval \"$(dbmigrate local env)\""),
    ):
        action = local_sub.add_parser(name, help=text, description=text)
        action.add_argument("--home", type=Path, help="state directory (default: DBMIGRATE_HOME or .dbmigrate)")
        if name in ("start", "up"):
            action.add_argument("--pg-port", type=_port, metavar="PORT",
                                help="PostgreSQL's TCP port on 127.0.0.1 (default: the one recorded in the home, "
                                     "else a free one)")
        if name == "up":
            action.add_argument("--prefect-port", type=_port, metavar="PORT",
                                help="the Prefect server's port on 127.0.0.1 (default 4200)")
            action.add_argument("--fleet", type=_positive_int, metavar="N",
                                help="also N tenant databases per environment, at the sample schema with some rows, "
                                     "and each environment's DatabaseFleet block selecting them (docs/FLEETS.md)")

    run_cmd = sub.add_parser(
        "run", help="run the db-migrate deployment of an environment on its Prefect worker, from this terminal",
        description="Start a run of the deployment db-migrate/ENV on the Prefect server PREFECT_API_URL names; "
                    "with --watch, print each state it enters with its message (a failed run's says why), the "
                    "link to approve it while it waits, and exit 0 when it completed, 1 when not. Ctrl-C "
                    "cancels the run.")
    run_cmd.add_argument("--env", required=True, metavar="ENV", help="the environment: its db-migrate/ENV deployment")
    run_cmd.add_argument("-r", "--revision", default="head", help="the revision to migrate to (default head)")
    run_cmd.add_argument("--dry-run", action="store_true", help="only show the SQL of the pending revisions")
    run_cmd.add_argument("--watch", action="store_true", help="follow the run until it ends")

    blocks_cmd = sub.add_parser("blocks", help="the Prefect blocks of an environment")
    blocks_sub = blocks_cmd.add_subparsers(dest="blocks_command", required=True, metavar="ACTION")
    sync = blocks_sub.add_parser(
        "sync", help="register the block types; create or update an environment's blocks from variables",
        description="Register the block types, then create or update the environment's DatabaseCredentials "
                    "block (named after it) and, where BACKUP_BUCKET is set, its S3Bucket NAME-backups with "
                    "AwsCredentials NAME-aws; where ALERT_WEBHOOK_URL or ALERT_SLACK_WEBHOOK_URL is set, notification "
                    "blocks and the automations that alert on failed, crashed and rolled-back runs, approvals "
                    "and drift. Only what changed is written; no value is ever printed.",
        epilog=SYNC_VARIABLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sync.add_argument("--env", required=True, metavar="NAME", help="the environment (development, staging, ...)")
    sync.add_argument("--from-env", action="store_true", required=True,
                      help="read the values from the environment variables below")
    return parser


def resolve(url: str | None, env: str | None, home: Path) -> DatabaseTarget:
    """Which database a command works on, the same order for every command: ``--url`` or
    DATABASE_URL; ``--env NAME`` (the DatabaseCredentials block NAME); else the embedded
    local database under ``home``. Explicit sources must not conflict: a stray DATABASE_URL
    silently overriding ``--env production`` would be dangerous."""
    if url and env:
        raise ConfigError("give either --url or --env, not both")
    env_url = os.environ.get("DATABASE_URL")
    if env and env_url and not url:
        raise ConfigError(f"--env {env} was given but DATABASE_URL is also set: unset one of them")
    if url or env_url:
        return parse_url(url or env_url, os.environ.get("DBMIGRATE_ENVIRONMENT", "url"))
    if env:
        with needs_prefect("--env"):
            from blocks import load_target, require_api  # imports Prefect: only on this path

        require_api()
        return load_target(env)
    return local.target(home, on_start=lambda server: print(
        f"dbmigrate: started the embedded PostgreSQL in {server.data_dir} (it was not running; "
        "dbmigrate local stop stops it)", file=sys.stderr, flush=True))


class Database:
    """The database a command works on, resolved (the embedded one started) when the command first
    asks for it: ``heads``, ``generate`` without --autogenerate and ``local`` never do."""

    def __init__(self, args, settings: Settings):
        self._args, self._home = args, settings.home
        self.target: DatabaseTarget | None = None

    def __call__(self) -> DatabaseTarget:
        if self.target is None:
            self.target = resolve(self._args.url, self._args.env, self._home)
        return self.target

    def redact(self, text: str) -> str:
        return self.target.redact(text) if self.target is not None else text


_json_stdout = None  # under --json, while the command runs: the real stdout (fd 1 points at stderr meanwhile)


def _print_json(data) -> None:
    print(json.dumps(data, indent=2, default=str), file=_json_stdout or sys.stdout, flush=True)


@contextlib.contextmanager
def _json_alone_on_stdout(as_json: bool) -> Iterator[None]:
    """Under --json, stdout carries the JSON alone: while the command runs, file descriptor 1
    points at stderr, so what a project's env.py or revisions print or log (Python's print, C
    code, a subprocess; the lint's offline rendering too) lands on stderr, and the JSON goes to
    the real stdout, kept aside."""
    global _json_stdout
    if not as_json:
        yield
        return
    sys.stdout.flush()
    _json_stdout = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(_json_stdout.fileno(), 1)
        _json_stdout.close()
        _json_stdout = None


def _settings(args) -> Settings:
    """The settings of this command: its options, and the environment's defaults where they are not given
    (or where the command has no such option)."""
    limits = SessionLimits(
        getattr(args, "lock_timeout", SessionLimits.lock_timeout_s),
        getattr(args, "statement_timeout", SessionLimits.statement_timeout_s),
    )
    dump = backup.DumpOptions(
        compression=getattr(args, "compression", "auto"),
        verify_restore=getattr(args, "verify_restore", False),
        jobs=getattr(args, "jobs", 1) if args.command != "restore" else 1,
    )
    return Settings.from_env(
        home=getattr(args, "home", None),
        alembic_config=getattr(args, "alembic_config", None),
        connect_timeout=getattr(args, "timeout", None),
        guard_wait_s=getattr(args, "guard_wait", None),
        limits=limits,
        storage_spec=getattr(args, "storage", None),
        dump=dump,
        # env.py's fileConfig is what prints Alembic's INFO lines; `generate` prints as `alembic revision` does
        project_logging=getattr(args, "verbose", False) or args.command == "generate",
        lock_retries=LockRetries(getattr(args, "lock_retries", ()), getattr(args, "lock_retry_pause", 1.0),
                                 getattr(args, "lock_retry_total", 60.0)),
    )


def cmd_health(args, settings: Settings, database: Database) -> int:
    target = database()
    project = settings.project(target)
    checks = health.run(target, project, settings.backup_dir, settings.connect_timeout,
                        scratch_server=settings.scratch_server)
    overall = "fail" if not health.passed(checks) else ("warn" if any(c.status == "warn" for c in checks) else "ok")
    if args.json:
        _print_json({"status": overall, "environment": target.environment, "database": target.describe(),
                     "checks": [c.as_dict() for c in checks]})
    else:
        for c in checks:
            print(f"{c.status.upper():4}  {c.name:18} {c.detail}  ({c.duration_s * 1000:.0f} ms)")
        print(f"health: {overall}")
    return 0 if overall != "fail" else 1


def _state(target: DatabaseTarget, settings: Settings) -> dict:
    project = settings.project(target)
    with db.connect(target, settings.connect_timeout) as conn:
        current = revisions.current_revisions(conn)
    project.require_one_row(current)  # else Alembic's planning says "overlaps", not what the table holds
    project.require_known(current)
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


def cmd_status(args, settings: Settings, database: Database) -> int:
    target = database()
    state = _state(target, settings)
    if args.json:
        _print_json(state)
        return 0
    print(f"database: {target.where} ({target.environment})")
    print(f"current:  {revisions.shown(state['current']) if state['current'] else 'base (no revision applied)'}")
    print(f"head:     {', '.join(state['heads'])}")
    print(f"pending:  {len(state['pending'])}")
    for p in state["pending"]:
        print(f"  {p['revision']}  {p['message']}")
    return 0


def cmd_check(args, settings: Settings, database: Database) -> int:
    state = _state(database(), settings)
    if args.json:
        _print_json(state)
    elif state["at_head"]:
        print(f"up to date: database at {revisions.shown(state['current'])}")
    else:
        print(f"{len(state['pending'])} revision(s) pending: {', '.join(p['revision'] for p in state['pending'])}")
    return 0 if state["at_head"] else 1


def cmd_drift(args, settings: Settings, database: Database) -> int:
    target = database()
    found = drift.find(target, settings)
    if args.json:
        _print_json({"environment": target.environment, "database": target.describe(), **found.as_dict(),
                     "duration_s": round(found.duration_s, 3)})
    else:
        for line in found.findings:
            print(line)
        verdict = (f"drift: {len(found.findings)} difference(s) from the migrations at {found.revision}"
                   if found.findings else f"no drift: the schema matches the migrations at {found.revision}")
        print(f"{verdict} ({found.models}; {found.duration_s:.1f} s)")
    return 1 if found.findings else 0


def cmd_lint(args, settings: Settings, database: Database) -> int:
    target = database()
    rules = _policy(args, target)
    project = settings.project(target)
    plan = phases.plan(target, project, settings, args.revision, True)
    result = phases.lint(target, project, settings, plan, rules.lint_level if rules else LINT_LEVELS[0])
    blocking = result.blocking()
    if args.json:
        _print_json({"environment": target.environment, "database": target.describe(),
                     "revision_before": plan.revision_before, "target_revision": plan.target,
                     "blocking": len(blocking), **dataclasses.asdict(result)})
    else:
        for line in lint_lines(result):
            print(line)
        print(f"lint: {len(blocking)} finding(s) at or above {result.blocking_level} in "
              f"{len(result.revisions)} pending revision(s)")
    return 1 if blocking else 0


def lint_lines(result: LintResult) -> list[str]:
    """The lint as text: per revision, its findings, its exceptions, or why it was not linted."""
    lines = []
    for rev in result.revisions:
        lines += [f"{rev.revision}  {f.shown()}" for f in rev.findings]
        lines += [f"{rev.revision}  excepted {e.rule} ({e.findings} finding(s)): {e.reason}" for e in rev.excepted]
        if rev.not_linted and not rev.findings:  # else its finding (unrenderable) says so
            lines.append(f"{rev.revision}  not linted: {rev.not_linted}")
    return lines


def cmd_heads(args, settings: Settings, database: Database) -> int:
    project = settings.project()
    heads = [{"revision": h, "message": project.script.get_revision(h).doc} for h in project.heads]
    if args.json:
        _print_json(heads)
    else:
        for h in heads:
            print(f"{h['revision']} (head)  {h['message']}")
    return 0


def _policy(args, target: DatabaseTarget) -> Policy | None:
    """With --env the environment's policy applies on the command line too."""
    if not args.env:
        return None
    with needs_prefect("--env"):
        from blocks import load_policy  # imports Prefect: only on the --env path

    try:
        return load_policy(target.environment)
    except Exception as exc:  # the API went away since the credentials loaded: say so, in one line
        raise ConfigError(f"cannot load the policy of '{target.environment}' from the Prefect API: "
                          f"{type(exc).__name__}: {exc}") from None


def _check_policy(rules: Policy | None, environment: str, operation: str, backed_up: bool, how_to_back_up: str) -> None:
    """Refuse, before anything is read or changed, what the policy forbids."""
    if rules is None:
        return
    if not rules.cli_changes_allowed:
        raise ConfigError(f"{environment} changes run through the db-migrate deployment: the policy of {environment} "
                          f"does not allow {operation} from the command line (cli_changes_allowed is off)")
    if rules.backup_required and not backed_up:
        raise ConfigError(f"the policy of {environment} requires a backup first: {how_to_back_up}")


def _approve(args, rules: Policy | None, environment: str, operation: str, plan_text: str, question: str
             ) -> Approval:
    """Who approved this change: --approver NAME; --yes where the policy asks no approval;
    otherwise the operator on the terminal, by name where the policy requires an approval."""
    by_name = rules is not None and rules.approval_required
    if args.approver:
        return _not_the_requester(rules, Approval(True, args.approver, "--approver"))
    if args.yes and not by_name:
        return Approval(True, getpass.getuser(), "--yes")
    _require_approver(args, rules, environment, operation)
    print(plan_text)
    if input(f"{question} [y/N] ").strip().lower() not in ("y", "yes"):
        return Approval(False, getpass.getuser(), "terminal")
    if not by_name:
        return Approval(True, getpass.getuser(), "terminal")
    name = input("approver's name: ").strip()
    if not name:
        raise ConfirmationRefused(f"the policy of {environment} requires the approver's name: nothing was changed")
    return _not_the_requester(rules, Approval(True, name, "terminal"))


def _not_the_requester(rules: Policy | None, approval: Approval) -> Approval:
    """On the command line the requester is the user running it (the report's operator)."""
    if rules is not None and (why := rules.refuses_approver(getpass.getuser(), approval.approver)):
        raise ConfirmationRefused(f"{why}: nothing was changed")
    return approval


def _require_approver(args, rules: Policy | None, environment: str, operation: str) -> None:
    """Refuse a change nobody could approve: no --approver, no --yes where it is enough, no terminal."""
    by_name = rules is not None and rules.approval_required
    if args.approver or (args.yes and not by_name) or sys.stdin.isatty():
        return
    if by_name:
        raise ConfirmationRefused(f"the policy of {environment} requires an approval by name: "
                                  "pass --approver NAME (--yes is not enough) or run on a terminal")
    raise ConfirmationRefused(f"refusing to {operation} without confirmation: no terminal to ask on (pass --yes)")


def cmd_migrate(args, settings: Settings, database: Database) -> int:
    target = database()
    rules = _policy(args, target)
    rehearse = getattr(args, "rehearse", False) or (args.command == "upgrade" and rules is not None and rules.rehearse)
    if not args.dry_run:
        _check_policy(rules, target.environment, args.command, args.backup or rehearse, "add --backup")
    if rules is not None and not args.lock_retries:  # the environment's lock-retry schedule, unless one is given
        settings = dataclasses.replace(settings, lock_retries=rules.lock_retries())
    request = pipeline.Request(
        operation=args.command,
        revision=args.revision,
        dry_run=args.dry_run,
        backup=args.backup or rehearse,
        skip_health_checks=args.skip_health_checks,
        skip_validation=args.skip_validation,
        json_report=args.json_report,
        lint_blocking_level=getattr(args, "lint_level", None) or (rules.lint_blocking_level if rules else None),
        expect_current=getattr(args, "expect_current", None),
        rehearse=rehearse,
        # db-migrate running this command line as a subprocess (flows/app_env.py) links the report to its run
        run_url=os.environ.get("DBMIGRATE_RUN_URL") or None,
    )

    def confirm(plan: phases.Plan) -> Approval:
        steps = "".join(f"\n  {step.revision}  {step.message}" for step in plan.steps)
        rehearsed = "".join(f"\n{line}" for line in _rehearsal_lines(plan.rehearsal)) if plan.rehearsal else ""
        return _approve(args, rules, target.environment, args.command,
                        f"{args.command} {target.where} ({target.environment}) "
                        f"from {revisions.shown(plan.revision_before)}:{steps}{rehearsed}",
                        f"apply {len(plan.steps)} revision(s)?")

    hooks = pipeline.Hooks(confirm=confirm, on_progress=_print_progress,
                           require_approver=lambda: _require_approver(args, rules, target.environment, args.command))
    outcome = pipeline.execute(target, settings, request, hooks)
    report = outcome.report
    if args.json:
        _print_json({**report.as_dict(), "report_path": outcome.report_path, "sql": outcome.sql,
                     "report_error": outcome.report_error and str(outcome.report_error)})
    else:
        _print_outcome(outcome)
    return _finish(outcome, target, args.json)


def cmd_rehearse(args, settings: Settings, database: Database) -> int:
    """Take a backup, rehearse the pending revisions on a copy restored from it; the database is only read."""
    target = database()
    plan = phases.plan(target, settings.project(target), settings, args.revision, True)
    if not plan.steps:
        if args.json:
            _print_json(None)
        else:
            print(f"nothing to rehearse: database at {revisions.shown(plan.current)}")
        return 0
    health.require_scratch_server(health.REHEARSAL, target, settings.scratch_server, settings.connect_timeout)
    storage = settings.storage()
    manifest = backup.take(target, storage, settings.dump, _print_progress, settings.connect_timeout)
    result = rehearse(target, settings, plan, storage, manifest)
    if args.json:
        _print_json(result.as_dict())
    else:
        print("\n".join(_rehearsal_lines(result)))
    result.require()
    return 0


def _rehearsal_lines(result: Rehearsal) -> list[str]:
    lines = [f"rehearsed on a copy restored from backup {result.backup_id} (restore {result.restore_s:.1f}s):"]
    for step in result.steps:
        lines.append(f"  {step.revision}  {step.message}  ({step.duration_s:.3f}s)")
        lines += [f"    lock {lock.mode} on {lock.relation}, held {lock.held_s:.3f}s" for lock in step.locks]
        lines += [f"    rewrote {table} ({rows} rows)" for table, rows in step.tables_rewritten.items()]
        lines += [f"    wrote {rows} rows of {table}" for table, rows in step.rows_written.items()]
    if result.failed:
        lines.append(f"  failed: {result.failed}")
    return lines


def _finish(outcome: pipeline.Outcome, target: DatabaseTarget, as_json: bool) -> int:
    """The error line and the exit code. A report that could not be written is said in the same
    line as what happened to the database, and the report goes to stderr instead (--json: stdout has it)."""
    report, error, report_error = outcome.report, outcome.error, outcome.report_error
    if error is None and report_error is None:
        return 0
    if error is None:
        line = f"{report.operation} {_summary(report)}, but {report_error}"
    else:
        line = f"{error}" + (f"; and {report_error}" if report_error else "")
    print(f"dbmigrate: error: {target.redact(line)}", file=sys.stderr)
    if report_error is not None and not as_json:
        print(report.to_json(), end="", file=sys.stderr)
    return (error or report_error).exit_code


def _summary(report: Report) -> str:
    before = revisions.shown(report.revision_before)
    if report.status == NOOP:
        return f"had nothing to do: database already at {before}"
    if report.status == DRY_RUN:
        return f"dry run: {len(report.migrations_planned)} revision(s) from {before}; nothing was changed"
    if report.status == SUCCEEDED:
        return f"succeeded: {before} -> {revisions.shown(report.revision_after)}"
    if report.error.phase in ("migrate", "validate"):
        unknown = report.revision_after_unknown is not None
        at = "an unknown revision" if unknown else revisions.shown(report.revision_after)
        return f"failed in {report.error.phase}: database at {at}"
    return f"failed in {report.error.phase}: nothing was changed"


def _print_outcome(outcome: pipeline.Outcome) -> None:
    report = outcome.report
    if outcome.sql is not None:
        print(outcome.sql, end="")
    if report.backup:
        b = report.backup
        print(f"backup:   {b.location} ({b.size_bytes} bytes, sha256 {b.sha256[:12]}, {b.duration_s}s)")
    for line in lint_lines(report.lint) if report.lint else []:
        print(f"lint:     {line}")
    verb = "applied: " if report.operation == "upgrade" else "reverted:"
    for step in report.migrations_applied:
        print(f"{verb} {step.revision}  {step.message}  ({round(step.duration_s, 3)}s)")
    print(f"{report.operation} {_summary(report)} ({report.duration_s}s)")
    print(f"report:   {outcome.report_path or 'not written (see stderr)'}")


def _print_progress(size: int, rate: float) -> None:
    print(f"backup: {health.human_bytes(size)} written, {health.human_bytes(rate)}/s", file=sys.stderr, flush=True)


def _age(created) -> str:
    seconds = (datetime.now(timezone.utc) - created).total_seconds()
    for unit, length in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= length:
            return f"{seconds / length:.0f}{unit}"
    return f"{seconds:.0f}s"


def _manifest_line(listed: catalogue.Listed) -> str:
    m = listed.manifest
    return (f"{m.id:32} {health.human_bytes(m.size_bytes):>10}  {revisions.shown(m.revision):12} {_age(m.created):>5}  "
            f"{listed.status.upper() if listed.damage else listed.status:8}  {'; '.join(_what_we_know(listed))}")


def _what_we_know(listed: catalogue.Listed) -> list[str]:
    """What was checked and when, then what a look at the storage shows now."""
    m = listed.manifest
    checked = [name for key, name in (("sha256", "sha256"), ("pg_restore_list", "pg_restore --list"))
               if m.checks.get(key)]
    facts = [f"{' + '.join(checked)} at creation" if checked else "not checked at creation"]
    if m.verified:
        facts.append(f"restore-verified at {m.verified_at or 'an unknown time'}")
    facts.append(listed.damage or "dump present, size as recorded")
    return facts


def _warn_skipped(listing: catalogue.Catalogue) -> None:
    for skipped in listing.skipped:
        print(f"dbmigrate: warning: skipped damaged manifest {skipped.key}: {skipped.reason}", file=sys.stderr)


def cmd_backup(args, settings: Settings, database: Database) -> int:
    target = database()
    manifest = backup.take(target, settings.storage(), settings.dump, _print_progress, settings.connect_timeout,
                           settings.scratch_server)
    if args.json:
        _print_json(dataclasses.asdict(manifest))
    else:
        print(f"backup {manifest.id}: {manifest.location}")
        print(f"  {manifest.size_bytes} bytes, sha256 {manifest.sha256}, {manifest.compression}, "
              f"{sum(manifest.row_counts.values())} rows in {len(manifest.row_counts)} tables, {manifest.duration_s}s")
        print(f"  {catalogue.how_checked(manifest.verified)}")
    return 0


def cmd_backups(args, settings: Settings, database: Database) -> int:
    """Damaged backups are shown as such (and skipped manifests warned about on stderr), with exit 0:
    the listing itself succeeded."""
    target = database()
    if args.backups_command == "prune":
        catalogue.check_retention(args.keep_last, args.keep_days)
    storage = settings.storage()
    listing = catalogue.catalogue(storage, target)
    _warn_skipped(listing)
    if args.backups_command == "list":
        if args.json:
            _print_json([b.as_dict() for b in listing.backups] + [s.as_dict() for s in listing.skipped])
        elif not listing.backups:
            print(f"no backups of {target.environment}/{target.database} in {storage!r}")
        for b in [] if args.json else listing.backups:
            print(_manifest_line(b))
        return 0
    doomed = catalogue.prune(storage, target, args.keep_last, args.keep_days, dry_run=args.dry_run, listing=listing)
    if args.json:
        _print_json([m.id for m in doomed])
    for m in [] if args.json else doomed:
        print(f"{'would delete' if args.dry_run else 'deleted'} {m.id}")
    if not doomed and not args.json:
        print("nothing to prune")
    return 0


def cmd_restore(args, settings: Settings, database: Database) -> int:
    target = database()
    rules = None if args.target_db else _policy(args, target)  # a new database: nothing existing changes
    _check_policy(rules, target.environment, "restore over the original", not args.no_safety_backup,
                  "drop --no-safety-backup")
    storage = settings.storage()
    manifest = catalogue.find(storage, target, args.backup_id)
    if args.target_db:
        result = restore.into_new_database(target, storage, manifest, args.target_db, settings.connect_timeout,
                                           args.jobs)
        print(f"restored {manifest.id} into new database {result.database}")
        return 0
    approval = _approve(args, rules, target.environment, "restore over the database",
                        f"restore {target.where} ({target.environment}) from backup {manifest.id} "
                        f"(revision {revisions.shown(manifest.revision)}):",
                        "replace the contents of the database with this backup?")
    approval.require()
    print(f"restore approved by {approval.approver} ({approval.via})")
    result = restore.replace_with_backup(target, storage, manifest, settings.connect_timeout, settings.guard_wait_s,
                                         None if args.no_safety_backup else settings.dump, _print_progress,
                                         settings.limits.lock_timeout_s)
    if result.safety_backup:
        print(f"safety backup of the previous state: {result.safety_backup.id}")
    print(f"restored {manifest.id} over {target.where}")
    return 0


def cmd_generate(args, settings: Settings, database: Database) -> int:
    from alembic import command

    project = settings.project(database() if args.autogenerate else None)
    # Alembic prints "Generating <path> ... done" itself.
    command.revision(project.config, message=args.message, autogenerate=args.autogenerate, rev_id=args.rev_id)
    return 0


def cmd_local(args, settings: Settings, database: Database) -> int:
    from dbmigrate import stack  # the local stack's processes: only for `local`

    home, say = settings.home, functools.partial(print, flush=True)
    action = args.local_command
    if action == "up":
        stack.up(home, Path.cwd(), args.pg_port, args.prefect_port, say, fleet=args.fleet)
    elif action == "down":
        stack.down(home, say)
    elif action == "env":
        api = stack.api_url(home)
        if api is None:
            raise ConfigError(f"the local Prefect server is not running (home {home.resolve()}): dbmigrate local up")
        print("\n".join(stack.exports(home, api)))
    elif action == "start":
        _print_local(local.start(home, args.pg_port), home)
    elif action == "stop":
        print("stopped" if local.stop(home) else "not running")
    else:
        server = local.running(home)
        if server is None:
            print(f"not running (data directory {local.data_dir(home)})")
        else:
            _print_local(server, home)
        for line in stack.status(home):
            print(line)
        return 0 if server else 1
    return 0


def _print_local(server: local.LocalServer, home: Path) -> None:
    print(f"running: pid {server.pid}, data in {server.data_dir}, url {server.url(local.default_database(home))}")
    if server.listen:
        print(f"tcp: {server.address}, user {local.USER}, password in {local.password_file(home)}")


def cmd_blocks(args, settings: Settings, database: Database) -> int:
    with needs_prefect("dbmigrate blocks"):
        from blocks.sync import storage_spec, sync_environment  # imports Prefect: only for `blocks`

    synced = sync_environment(args.env, os.environ, alerts=True)
    for result in synced:
        print(result)
    if any(result.block.startswith("s3-bucket/") for result in synced):
        spec = storage_spec(args.env)
        print(f"backups of {args.env}: {spec} (a run's backup_storage parameter, or "
              f"DBMIGRATE_BACKUP_STORAGE={spec} on its worker)")
    return 0


def _environments(args, database: Database) -> tuple[list[DatabaseTarget], list[dict]]:
    """overview's environments: every DatabaseCredentials block where a Prefect API is set
    (PREFECT_API_URL) and no one database is named; else the one database. A block that cannot be
    loaded is listed with why, not allowed to hide the others."""
    if args.url or args.env or os.environ.get("DATABASE_URL") or not os.environ.get("PREFECT_API_URL"):
        return [database()], []
    with needs_prefect("dbmigrate overview of every environment"):
        from blocks import environments, load_target, require_api  # imports Prefect: only on this path
    require_api()
    targets, unloadable = [], []
    for name in environments():
        try:
            targets.append(load_target(name))
        except ConfigError as exc:
            unloadable.append(overview.unloadable(name, str(exc)))
    return targets, unloadable


def cmd_overview(args, settings: Settings, database: Database) -> int:
    targets, unloadable = _environments(args, database)
    states = overview.overview(targets, settings) + unloadable
    if args.json:
        _print_json(states)
    else:
        print("\n".join(overview.overview_lines(states)))
    return 0


def cmd_history(args, settings: Settings, database: Database) -> int:
    changes = overview.history(settings.reports_dir, args.env)
    if args.json:
        _print_json(changes)
    else:
        print("\n".join(overview.history_lines(changes)) or f"no applied revisions in the reports under "
                                                             f"{settings.reports_dir}")
    return 0


def cmd_fleet(args, settings: Settings, database: Database) -> int:
    result = fleet_cli.status(args, settings)
    if args.json:
        _print_json(result)
    else:
        print("\n".join(fleet_cli.status_lines(result)))
    return 0


def cmd_run(args, settings: Settings, database: Database) -> int:
    with needs_prefect("dbmigrate run"):
        from dbmigrate import watch  # the Prefect client: only for `run`

    return watch.run(args.env, args.revision, args.dry_run, args.watch, functools.partial(print, flush=True))


HANDLERS = {"health": cmd_health, "status": cmd_status, "heads": cmd_heads, "check": cmd_check, "lint": cmd_lint,
            "drift": cmd_drift,
            "upgrade": cmd_migrate, "downgrade": cmd_migrate, "rehearse": cmd_rehearse, "generate": cmd_generate,
            "backup": cmd_backup, "backups": cmd_backups, "restore": cmd_restore, "local": cmd_local,
            "blocks": cmd_blocks, "run": cmd_run, "overview": cmd_overview, "history": cmd_history,
            "fleet": cmd_fleet}


# The commands that make scratch databases (upgrade and downgrade: their backup's verify-restore, the
# rehearsal), or look for abandoned ones (health). The others never load the policy for it: history's
# --env, for one, is only a name.
SCRATCH_COMMANDS = frozenset({"health", "drift", "rehearse", "backup", "upgrade", "downgrade"})


def _with_scratch_server_of_the_policy(args, settings: Settings, database: Database) -> Settings:
    """With --env, the policy's scratch_server block is where each of SCRATCH_COMMANDS makes (and
    health looks for) scratch databases; DBMIGRATE_SCRATCH_URL, when set, wins."""
    if args.command not in SCRATCH_COMMANDS or not args.env or settings.scratch_server is not None:
        return settings
    rules = _policy(args, database())
    if not rules.scratch_server:
        return settings
    from blocks import load_scratch_server  # imports Prefect: only on the --env path

    return dataclasses.replace(settings, scratch_server=load_scratch_server(rules))


def run(args) -> int:
    if args.command != "generate":  # a revision is source code, left to the user's umask
        private.owner_only()
    settings = _settings(args)
    if getattr(args, "env", None):  # Prefect's event worker says "Still processing items" on stderr at exit
        logging.getLogger("EventsWorker").setLevel(logging.ERROR)
    database = Database(args, settings)
    try:
        return HANDLERS[args.command](args, _with_scratch_server_of_the_policy(args, settings, database), database)
    except DbMigrateError as exc:
        exc.message = database.redact(exc.message)
        raise


class Terminated(KeyboardInterrupt):
    """SIGTERM (a process worker, systemd, Kubernetes stopping us), handled as Ctrl-C is:
    psycopg cancels the running statement on a KeyboardInterrupt, and every cleanup
    (partial backup removed, report written, guard released) runs for it too."""


def _terminate(signum, frame) -> None:
    signal.signal(signal.SIGTERM, lambda *_: None)  # a second SIGTERM must not cut the cleanup short
    raise Terminated("terminated by SIGTERM")


def _reader_gone() -> bool:
    """Whether stdout is a pipe whose reader has gone (`dbmigrate ... | head`): that is the reader's
    choice, so the command ends quietly, as a Unix tool killed by SIGPIPE does (exit 141)."""
    poller = select.poll()
    poller.register(sys.stdout.fileno(), select.POLLOUT)
    return any(events & select.POLLERR for _, events in poller.poll(0))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    previous = None
    if threading.current_thread() is threading.main_thread():  # only there can a handler be installed
        previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        with _json_alone_on_stdout(getattr(args, "json", False)):
            code = run(args)
        sys.stdout.flush()  # here, not at exit: a reader that went away is handled below
        return code
    except BrokenPipeError:
        if not _reader_gone():  # another pipe (to pg_restore, psql, ...): a failure to show, not to hide
            raise
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the flush at exit must not fail again
        return 128 + signal.SIGPIPE
    except DbMigrateError as exc:
        print(f"dbmigrate: error: {exc}", file=sys.stderr)
        return 2 if args.command == "check" else exc.exit_code
    except Terminated:
        print("dbmigrate: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print("dbmigrate: interrupted", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
