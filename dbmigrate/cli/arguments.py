"""The command line's argument types, the options every command shares, and the settings they make.

Every value is checked by argparse before anything connects (exit 2, one line). An option that
is not given is None, so the default comes from one place: the environment's policy under
``--env``, else the dataclass the option fills in (``Settings``, ``SessionLimits``, ``LockRetries``,
``DumpOptions``).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from pathlib import Path

from dbmigrate import revisions
from dbmigrate.backup import DumpOptions
from dbmigrate.errors import RevisionError
from dbmigrate.migrate import SessionLimits
from dbmigrate.policy import Policy
from dbmigrate.settings import Settings

EPILOG = """\
Which database: --url or DATABASE_URL; else --env NAME (a Prefect DatabaseCredentials
block); else the embedded local PostgreSQL under .dbmigrate/ (started on first use).
Exit codes: 0 ok, 1 the operation failed, 2 bad input or unreachable database,
3 succeeded but the report could not be written."""

MAX_SECONDS = 2_147_483  # PostgreSQL keeps its timeouts as int milliseconds: about 24.8 days
MAX_DAYS = 36_500
MAX_JOBS = 128

# The options that say how a run waits, by the Policy field each one overrides (--env) and the
# Settings field it fills in. Not given, they are None: the policy's value, else the dataclass's.
LIMIT_OPTIONS = {"guard_wait": "guard_wait_s", "lock_timeout": "lock_timeout_s",
                 "statement_timeout": "statement_timeout_s", "lock_retries": "lock_retry_timeouts_s",
                 "lock_retry_pause": "lock_retry_pause_s", "lock_retry_total": "lock_retry_total_s"}


class Parser(argparse.ArgumentParser):
    """Bad input is one line on stderr and exit 2, like every other error."""

    def error(self, message: str):
        self.exit(2, f"dbmigrate: error: {message} (see '{self.prog} --help')\n")


def number(unit: str, maximum: float, minimum: float = 0.0):
    """An argparse type: a finite number from minimum to maximum (nan and inf are refused)."""

    def parse(value: str) -> float:
        try:
            parsed = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number of {unit}: {value!r}") from None
        if not (math.isfinite(parsed) and minimum <= parsed <= maximum):
            raise argparse.ArgumentTypeError(
                f"must be a number of {unit} from {minimum:.10g} to {maximum:.10g}: {value!r}")
        return parsed

    return parse


seconds = number("seconds", MAX_SECONDS)
lock_timeout = number("seconds", MAX_SECONDS, minimum=0.001)  # 0 would be "wait forever"
connect_seconds = number("seconds", MAX_SECONDS, minimum=1)  # libpq takes 0 as "wait forever"
days = number("days", MAX_DAYS)


def lock_timeouts(value: str) -> tuple[float, ...]:
    """--lock-retries: the lock_timeout of each attempt, comma-separated."""
    return tuple(lock_timeout(part.strip()) for part in value.split(","))


def positive_int(value: str) -> int:
    if not (value.isascii() and value.isdigit() and int(value) >= 1):
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1: {value!r}")
    return int(value)


def port(value: str) -> int:
    number_ = positive_int(value)
    if number_ > 65535:
        raise argparse.ArgumentTypeError(f"not a TCP port: {value!r}")
    return number_


def jobs(value: str) -> int:
    count = positive_int(value)
    if count > MAX_JOBS:
        raise argparse.ArgumentTypeError(f"at most {MAX_JOBS} parallel jobs: {value!r}")
    return count


def revision(value: str) -> str:
    try:
        return revisions.check_syntax(value)
    except RevisionError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def approver(value: str) -> str:
    name = value.strip()
    if not name or not name.isprintable() or len(name) > 100:
        raise argparse.ArgumentTypeError(f"not a name: {value!r}")
    return name


def report_path(value: str) -> Path:
    """--json-report: refused before anything changes if it can never be written."""
    path = Path(value)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{value!r} is a directory: name a file")
    parent = next(p for p in path.absolute().parents if p.exists())
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"cannot create {value!r}: {parent} is not a writable directory")
    return path


def common_options() -> argparse.ArgumentParser:
    """The parent parser of every command that works on a database: which one, where its state lives."""
    common = Parser(add_help=False)
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
        type=connect_seconds,
        metavar="S",
        help=f"seconds to wait for a database connection (libpq waits at least 2), and for a lock the "
        f"tool's own queries need (PostgreSQL lock_timeout; default {Settings.connect_timeout:g}; "
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


class Commands:
    """The subcommands being registered: each area adds its own beside its handlers. With ``wanted``
    (the command being run) only that one is built in full; the others are listed by name and help,
    so the top-level help and a mistyped command's choices stay whole."""

    def __init__(self, subparsers, common: argparse.ArgumentParser, wanted: str | None = None):
        self.subparsers, self.common, self.wanted = subparsers, common, wanted

    def add(self, name: str, help_text: str, handler) -> argparse.ArgumentParser:
        """A command that works on a database (the common options), run by ``handler(args, settings, database)``."""
        if not self._builds(name):
            return self._listed(name, help_text)
        parser = self.subparsers.add_parser(name, parents=[self.common], help=help_text, description=help_text,
                                            epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
        parser.set_defaults(handler=handler)
        return parser

    def add_plain(self, name: str, help_text: str, description: str, handler) -> argparse.ArgumentParser:
        """A command that works on no database (no common options), run by ``handler(args, settings, database)``."""
        if not self._builds(name):
            return self._listed(name, help_text)
        parser = self.subparsers.add_parser(name, help=help_text, description=description)
        parser.set_defaults(handler=handler)
        return parser

    def add_group(self, name: str, help_text: str, handler, dest: str):
        """A command of several actions (``backups list``): its subparsers, ``args.<dest>`` the action."""
        if not self._builds(name):
            return self._listed(name, help_text)
        parser = self.subparsers.add_parser(name, help=help_text)
        parser.set_defaults(handler=handler)
        return parser.add_subparsers(dest=dest, required=True, metavar="ACTION")

    def _builds(self, name: str) -> bool:
        return self.wanted in (None, name)

    def _listed(self, name: str, help_text: str) -> _Unbuilt:
        """A command not being run: listed by its name and help; what its area adds to it is dropped."""
        self.subparsers.add_parser(name, help=help_text)
        return _Unbuilt()


class _Unbuilt:
    """The parser of a command not being run, as its area sees it: every option added to it, group
    and action, is taken and dropped. Building every command's parser took about 8 ms, a fifth of what
    the command line adds to Alembic's start (docs/BENCHMARKS.md), mostly argparse asking gettext
    for translations of its own words, a few file lookups per parser."""

    def __getattr__(self, name: str):
        return lambda *args, **options: self


def dump_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("backup")
    group.add_argument("--compression", default=DumpOptions.compression, metavar="METHOD[:LEVEL]",
                       help="pg_dump compression: auto (zstd if this pg_dump has it, else gzip), zstd, gzip or none")
    group.add_argument("--verify-restore", action="store_true",
                       help="also restore the backup into a scratch database and compare row counts")
    group.add_argument("--jobs", "-j", type=jobs, default=DumpOptions.jobs, metavar="N",
                       help="N > 1: pg_dump's parallel directory format (local storage only), for large databases")


def confirmation_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
    parser.add_argument("--approver", type=approver, metavar="NAME",
                        help="approve as NAME without asking (recorded in the report); needed instead of --yes "
                             "where the environment's policy requires an approval")


def lock_timeout_option(parser, help_text: str) -> None:
    parser.add_argument("--lock-timeout", type=seconds, metavar="S",
                        help=f"{help_text} (default: --env's policy, else {SessionLimits.lock_timeout_s:g}; 0 = none)")


# Without --env no policy applies: Policy's limit fields default to the settings' own defaults (a unit test holds
# them equal), so the options fold into a default Policy either way.
_DEFAULT_LIMITS = Policy()


def settings(args, policy: Policy | None = None) -> Settings:
    """The settings of this command: its options where given; for how a run waits, with --env, the
    environment's policy (the one derivation the flows use too: ``Settings.under_policy``); else
    the environment variables' and the dataclasses' defaults."""
    common = dict(
        home=getattr(args, "home", None),
        alembic_config=getattr(args, "alembic_config", None),
        connect_timeout=getattr(args, "timeout", None),
        storage_spec=getattr(args, "storage", None),
        dump=_dump(args),
        # env.py's fileConfig is what prints Alembic's INFO lines; `generate` prints as `alembic revision` does
        project_logging=getattr(args, "verbose", False) or args.command == "generate",
    )
    given = {field: getattr(args, option) for option, field in LIMIT_OPTIONS.items()
             if getattr(args, option, None) not in (None, ())}
    return Settings.under_policy(dataclasses.replace(policy or _DEFAULT_LIMITS, **given), **common)


def _dump(args) -> DumpOptions:
    """The backup options of a command that takes a backup; restore's --jobs is pg_restore's, not these."""
    if "compression" not in args:
        return DumpOptions()
    return DumpOptions(compression=args.compression, verify_restore=args.verify_restore, jobs=args.jobs)
