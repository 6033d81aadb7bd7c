"""What each environment allows: the rules the db-migrate flow enforces.

Production is strict by default: a backup is mandatory, the revisions are rehearsed on a
copy restored from it before anyone approves (production's data is where a revision fails
that passed everywhere else, and its locks are what the application waits behind), a human
approves in the Prefect UI, nothing rolls back on its own (an operator decides), and its schema
changes only through the db-migrate deployment, never from the command line, so
the Prefect run history stays the one audit trail. Development and staging roll
back automatically on failure. Any other environment name gets the production
rules: an unknown environment is treated as one that matters. An EnvironmentPolicy
block overrides these defaults (``blocks.load_policy``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal, get_args

from dbmigrate.errors import ConfigError, ConfirmationRefused
from dbmigrate.lockretry import LockRetries
from dbmigrate.migrate import SessionLimits

LintLevel = Literal["warning", "error"]  # squawk's levels, lowest first
LINT_LEVELS = get_args(LintLevel)


def _rule(default, title: str, description: str):
    """A policy field, with the title and description the EnvironmentPolicy block shows for it."""
    return field(default=default, metadata={"title": title, "description": description})


@dataclass(frozen=True)
class Policy:
    """An environment's rules, each declared once: the EnvironmentPolicy block (blocks/) is made
    from these fields. Where a run waits and how long, the defaults are the settings' own
    (``SessionLimits``, ``LockRetries``), so a run under no policy waits as under the defaults."""

    backup_required: bool = _rule(True, "Backup required", "Refuse runs with backup=false.")
    approval_required: bool = _rule(True, "Approval required", "Pause for a human's approval in the UI before migrating.")
    auto_rollback: bool = _rule(False, "Automatic rollback",
                                "Downgrade (or restore the backup) when migrate or validate fails.")
    approval_timeout_s: float = _rule(3600.0, "Approval timeout (s)",
                                      "Reject the run if nobody answers within this time.")
    approval_poll_s: int = _rule(5, "Approval poll interval (s)", "How often a paused run checks for an answer.")
    lock_timeout_s: float = _rule(SessionLimits.lock_timeout_s, "Lock timeout (s)",
                                  "PostgreSQL lock_timeout for migration statements.")
    statement_timeout_s: float = _rule(SessionLimits.statement_timeout_s, "Statement timeout (s)",
                                       "PostgreSQL statement_timeout for migration statements; 0 = none.")
    guard_wait_s: float = _rule(0.0, "Wait for a running migration (s)", "How long a second run waits before failing.")
    transient_retries: int = _rule(2, "Retries of connecting and uploading", "The migration itself is never retried.")
    retry_delay_s: float = _rule(10.0, "Delay between retries (s)",
                                 "Seconds between retries of connecting and uploading.")
    cli_changes_allowed: bool = _rule(
        False, "Schema changes from the command line",
        "Allow upgrade, downgrade and restore over the original from `dbmigrate --env`; "
        "off, they run only through the db-migrate deployment.")
    lock_retry_timeouts_s: tuple[float, ...] = _rule(  # lock-safe execution (dbmigrate.lockretry); () = off
        LockRetries.timeouts_s, "Lock retries: lock_timeout of each attempt (s)",
        "Lock-safe execution: short lock_timeouts tried in turn, e.g. 0.1, 0.5, 1, 2, 5 (the last "
        "repeats); an attempt that times out is rolled back and tried again. Empty: one attempt.")
    lock_retry_pause_s: float = _rule(LockRetries.pause_s, "Lock retries: pause between attempts (s)",
                                      "Seconds between an attempt that timed out and the next.")
    lock_retry_total_s: float = _rule(LockRetries.total_s, "Lock retries: give up after (s)",
                                      "Then the run fails naming the sessions that held the lock.")
    lint_blocks: bool = _rule(True, "Lint findings block the run",
                              "A squawk finding at or above the lint level stops an upgrade before anything changes; "
                              "off, findings are recorded and shown only.")
    lint_level: LintLevel = _rule("warning", "Lint level", "The lowest squawk level that blocks (warning or error).")
    rehearse: bool = _rule(
        True, "Rehearse on a restored copy",
        "Before approval, restore the run's backup into a scratch database and run the revisions "
        "there first: a failure there stops the run with the database untouched; the approval page "
        "shows each revision's duration and locks.")
    # None: the scratch databases are made beside the database, as its own role.
    scratch_server: str | None = _rule(
        None, "Scratch server (credentials block)",
        "Name of a DatabaseCredentials block: a server of the same PostgreSQL major version where "
        "the rehearsal, drift's replay and verify-restore make their scratch databases (its role needs CREATEDB), "
        "so that the database's own role needs no CREATEDB. Empty: beside the database.")
    approver_must_differ: bool = _rule(
        False, "Approver must differ from the requester",
        "Refuse an approval given by whoever asked for the run (its requested_by, the GitHub actor, "
        "or the run's creator in Prefect); a run that does not say who asked is refused.")

    def lock_retries(self) -> LockRetries:
        return LockRetries(tuple(self.lock_retry_timeouts_s), self.lock_retry_pause_s, self.lock_retry_total_s)

    @property
    def lint_blocking_level(self) -> str | None:
        """The level from which lint findings block a run; None: they only warn."""
        return self.lint_level if self.lint_blocks else None

    def check(self, backup: bool) -> None:
        if self.backup_required and not backup:
            raise ConfigError("this environment requires a backup before migrating: backup=false is refused")
        if self.rehearse and not backup:
            raise ConfigError("this environment rehearses on a copy restored from the run's backup: "
                              "backup=false is refused")

    def check_command_line(self, environment: str, operation: str, backed_up: bool, how_to_back_up: str) -> None:
        """Refuse, before anything is read or changed, a change from ``dbmigrate --env`` the policy forbids."""
        if not self.cli_changes_allowed:
            raise ConfigError(f"{environment} changes run through the db-migrate deployment: the policy of "
                              f"{environment} does not allow {operation} from the command line "
                              "(cli_changes_allowed is off)")
        if self.backup_required and not backed_up:
            raise ConfigError(f"the policy of {environment} requires a backup first: {how_to_back_up}")

    def check_requester(self, requested_by: str | None) -> None:
        """Where the approver must differ from the requester, a run must say who asked."""
        if self.approver_must_differ and not requested_by:
            raise ConfigError("this environment requires someone other than who asked for a run to approve it: "
                              "say who asks (requested_by)")

    def check_approver(self, requested_by: str | None, approver: str) -> None:
        """Refuse ``approver``'s approval of a run ``requested_by`` asked for where the approver must
        differ. A requester recorded as ``NAME (how)`` (the GitHub workflow's ``actor (GitHub Actions
        run N)``) is the person NAME."""
        if self.approver_must_differ and same_person(requested_by or "", approver):
            raise ConfirmationRefused(f"{approver} asked for this run and may not approve it too: this environment "
                                      "requires someone else to approve: nothing was changed")


def same_person(requested_by: str, approver: str) -> bool:
    def person(name: str) -> str:
        return name.split(" (", 1)[0].strip().casefold()

    return bool(person(approver)) and person(requested_by) == person(approver)


STRICT = Policy()
RELAXED = Policy(backup_required=False, approval_required=False, auto_rollback=True, cli_changes_allowed=True,
                 lint_blocks=False, rehearse=False)
# The environments a project deploys (a deployment of each flow, a database of the local stack each).
ENVIRONMENTS = ("development", "staging", "production")
DEFAULTS = {"production": STRICT, "staging": RELAXED, "development": RELAXED, "local": RELAXED}


def for_environment(name: str, **overrides) -> Policy:
    """The environment's default policy with any overrides (for example from a deployment's parameters)."""
    base = DEFAULTS.get(name, STRICT)
    unknown = set(overrides) - set(Policy.__dataclass_fields__)
    if unknown:
        raise ConfigError(f"unknown policy setting(s): {', '.join(sorted(unknown))}")
    if overrides.get("lint_level", base.lint_level) not in LINT_LEVELS:
        raise ConfigError(f"lint_level must be one of {', '.join(LINT_LEVELS)}: {overrides['lint_level']!r}")
    return replace(base, **overrides)
