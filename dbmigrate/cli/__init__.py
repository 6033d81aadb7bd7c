"""The ``dbmigrate`` command line: the parser assembled from the areas, each registering its own
commands beside their handlers (``inspect``, ``migrate``, ``backups``, ``local``); ``main``, with
the signals and the one place a ``DbMigrateError`` becomes its line on stderr and its exit code.

Exit codes: 0 success; 1 the operation ran and failed (a failed health check, a
failed migration, ``check`` with pending revisions, ``drift`` with differences, ``lint`` with findings at or above the
blocking level); 2 bad input or an
unreachable database, with nothing changed; 3 the upgrade or downgrade succeeded
but its report could not be written (the report is then printed on stderr).
"""

from __future__ import annotations

import argparse
import logging
import os
import select
import signal
import sys
import threading

from dbmigrate import __version__, private
from dbmigrate.cli import arguments, backups, environment, fleet, inspect, local, migrate
from dbmigrate.cli.render import json_alone_on_stdout
from dbmigrate.errors import DbMigrateError

AREAS = (inspect, migrate, backups, fleet, local)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command, or (``command``) of that one in full and the others by name."""
    parser = arguments.Parser(
        prog="dbmigrate",
        description="Safe PostgreSQL migrations with Alembic: health checks, backup, migrate, validate, report.",
        epilog=arguments.EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"dbmigrate {__version__}")
    commands = arguments.Commands(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"),
                                  arguments.common_options(), command)
    for area in AREAS:
        area.register(commands)
    return parser


def run(args) -> int:
    if args.command != "generate":  # a revision is source code, left to the user's umask
        private.owner_only()
    settings = arguments.settings(args)
    if getattr(args, "env", None):  # Prefect's event worker says "Still processing items" on stderr at exit
        logging.getLogger("EventsWorker").setLevel(logging.ERROR)
    database = environment.Database(args, settings.home)
    try:
        return args.handler(args, environment.governed(args, settings, database), database)
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
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv[0] if argv and not argv[0].startswith("-") else None).parse_args(argv)
    previous = None
    if threading.current_thread() is threading.main_thread():  # only there can a handler be installed
        previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        with json_alone_on_stdout(getattr(args, "json", False)):
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
