"""Where state lives and how long to wait: the same for every command and flow.

The environment's defaults (``DBMIGRATE_HOME``, ``DBMIGRATE_BACKUP_STORAGE``) are read in
one place, :meth:`Settings.from_env`; the command line and the flows build on it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from dbmigrate import db, revisions
from dbmigrate.backup import DumpOptions
from dbmigrate.errors import ConfigError
from dbmigrate.lockretry import LockRetries
from dbmigrate.migrate import SessionLimits
from dbmigrate.policy import Policy
from dbmigrate.revisions import Project
from dbmigrate.storage import Storage, local_directory, open_storage
from dbmigrate.target import DatabaseTarget, parse_url

HOME_VARIABLE, DEFAULT_HOME = "DBMIGRATE_HOME", ".dbmigrate"
STORAGE_VARIABLE = "DBMIGRATE_BACKUP_STORAGE"
SCRATCH_VARIABLE = "DBMIGRATE_SCRATCH_URL"


@dataclass(frozen=True)
class Settings:
    """Where state lives and how long to wait; the same for every command."""

    home: Path
    alembic_config: str | None = None
    connect_timeout: float = db.DEFAULT_CONNECT_TIMEOUT
    guard_wait_s: float = 0.0
    limits: SessionLimits = field(default_factory=SessionLimits)
    storage_spec: str | None = None  # None: <home>/backups; a directory; or s3-bucket/BLOCK
    dump: DumpOptions = field(default_factory=DumpOptions)
    project_logging: bool = True  # let the project's env.py configure logging (see revisions.load)
    lock_retries: LockRetries = field(default_factory=LockRetries)
    # Where the rehearsal, drift's replay and verify-restore make their scratch databases; None: beside the database.
    scratch_server: DatabaseTarget | None = None

    def __post_init__(self) -> None:
        # statement_timeout counts a statement's lock wait too: one that ends first cancels the wait
        # (SQLSTATE 57014, not a lock failure, so never retried) and the schedule's longer waits never happen.
        longest = max(self.lock_retries.timeouts_s, default=0.0)
        statement = self.limits.statement_timeout_s
        if statement and statement <= longest:
            raise ConfigError(f"a statement_timeout of {statement:g}s would cancel a statement waiting for its lock "
                              f"before the lock-retry schedule's lock_timeout of {longest:g}s ends, and that is not "
                              f"retried: give a statement_timeout above {longest:g}s, or 0 (none)")

    @classmethod
    def from_env(cls, **overrides) -> Settings:
        """Settings with the environment's defaults: home from DBMIGRATE_HOME (else .dbmigrate),
        storage from DBMIGRATE_BACKUP_STORAGE (else <home>/backups), the scratch server from
        DBMIGRATE_SCRATCH_URL (else none: beside the database). An override that is None
        or empty (an option or parameter not given) leaves the default in place."""
        given = {name: value for name, value in overrides.items() if value is not None and value != ""}
        defaults = {"home": Path(os.environ.get(HOME_VARIABLE, DEFAULT_HOME)),
                    "storage_spec": os.environ.get(STORAGE_VARIABLE),
                    "scratch_server": _scratch_server()}
        return cls(**{**defaults, **given})

    @classmethod
    def under_policy(cls, policy: Policy, **overrides) -> Settings:
        """``from_env`` for a run under an environment's policy: it waits as the policy says (the guard
        wait, the lock and statement timeouts, the lock-retry schedule). The flows and ``dbmigrate --env``
        both derive their settings here."""
        return cls.from_env(guard_wait_s=policy.guard_wait_s,
                            limits=SessionLimits(policy.lock_timeout_s, policy.statement_timeout_s),
                            lock_retries=policy.lock_retries(), **overrides)

    @property
    def backup_dir(self) -> Path | None:
        """The local directory backups go to; None when they go to S3."""
        return local_directory(self.storage_spec, self.home)

    def storage(self) -> Storage:
        return open_storage(self.storage_spec, self.home)

    @property
    def reports_dir(self) -> Path:
        return self.home / "reports"

    def project(self, target: DatabaseTarget | None = None) -> Project:
        return revisions.load(self.alembic_config, target, self.connect_timeout, self.project_logging)


def _scratch_server() -> DatabaseTarget | None:
    raw = os.environ.get(SCRATCH_VARIABLE)
    if not raw:
        return None
    try:
        return parse_url(raw, "scratch")
    except ConfigError as exc:
        raise ConfigError(f"{SCRATCH_VARIABLE}: {exc}") from None
