"""``dbmigrate fleet status --env E``: where every member of an environment's fleet stands,
read in parallel; the fleet itself is the ``DatabaseFleet`` block (:mod:`blocks.fleet`), so this
command imports Prefect when it runs."""

from __future__ import annotations

import argparse

from dbmigrate import fleet
from dbmigrate.cli import arguments
from dbmigrate.cli.environment import Database
from dbmigrate.cli.render import print_json
from dbmigrate.errors import ConfigError, needs_prefect
from dbmigrate.settings import Settings

MAX_JOBS = 64


def _jobs(value: str) -> int:
    if not (value.isascii() and value.isdigit() and 1 <= int(value) <= MAX_JOBS):
        raise argparse.ArgumentTypeError(f"must be a whole number from 1 to {MAX_JOBS}")
    return int(value)


def register(commands: arguments.Commands) -> None:
    """``fleet status``, with the options every command shares (``--env`` names the environment)."""
    actions = commands.add_group("fleet", "the databases of an environment's fleet (a DatabaseFleet block)",
                                 cmd_fleet, "fleet_command")
    text = ("each member of the fleet of --env ENV: its revision against the head, the revisions pending, or why "
            "it cannot be read; read in parallel; then a summary line. Needs PREFECT_API_URL")
    status_cmd = actions.add_parser("status", parents=[commands.common], help=text, description=text)
    status_cmd.add_argument("--fleet", metavar="BLOCK", help="the DatabaseFleet block (default: ENV-fleet)")
    status_cmd.add_argument("--jobs", "-j", type=_jobs, default=fleet.DEFAULT_JOBS, metavar="N",
                            help=f"members read at once (default {fleet.DEFAULT_JOBS})")


def cmd_fleet(args, settings: Settings, database: Database) -> int:
    result = status(args, settings)
    if args.json:
        print_json(result)
    else:
        print("\n".join(status_lines(result)))
    return 0


def status(args, settings: Settings) -> dict:
    """The fleet's members and where each stands, as ``--json`` prints it."""
    if not args.env or args.url:
        raise ConfigError("fleet status needs --env ENV (the environment whose DatabaseFleet block to read), "
                          "and no --url")
    with needs_prefect("dbmigrate fleet"):
        from blocks import require_api  # imports Prefect: the fleet is a block
        from blocks.fleet import fleet_block_name, load_fleet

    require_api()
    members = load_fleet(args.env, args.fleet)
    project = settings.project()
    states = fleet.fleet_status(members, project, args.jobs, settings.connect_timeout)
    return {"environment": args.env, "fleet": args.fleet or fleet_block_name(args.env), "heads": project.heads,
            "summary": fleet.summary_line(states, project.heads),
            "members": [state.as_dict() for state in states]}


def status_lines(result: dict) -> list[str]:
    rows = result["members"]
    name_width = max([len(row["name"]) for row in rows] + [6])
    server_width = max([len(row["server"]) for row in rows] + [6])
    lines = []
    for row in rows:
        if not row["reachable"]:
            where = f"unreachable: {row['why']}"
        elif row["why"]:
            where = f"{row['revision']}  cannot be planned: {row['why']}"
        else:
            where = f"{row['revision']}  " + ("at head" if row["at_head"] else f"{row['pending']} pending")
        lines.append(f"{row['name']:{name_width}}  {row['server']:{server_width}}  {where}")
    return [*lines, result["summary"]]
