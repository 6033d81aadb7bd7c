"""The commands around the migrations: generate a revision; the embedded PostgreSQL and the local
stack (``local``); an environment's Prefect blocks (``blocks sync``); a deployment's run from the
terminal (``run``). Prefect is imported only by those that need it, when they run."""

from __future__ import annotations

import argparse
import functools
import os
from pathlib import Path

from dbmigrate import local
from dbmigrate.cli import arguments
from dbmigrate.cli.environment import Database
from dbmigrate.errors import ConfigError, needs_prefect
from dbmigrate.settings import Settings

SYNC_VARIABLES = """\
variables: DB_HOST, DB_NAME, DB_USER, DB_PASSWORD (required), DB_PORT (default 5432),
DB_SSLMODE (default prefer); BACKUP_BUCKET, BACKUP_BUCKET_FOLDER, AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_REGION, AWS_ENDPOINT_URL (S3-compatible stores);
ALERT_WEBHOOK_URL (JSON subject/body), ALERT_SLACK_WEBHOOK_URL (a Slack incoming webhook): alerts;
FLEET_MEMBERS (credentials blocks), FLEET_DATABASES (on DB_HOST) or FLEET_QUERY (SQL selecting them),
FLEET_CANARY, FLEET_SKIP_UNREACHABLE: the DatabaseFleet block NAME-fleet. Needs PREFECT_API_URL."""

LOCAL_ACTIONS = (
    ("start", "start the embedded PostgreSQL (commands start it on first use anyway)"),
    ("status", "the embedded PostgreSQL (where, its URL: no password over the socket; the TCP password's file) and "
               "the local stack's Prefect server and worker; exit 1 when PostgreSQL is not running"),
    ("stop", "stop the embedded PostgreSQL"),
    ("up", "the local stack, on 127.0.0.1: the embedded PostgreSQL with the databases development, staging and "
           "production, a Prefect server, their DatabaseCredentials blocks, the work pool dbmigrate, prefect deploy "
           "--all from this checkout, and a process worker (run it from the checkout)"),
    ("down", "stop the local stack: the worker, then the Prefect server, then PostgreSQL"),
    ("env", "print the exports of PREFECT_API_URL and PREFECT_API_AUTH_STRING (read from its file) for the running "
            "stack: eval \"$(dbmigrate local env)\""),
)


def register(commands: arguments.Commands) -> None:
    generate = commands.add("generate", "create a new revision file", cmd_generate)
    generate.add_argument("-m", "--message", required=True, help="what the revision does")
    generate.add_argument("--autogenerate", action="store_true", help="compare models with the database")
    generate.add_argument("--rev-id", help="revision id to use instead of a random one")

    actions = commands.add_group("local", "the embedded local PostgreSQL, and the local Prefect stack", cmd_local,
                                 "local_command")
    for name, text in LOCAL_ACTIONS:
        action = actions.add_parser(name, help=text, description=text)
        action.add_argument("--home", type=Path, help="state directory (default: DBMIGRATE_HOME or .dbmigrate)")
        if name in ("start", "up"):
            action.add_argument("--pg-port", type=arguments.port, metavar="PORT",
                                help="PostgreSQL's TCP port on 127.0.0.1 (default: the one recorded in the home, "
                                     "else a free one)")
        if name == "up":
            action.add_argument("--prefect-port", type=arguments.port, metavar="PORT",
                                help="the Prefect server's port on 127.0.0.1 (default 4200)")
            action.add_argument("--fleet", type=arguments.positive_int, metavar="N",
                                help="also N tenant databases per environment, at the sample schema with some rows, "
                                     "and each environment's DatabaseFleet block selecting them (docs/FLEETS.md)")

    run = commands.add_plain(
        "run", "run the db-migrate deployment of an environment on its Prefect worker, from this terminal",
        "Start a run of the deployment db-migrate/ENV on the Prefect server PREFECT_API_URL names; with --watch, "
        "print each state it enters with its message (a failed run's says why), the link to approve it while it "
        "waits, and exit 0 when it completed, 1 when not. Ctrl-C cancels the run.", cmd_run)
    run.add_argument("--env", required=True, metavar="ENV", help="the environment: its db-migrate/ENV deployment")
    run.add_argument("-r", "--revision", default="head", help="the revision to migrate to (default head)")
    run.add_argument("--dry-run", action="store_true", help="only show the SQL of the pending revisions")
    run.add_argument("--watch", action="store_true", help="follow the run until it ends")

    blocks = commands.add_group("blocks", "the Prefect blocks of an environment", cmd_blocks, "blocks_command")
    sync = blocks.add_parser(
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


def cmd_generate(args, settings: Settings, database: Database) -> int:
    from alembic import command

    project = settings.project(database() if args.autogenerate else None)
    # Alembic prints "Generating <path> ... done" itself.
    command.revision(project.config, message=args.message, autogenerate=args.autogenerate, rev_id=args.rev_id)
    return 0


def cmd_local(args, settings: Settings, database: Database) -> int:
    home, say = settings.home, functools.partial(print, flush=True)
    action = args.local_command
    if action == "start":
        _print_local(local.start(home, args.pg_port), home)
        return 0
    if action == "stop":
        print("stopped" if local.stop(home) else "not running")
        return 0
    from stack import processes, provision  # the local stack: only for `local up|down|env|status`

    if action == "up":
        provision.up(home, Path.cwd(), args.pg_port, args.prefect_port, say, fleet=args.fleet)
    elif action == "down":
        processes.down(home, say)
    elif action == "env":
        api = processes.api_url(home)
        if api is None:
            raise ConfigError(f"the local Prefect server is not running (home {home.resolve()}): dbmigrate local up")
        print("\n".join(processes.exports(home, api)))
    else:
        server = local.running(home)
        if server is None:
            print(f"not running (data directory {local.data_dir(home)})")
        else:
            _print_local(server, home)
        for line in processes.status(home):
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


def cmd_run(args, settings: Settings, database: Database) -> int:
    with needs_prefect("dbmigrate run"):
        from dbmigrate import watch  # the Prefect client: only for `run`

    return watch.run(args.env, args.revision, args.dry_run, args.watch, functools.partial(print, flush=True))
