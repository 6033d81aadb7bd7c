"""Per-environment credentials from Prefect blocks. Imports Prefect, so only the
``--env`` path (and the flows) load this module."""

from __future__ import annotations

from dbmigrate.errors import ConfigError
from dbmigrate.target import DatabaseTarget


def load_credentials(name: str) -> DatabaseTarget:
    """The DatabaseCredentials block named ``name``; the block name is the environment."""
    from blocks import DatabaseCredentials

    try:
        block = DatabaseCredentials.load(name)
    except ValueError:
        raise ConfigError(
            f"no DatabaseCredentials block named '{name}' (create one, see README 'Environments')"
        ) from None
    except Exception as exc:  # the API is down or unreachable: say so, in one line
        raise ConfigError(f"cannot load block '{name}' from the Prefect API: {type(exc).__name__}: {exc}") from None
    return DatabaseTarget(block.url(), name)
