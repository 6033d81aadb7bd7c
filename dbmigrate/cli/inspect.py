"""The commands that read and change nothing: health, status, heads, check, drift, lint, overview, history."""

from __future__ import annotations

import dataclasses
import os

from dbmigrate import db, revisions
from dbmigrate.cli import arguments
from dbmigrate.cli.environment import Database
from dbmigrate.cli.render import lint_lines, print_json
from dbmigrate.errors import ConfigError, needs_prefect
from dbmigrate.policy import LINT_LEVELS
from dbmigrate.settings import Settings
from dbmigrate.target import DatabaseTarget


def register(commands: arguments.Commands) -> None:
    commands.add("health", "pre-flight checks: connection, disk space, alembic version table, pending revisions",
                 cmd_health)
    commands.add("status", "current revision(s), head(s) and pending revisions", cmd_status)
    commands.add("heads", "head revision(s) of the migration scripts", cmd_heads)
    commands.add("overview", "every environment (with PREFECT_API_URL: each DatabaseCredentials block; else this "
                             "database), read in parallel: current revision, head, pending, the last run and its "
                             "outcome (the reports under the home), the newest restorable backup", cmd_overview)
    commands.add("history", "the revisions applied (and reverted) by the runs whose reports are under the home, "
                            "oldest first: when, by whom, how long, the run's outcome and link (--env NAME: that "
                            "environment only)", cmd_history)
    commands.add("check", "exit 0 at head, 1 when revisions are pending, 2 on error", cmd_check)
    commands.add("drift", "compare the schema with what the migrations build up to the database's revision "
                          "(replayed into a scratch database) and with the models where env.py has them; list each "
                          "difference and invalid index; exit 0 when there is none, 1 when there is drift, 2 on "
                          "error", cmd_drift)
    lint = commands.add("lint", "lint the SQL of each pending revision with squawk (lock safety); exit 0 when no "
                                "finding is at or above the blocking level (--env: the environment's lint_level; "
                                "else warning), 1 when one is, 2 on error", cmd_lint)
    lint.add_argument("--revision", "-r", type=arguments.revision, default="head",
                      help="lint the pending revisions up to this one (default: head)")


def cmd_health(args, settings: Settings, database: Database) -> int:
    from dbmigrate import health

    target = database()
    project = settings.project(target)
    checks = health.run(target, project, settings.backup_dir, settings.connect_timeout,
                        scratch_server=settings.scratch_server)
    overall = "fail" if not health.passed(checks) else ("warn" if any(c.status == "warn" for c in checks) else "ok")
    if args.json:
        print_json({"status": overall, "environment": target.environment, "database": target.describe(),
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
        print_json(state)
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
        print_json(state)
    elif state["at_head"]:
        print(f"up to date: database at {revisions.shown(state['current'])}")
    else:
        print(f"{len(state['pending'])} revision(s) pending: {', '.join(p['revision'] for p in state['pending'])}")
    return 0 if state["at_head"] else 1


def cmd_drift(args, settings: Settings, database: Database) -> int:
    from dbmigrate import drift

    target = database()
    found = drift.find(target, settings)
    if args.json:
        print_json({"environment": target.environment, "database": target.describe(), **found.as_dict(),
                    "duration_s": round(found.duration_s, 3)})
    else:
        for line in found.findings:
            print(line)
        verdict = (f"drift: {len(found.findings)} difference(s) from the migrations at {found.revision}"
                   if found.findings else f"no drift: the schema matches the migrations at {found.revision}")
        print(f"{verdict} ({found.models}; {found.duration_s:.1f} s)")
    return 1 if found.findings else 0


def cmd_lint(args, settings: Settings, database: Database) -> int:
    from dbmigrate import phases

    target = database()
    policy = database.policy()
    project = settings.project(target)
    plan = phases.plan(target, project, settings, args.revision, True)
    result = phases.lint(target, project, settings, plan, policy.lint_level if policy else LINT_LEVELS[0])
    blocking = result.blocking()
    if args.json:
        print_json({"environment": target.environment, "database": target.describe(),
                    "revision_before": plan.revision_before, "target_revision": plan.target,
                    "blocking": len(blocking), **dataclasses.asdict(result)})
    else:
        for line in lint_lines(result):
            print(line)
        print(f"lint: {len(blocking)} finding(s) at or above {result.blocking_level} in "
              f"{len(result.revisions)} pending revision(s)")
    return 1 if blocking else 0


def cmd_heads(args, settings: Settings, database: Database) -> int:
    project = settings.project()
    heads = [{"revision": h, "message": project.script.get_revision(h).doc} for h in project.heads]
    if args.json:
        print_json(heads)
    else:
        for h in heads:
            print(f"{h['revision']} (head)  {h['message']}")
    return 0


def _environments(args, database: Database) -> tuple[list[DatabaseTarget], list[dict]]:
    from dbmigrate import overview

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
    from dbmigrate import overview

    targets, unloadable = _environments(args, database)
    states = overview.overview(targets, settings) + unloadable
    if args.json:
        print_json(states)
    else:
        print("\n".join(overview.overview_lines(states)))
    return 0


def cmd_history(args, settings: Settings, database: Database) -> int:
    from dbmigrate import overview

    changes = overview.history(settings.reports_dir, args.env)
    if args.json:
        print_json(changes)
    else:
        print("\n".join(overview.history_lines(changes)) or f"no applied revisions in the reports under "
                                                            f"{settings.reports_dir}")
    return 0
