"""Errors the user can act on. Each carries a one-line message; the CLI prints it
without a traceback and exits non-zero. Anything else escaping is a bug."""

from collections.abc import Iterator
from contextlib import contextmanager


class DbMigrateError(Exception):
    """Base for expected, user-facing failures."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class ConfigError(DbMigrateError):
    """Bad input: URL, alembic directory, option values, environment block."""


PREFECT_EXTRA = "pip install 'dbmigrate[prefect]'"


@contextmanager
def needs_prefect(what: str) -> Iterator[None]:
    """Around a lazy import of Prefect (or prefect-aws): where the plain command line is installed
    without them (``pip install dbmigrate``), ``what`` fails in one line naming the extra to install."""
    try:
        yield
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] not in ("prefect", "prefect_aws"):
            raise
        raise ConfigError(f"{what} needs Prefect, which is not installed here: {PREFECT_EXTRA}") from None


class ConnectionFailed(DbMigrateError):
    """The database could not be reached; `reason` says why in a few words."""

    def __init__(self, where: str, reason: str):
        super().__init__(f"cannot connect to {where}: {reason}")
        self.reason = reason


class ConnectionLost(ConnectionFailed):
    """The server went away (killed, restarted, network cut) while a session was open."""

    def __init__(self, where: str, reason: str = "server closed the connection"):
        DbMigrateError.__init__(self, f"lost the connection to {where}: {reason}")
        self.reason = reason


class LockWaitTimeout(DbMigrateError):
    """A query of the tool's own waited too long for a lock another session holds."""


class RevisionError(DbMigrateError):
    """Unknown, ambiguous or unreachable revision."""


class VersionTableAmbiguous(RevisionError):
    """alembic_version holds several rows: no changing command runs until a human fixes it."""


class UnknownRevision(RevisionError):
    """The database is at a revision the migration scripts do not know: nothing can be planned from it."""


class GuardBusy(DbMigrateError):
    """Another migration holds the per-database guard."""


class ConfirmationRefused(DbMigrateError):
    """The operator said no, or there was nobody to ask."""


class BackupFailed(DbMigrateError):
    """A backup could not be taken (none was recorded), read back or restored."""

    exit_code = 1


class StorageFailed(BackupFailed):
    """The backup storage (a directory or a bucket) could not be read or written."""


class DumpFailed(BackupFailed):
    """pg_dump failed; ``reason`` is its own account of why."""

    def __init__(self, reason: str):
        super().__init__(f"pg_dump failed: {reason}")
        self.reason = reason


class BackupUnreadable(BackupFailed):
    """A stored backup cannot be read back, or what is read back does not match its manifest."""


class RestoreFailed(BackupFailed):
    """pg_restore or psql failed, or a restore did not reproduce the backup's row counts."""


class MigrationFailed(DbMigrateError):
    """A phase of the pipeline failed after it started; the report says which."""

    exit_code = 1


class HealthFailed(DbMigrateError):
    """A health check failed: before a run (nothing was changed), or in db-health."""

    exit_code = 1


class ValidationFailed(DbMigrateError):
    """The checks after a migration failed: the database is not where the run was to leave it."""

    exit_code = 1


class DatabaseMoved(DbMigrateError):
    """The database is not at the revision the approved plan started from: nothing was changed."""

    exit_code = 1


class RehearsalFailed(MigrationFailed):
    """A revision failed on the restored copy: the real database was never touched."""


class OutsideTheCopy(MigrationFailed):
    """A revision run on a scratch copy changed the real database or its server's shared objects."""


class DriftNotChecked(DbMigrateError):
    """The schema the migrations build could not be made to compare with: replaying them failed."""


class ReportNotWritten(DbMigrateError):
    """The run's report could not be written (a full disk, a bad path); ``written`` is
    where it was written after all, if anywhere."""

    exit_code = 3

    def __init__(self, message: str, written=None):
        super().__init__(message)
        self.written = written


def first_line(exc: BaseException) -> str:
    """The line of an error worth showing: the database's own message, not SQLAlchemy's wrapping."""
    return (str(getattr(exc, "orig", None) or exc).strip().splitlines() or [type(exc).__name__])[0]


class StepFailed(MigrationFailed):
    """A revision failed; ``applied`` lists the steps the database kept (unknown when
    ``kept_unknown``), ``blamed`` says which failed, ``attempts`` the lock-retry attempts made."""

    def __init__(self, message: str, applied: list, blamed: str = "", attempts: list | None = None,
                 kept_unknown: bool = False):
        super().__init__(message)
        self.applied, self.blamed, self.kept_unknown = applied, blamed, kept_unknown
        self.attempts = attempts or []


class LockRetriesExhausted(StepFailed):
    """A revision could not get its lock within the lock-retry schedule, or may not be retried."""

    def __init__(self, message: str, applied: list, attempts: list):
        super().__init__(message, applied, attempts=attempts)
