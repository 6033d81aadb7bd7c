"""The commands of backups: backup, backups list|prune, restore."""

from __future__ import annotations

import dataclasses
import sys
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from dbmigrate import backup, catalogue, revisions
from dbmigrate.cli import arguments
from dbmigrate.cli.environment import Database
from dbmigrate.cli.migrate import approve, require_approver
from dbmigrate.cli.render import finish, print_json, print_progress
from dbmigrate.settings import Settings

if TYPE_CHECKING:
    from dbmigrate.report import Approval


def register(commands: arguments.Commands) -> None:
    arguments.dump_options(commands.add("backup", "pg_dump the database into the backup storage, verified, with a "
                                                  "manifest", cmd_backup))
    restoring = commands.add("restore", "restore a backup into a new database (--target-db) or over the original",
                             cmd_restore)
    restoring.add_argument("backup_id", metavar="BACKUP_ID", help="as shown by 'dbmigrate backups list'")
    restoring.add_argument("--target-db", metavar="NAME", help="restore into this new database instead")
    restoring.add_argument("--no-safety-backup", action="store_true",
                           help="over the original: do not back up its current state first")
    restoring.add_argument("--jobs", "-j", type=arguments.jobs, default=1, metavar="N",
                           help="into a new database: restore a directory-format backup with N parallel jobs")
    arguments.confirmation_options(restoring)
    arguments.lock_timeout_option(
        restoring, "over the original: PostgreSQL lock_timeout for the restore's statements: give up when a lock is "
                   "not granted within S seconds, rather than queue the application's queries behind it")
    actions = commands.add_group("backups", "list or prune the backups of a database", cmd_backups,
                                 "backups_command")
    actions.add_parser("list", parents=[commands.common], help="valid backups, newest first",
                       description="valid backups (with a manifest), newest first")
    prune = actions.add_parser("prune", parents=[commands.common], help="delete old backups",
                               description="delete old backups; the newest verified one is always kept")
    prune.add_argument("--keep-last", type=int, required=True, metavar="N", help="keep the newest N backups")
    prune.add_argument("--keep-days", type=arguments.days, metavar="D",
                       help="and keep every backup younger than D days")
    prune.add_argument("--dry-run", action="store_true", help="show what would be deleted")


def cmd_backup(args, settings: Settings, database: Database) -> int:
    target = database()
    manifest = backup.take(target, settings.storage(), settings.dump, print_progress, settings.connect_timeout,
                           settings.scratch_server)
    if args.json:
        print_json(dataclasses.asdict(manifest))
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
            print_json([b.as_dict() for b in listing.backups] + [s.as_dict() for s in listing.skipped])
        elif not listing.backups:
            print(f"no backups of {target.environment}/{target.database} in {storage!r}")
        for b in [] if args.json else listing.backups:
            print(_manifest_line(b))
        return 0
    doomed = catalogue.prune(storage, target, args.keep_last, args.keep_days, dry_run=args.dry_run, listing=listing)
    if args.json:
        print_json([m.id for m in doomed])
    for m in [] if args.json else doomed:
        print(f"{'would delete' if args.dry_run else 'deleted'} {m.id}")
    if not doomed and not args.json:
        print("nothing to prune")
    return 0


def cmd_restore(args, settings: Settings, database: Database) -> int:
    """A backup restored over the database or into a new one (pipeline.restore, which writes the report)."""
    from dbmigrate import pipeline  # here: the read-only commands do without it (docs/BENCHMARKS.md)
    from dbmigrate.restore import RestorePlan
    from dbmigrate.run import RESTORE

    target = database()
    policy = None if args.target_db else database.policy()  # a new database: nothing existing changes
    operation = "restore over the database"
    if policy is not None:
        policy.check_command_line(target.environment, "restore over the original", not args.no_safety_backup,
                                  "drop --no-safety-backup")

    def confirm(plan: RestorePlan) -> Approval:
        approval = approve(args, policy, target.environment, operation,
                           f"restore {target.where} ({target.environment}) from backup {plan.manifest.id} "
                           f"(revision {revisions.shown(plan.manifest.revision)}):",
                           "replace the contents of the database with this backup?")
        if approval.approved:
            print(f"restore approved by {approval.approver} ({approval.via})")
        return approval

    request = pipeline.Request(RESTORE, args.backup_id, backup=not args.no_safety_backup,
                               new_database=args.target_db, jobs=args.jobs)
    hooks = pipeline.Hooks(confirm=confirm, on_progress=print_progress,
                           require_approver=lambda: require_approver(args, policy, target.environment, operation))
    outcome = pipeline.restore(target, settings, request, hooks)
    restored = outcome.report.restore
    if outcome.error is None:
        if restored.safety_backup:
            print(f"safety backup of the previous state: {restored.safety_backup}")
        print(f"restored {restored.backup_id} "
              + (f"into new database {restored.new_database}" if restored.new_database else f"over {target.where}"))
    print(f"report:   {outcome.report_path or 'not written (see stderr)'}")
    return finish(outcome, target, False)


def _age(created) -> str:
    seconds = (datetime.now(timezone.utc) - created).total_seconds()
    for unit, length in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= length:
            return f"{seconds / length:.0f}{unit}"
    return f"{seconds:.0f}s"


def _manifest_line(listed: catalogue.Listed) -> str:
    from dbmigrate.health import human_bytes

    m = listed.manifest
    return (f"{m.id:32} {human_bytes(m.size_bytes):>10}  {revisions.shown(m.revision):12} {_age(m.created):>5}  "
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
