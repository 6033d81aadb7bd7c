"""The commands that migrate: upgrade, downgrade and rehearse; and the approval on the terminal,
which restore over the original asks too."""

from __future__ import annotations

import getpass
import os
import sys
from typing import TYPE_CHECKING

from dbmigrate import revisions
from dbmigrate.cli import arguments
from dbmigrate.cli.environment import Database
from dbmigrate.cli.render import finish, print_json, print_outcome, print_progress, rehearsal_lines
from dbmigrate.errors import ConfirmationRefused
from dbmigrate.lockretry import LockRetries
from dbmigrate.migrate import SessionLimits
from dbmigrate.policy import LINT_LEVELS, Policy
from dbmigrate.settings import Settings

if TYPE_CHECKING:  # the report's module is imported by the commands that make one (docs/BENCHMARKS.md)
    from dbmigrate import phases
    from dbmigrate.report import Approval


def register(commands: arguments.Commands) -> None:
    for name, text, required in (("upgrade", "health checks, backup, upgrade, validation and report", False),
                                 ("downgrade", "like upgrade, towards an older revision", True)):
        parser = commands.add(name, text, cmd_migrate)
        _migration_options(parser, required)
        arguments.dump_options(parser)
        if name == "upgrade":
            _upgrade_options(parser)
    rehearsing = commands.add("rehearse", "back up, restore the backup into a scratch database, run the pending "
                                          "revisions there and report each one's duration, locks and rewrites; the "
                                          "database is not changed", cmd_rehearse)
    rehearsing.add_argument("--revision", "-r", type=arguments.revision, default="head",
                            help="target revision (default: head)")
    arguments.dump_options(rehearsing)


def _migration_options(parser, revision_required: bool) -> None:
    parser.add_argument(
        "--revision",
        "-r",
        type=arguments.revision,
        required=revision_required,
        default=None if revision_required else "head",
        help="target revision" + ("" if revision_required else " (default: head)"),
    )
    parser.add_argument("--dry-run", action="store_true", help="print the SQL of the pending range; change nothing")
    parser.add_argument("--backup", action="store_true", help="back the database up before migrating")
    parser.add_argument("--skip-health-checks", action="store_true", help="skip the pre-flight checks")
    parser.add_argument("--skip-validation", action="store_true", help="skip the post-migration validation")
    arguments.confirmation_options(parser)
    parser.add_argument("--json-report", type=arguments.report_path, metavar="PATH",
                        help="also write the JSON report here")
    limits = parser.add_argument_group("limits (each: given, it wins over --env's policy)")
    limits.add_argument(
        "--guard-wait", "--lock-wait", dest="guard_wait", type=arguments.seconds, metavar="S",
        help="seconds to wait for the guard (one run per database, an advisory lock) while another migration "
        f"of this database runs (default: --env's policy, else {Settings.guard_wait_s:g}: fail at once; "
        "--lock-wait is its old name)",
    )
    arguments.lock_timeout_option(
        limits, "PostgreSQL lock_timeout for migration statements: how long each waits for a lock another "
                "session holds")
    limits.add_argument(
        "--statement-timeout", type=arguments.seconds, metavar="S",
        help="PostgreSQL statement_timeout for migration statements (default: --env's policy, else "
        f"{SessionLimits.statement_timeout_s:g} = none)",
    )
    limits.add_argument(
        "--lock-retries", type=arguments.lock_timeouts, default=LockRetries.timeouts_s, metavar="S,S,...",
        help="lock-safe execution: try the migration with these short lock_timeouts in turn (e.g. 0.1,0.5,1,2,5; "
        "the last repeats; replaces --lock-timeout), rolling back and pausing between attempts, so the "
        "application's queries never queue long behind a lock the migration waits for. Only a revision the "
        "failed attempt's rollback undid is tried again (default: --env's policy, else off: one attempt)",
    )
    limits.add_argument(
        "--lock-retry-pause", type=arguments.seconds, metavar="S",
        help=f"with --lock-retries: seconds between attempts (default: --env's policy, else {LockRetries.pause_s:g})",
    )
    limits.add_argument(
        "--lock-retry-total", type=arguments.seconds, metavar="S",
        help=f"with --lock-retries: give up after S seconds, naming the sessions that held the lock "
        f"(default: --env's policy, else {LockRetries.total_s:g})",
    )


def _upgrade_options(parser) -> None:
    parser.add_argument("--rehearse", action="store_true",
                        help="before asking for approval, back up, restore the backup into a scratch database and "
                             "run the revisions there first (implies --backup)")
    parser.add_argument("--expect-current", type=arguments.revision, metavar="REV",
                        help="refuse, changing nothing, unless the database is at REV (base: none) from the plan "
                             "until the guard is held: the revision a separately approved plan started from")
    parser.add_argument("--lint-level", choices=LINT_LEVELS,
                        help="lint findings at or above LEVEL stop the run before anything changes "
                             "(default: --env's policy; without --env they only warn)")


def cmd_migrate(args, settings: Settings, database: Database) -> int:
    from dbmigrate import pipeline  # here: the read-only commands do without it (docs/BENCHMARKS.md)

    target = database()
    policy = database.policy()
    rehearsed = getattr(args, "rehearse", False) or (args.command == "upgrade" and policy is not None
                                                     and policy.rehearse)
    if policy is not None and not args.dry_run:
        policy.check_command_line(target.environment, args.command, args.backup or rehearsed, "add --backup")
    request = pipeline.Request(
        operation=args.command,
        revision=args.revision,
        dry_run=args.dry_run,
        backup=args.backup or rehearsed,
        skip_health_checks=args.skip_health_checks,
        skip_validation=args.skip_validation,
        json_report=args.json_report,
        lint_blocking_level=getattr(args, "lint_level", None) or (policy.lint_blocking_level if policy else None),
        expect_current=getattr(args, "expect_current", None),
        rehearse=rehearsed,
        # db-migrate running this command line as a subprocess (flows/app_env.py) links the report to its run
        run_url=os.environ.get("DBMIGRATE_RUN_URL") or None,
    )

    def confirm(plan: phases.Plan) -> Approval:
        steps = "".join(f"\n  {step.revision}  {step.message}" for step in plan.steps)
        rehearsal = "".join(f"\n{line}" for line in rehearsal_lines(plan.rehearsal)) if plan.rehearsal else ""
        return approve(args, policy, target.environment, args.command,
                       f"{args.command} {target.where} ({target.environment}) "
                       f"from {revisions.shown(plan.revision_before)}:{steps}{rehearsal}",
                       f"apply {len(plan.steps)} revision(s)?")

    hooks = pipeline.Hooks(confirm=confirm, on_progress=print_progress,
                           require_approver=lambda: require_approver(args, policy, target.environment, args.command))
    outcome = pipeline.execute(target, settings, request, hooks)
    report = outcome.report
    if args.json:
        print_json({**report.as_dict(), "report_path": outcome.report_path, "sql": outcome.sql,
                    "report_error": outcome.report_error and str(outcome.report_error)})
    else:
        print_outcome(outcome)
    return finish(outcome, target, args.json)


def cmd_rehearse(args, settings: Settings, database: Database) -> int:
    """Take a backup, rehearse the pending revisions on a copy restored from it (pipeline.rehearse, which
    writes the report); the database is only read. Under --json, stdout is the rehearsal."""
    from dbmigrate import pipeline
    from dbmigrate.report import NOOP
    from dbmigrate.run import REHEARSE

    target = database()
    outcome = pipeline.rehearse(target, settings, pipeline.Request(REHEARSE, args.revision),
                                pipeline.Hooks(on_progress=print_progress))
    rehearsal, nothing_to_do = outcome.report.rehearsal, outcome.report.status == NOOP
    if args.json and (rehearsal or nothing_to_do):
        print_json(rehearsal and rehearsal.as_dict())
    elif not args.json:
        if rehearsal:
            print("\n".join(rehearsal_lines(rehearsal)))
        elif nothing_to_do:
            print(f"nothing to rehearse: database at {revisions.shown(outcome.report.revision_before)}")
        print(f"report:   {outcome.report_path or 'not written (see stderr)'}")
    return finish(outcome, target, False)  # stdout has the rehearsal, not the report


# --- the approval on the terminal ---------------------------------------------------------

def approve(args, policy: Policy | None, environment: str, operation: str, plan_text: str, question: str
            ) -> Approval:
    """Who approved this change: --approver NAME; --yes where the policy asks no approval;
    otherwise the operator on the terminal, by name where the policy requires an approval.
    On the command line the requester is the user running it (the report's operator)."""
    from dbmigrate.report import Approval

    by_name = policy is not None and policy.approval_required
    if args.approver:
        return _not_the_requester(policy, Approval(True, args.approver, "--approver"))
    if args.yes and not by_name:
        return Approval(True, getpass.getuser(), "--yes")
    require_approver(args, policy, environment, operation)
    print(plan_text)
    if input(f"{question} [y/N] ").strip().lower() not in ("y", "yes"):
        return Approval(False, getpass.getuser(), "terminal")
    if not by_name:
        return Approval(True, getpass.getuser(), "terminal")
    name = input("approver's name: ").strip()
    if not name:
        raise ConfirmationRefused(f"the policy of {environment} requires the approver's name: nothing was changed")
    return _not_the_requester(policy, Approval(True, name, "terminal"))


def _not_the_requester(policy: Policy | None, approval: Approval) -> Approval:
    if policy is not None:
        policy.check_approver(getpass.getuser(), approval.approver)
    return approval


def require_approver(args, policy: Policy | None, environment: str, operation: str) -> None:
    """Refuse a change nobody could approve: no --approver, no --yes where it is enough, no terminal."""
    by_name = policy is not None and policy.approval_required
    if args.approver or (args.yes and not by_name) or sys.stdin.isatty():
        return
    if by_name:
        raise ConfirmationRefused(f"the policy of {environment} requires an approval by name: "
                                  "pass --approver NAME (--yes is not enough) or run on a terminal")
    raise ConfirmationRefused(f"refusing to {operation} without confirmation: no terminal to ask on (pass --yes)")
