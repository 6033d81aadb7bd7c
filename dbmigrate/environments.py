"""Per-environment credentials from Prefect blocks. Imports Prefect, so only the
``--env`` path (and the flows) load this module."""

from __future__ import annotations

from dbmigrate.errors import ConfigError
from dbmigrate.target import DatabaseTarget


def load_credentials(name: str) -> DatabaseTarget:
    """The database of the DatabaseCredentials block named ``name``, in the environment the
    block records (by default its name): that environment's policy applies to it."""
    from pydantic import ValidationError

    from blocks import DatabaseCredentials

    try:
        block = DatabaseCredentials.load(name)
    except ValueError:
        raise ConfigError(
            f"no DatabaseCredentials block named '{name}' (create one, see README 'Environments')"
        ) from None
    except Exception as exc:
        if isinstance(exc.__cause__, ValidationError):  # Prefect wraps a document that does not validate
            error = exc.__cause__.errors()[0]
            field = ".".join(str(part) for part in error["loc"])
            raise ConfigError(f"DatabaseCredentials block '{name}' is invalid: {field}: {error['msg']}") from None
        # the API is down or unreachable: say so, in one line
        raise ConfigError(f"cannot load block '{name}' from the Prefect API: {type(exc).__name__}: {exc}") from None
    return DatabaseTarget(block.url(), block.environment or name)
