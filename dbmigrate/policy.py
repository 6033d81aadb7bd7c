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

from dataclasses import dataclass, replace

from dbmigrate.errors import ConfigError
from dbmigrate.lockretry import LockRetries

LINT_LEVELS = ("warning", "error")  # squawk's levels, lowest first


@dataclass(frozen=True)
class Policy:
    backup_required: bool = True
    approval_required: bool = True
    auto_rollback: bool = False
    approval_timeout_s: float = 3600.0
    approval_poll_s: int = 5
    lock_timeout_s: float = 10.0
    statement_timeout_s: float = 0.0
    guard_wait_s: float = 0.0
    transient_retries: int = 2  # connecting and uploading; the migration itself is never retried
    retry_delay_s: float = 10.0
    cli_changes_allowed: bool = False  # upgrade, downgrade and restore over the original from `dbmigrate --env`
    rehearse: bool = True  # run the revisions on a copy restored from the run's backup before approval and migrate
    lock_retry_timeouts_s: tuple[float, ...] = ()  # lock-safe execution (dbmigrate.lockretry); () = off
    lock_retry_pause_s: float = LockRetries.pause_s
    lock_retry_total_s: float = LockRetries.total_s
    lint_blocks: bool = True  # a lint finding at or above lint_level stops the run before anything changes
    lint_level: str = "warning"  # warning | error (squawk's levels)
    # The DatabaseCredentials block of a server of its own for the scratch databases of the rehearsal,
    # drift's replay and verify-restore (where the role may CREATE DATABASE); None: beside the database, as its own role.
    scratch_server: str | None = None
    approver_must_differ: bool = False  # whoever asked for a run may not approve it too

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


    def check_requester(self, requested_by: str | None) -> None:
        """Where the approver must differ from the requester, a run must say who asked."""
        if self.approver_must_differ and not requested_by:
            raise ConfigError("this environment requires someone other than who asked for a run to approve it: "
                              "say who asks (requested_by)")

    def refuses_approver(self, requested_by: str | None, approver: str) -> str | None:
        """Why ``approver`` may not approve a run ``requested_by`` asked for; None: they may. A
        requester recorded as ``NAME (how)`` (the GitHub workflow's ``actor (GitHub Actions run N)``)
        is the person NAME."""
        if self.approver_must_differ and same_person(requested_by or "", approver):
            return (f"{approver} asked for this run and may not approve it too: this environment requires "
                    "someone else to approve")
        return None


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
