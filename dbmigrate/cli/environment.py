"""Which database a command works on, and under which policy: ``--url`` or DATABASE_URL, ``--env NAME``
(a DatabaseCredentials block, and the environment's policy), else the embedded local database."""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

from dbmigrate import local
from dbmigrate.cli import arguments
from dbmigrate.errors import ConfigError, needs_prefect
from dbmigrate.policy import Policy
from dbmigrate.settings import Settings
from dbmigrate.target import DatabaseTarget, parse_url

# The commands an environment's policy governs under --env (restore: over the original; into a new
# database nothing existing changes). The others never load it: history's --env, for one, is only a name.
GOVERNED_COMMANDS = frozenset({"health", "drift", "rehearse", "backup", "upgrade", "downgrade", "lint", "restore"})
# Those that make scratch databases (upgrade and downgrade: their backup's verify-restore, the rehearsal),
# or look for abandoned ones (health): on the policy's scratch_server.
SCRATCH_COMMANDS = frozenset({"health", "drift", "rehearse", "backup", "upgrade", "downgrade"})


def resolve(url: str | None, env: str | None, home: Path) -> DatabaseTarget:
    """Which database a command works on, the same order for every command: ``--url`` or
    DATABASE_URL; ``--env NAME`` (the DatabaseCredentials block NAME); else the embedded
    local database under ``home``. Explicit sources must not conflict: a stray DATABASE_URL
    silently overriding ``--env production`` would be dangerous."""
    if url and env:
        raise ConfigError("give either --url or --env, not both")
    env_url = os.environ.get("DATABASE_URL")
    if env and env_url and not url:
        raise ConfigError(f"--env {env} was given but DATABASE_URL is also set: unset one of them")
    if url or env_url:
        return parse_url(url or env_url, os.environ.get("DBMIGRATE_ENVIRONMENT", "url"))
    if env:
        with needs_prefect("--env"):
            from blocks import load_target, require_api  # imports Prefect: only on this path

        require_api()
        return load_target(env)
    return local.target(home, on_start=lambda server: print(
        f"dbmigrate: started the embedded PostgreSQL in {server.data_dir} (it was not running; "
        "dbmigrate local stop stops it)", file=sys.stderr, flush=True))


class Database:
    """The database a command works on, resolved (the embedded one started) when the command first
    asks for it: ``heads``, ``generate`` without --autogenerate and ``local`` never do."""

    def __init__(self, args, home: Path):
        self._args, self._home = args, home
        self.target: DatabaseTarget | None = None
        self._policy: Policy | None = None

    def __call__(self) -> DatabaseTarget:
        if self.target is None:
            self.target = resolve(self._args.url, self._args.env, self._home)
        return self.target

    def policy(self) -> Policy | None:
        """With --env the environment's policy applies on the command line too; without, none does."""
        if not self._args.env:
            return None
        if self._policy is None:
            target = self()
            with needs_prefect("--env"):
                from blocks import load_policy  # imports Prefect: only on the --env path

            try:
                self._policy = load_policy(target.environment)
            except Exception as exc:  # the API went away since the credentials loaded: say so, in one line
                raise ConfigError(f"cannot load the policy of '{target.environment}' from the Prefect API: "
                                  f"{type(exc).__name__}: {exc}") from None
        return self._policy

    def redact(self, text: str) -> str:
        return self.target.redact(text) if self.target is not None else text


def governed(args, settings: Settings, database: Database) -> Settings:
    """With --env, a command the policy governs waits as the policy says where its options do not, and one
    of SCRATCH_COMMANDS makes its scratch databases on the policy's scratch_server block
    (DBMIGRATE_SCRATCH_URL, when set, wins)."""
    if args.command not in GOVERNED_COMMANDS or not args.env or getattr(args, "target_db", None):
        return settings
    policy = database.policy()
    settings = arguments.settings(args, policy)
    if args.command not in SCRATCH_COMMANDS or settings.scratch_server is not None or not policy.scratch_server:
        return settings
    from blocks import load_scratch_server  # imports Prefect: only on the --env path

    return dataclasses.replace(settings, scratch_server=load_scratch_server(policy))
