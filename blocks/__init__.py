"""Prefect blocks for dbmigrate, one block per concept, and loading them as the plain
objects dbmigrate works with (:func:`load_target`, :func:`load_policy`).

Register the block types with ``prefect block register -m blocks``; then create one
``DatabaseCredentials`` document per environment (development, staging, production)
in the UI, in code or from variables (``dbmigrate blocks sync --env NAME --from-env``,
:mod:`blocks.sync`), named after the environment or recording it in ``environment``:
the policy, tags, artifacts and concurrency limit of a run follow the database's
environment, and a deployment for one environment refuses another's database.
"""

import dataclasses
from typing import Literal, get_args, get_origin, get_type_hints

from prefect.blocks.core import Block
from pydantic import BaseModel, Field, SecretStr, ValidationError, create_model
from sqlalchemy.engine import URL

from dbmigrate.errors import ConfigError, first_line
from dbmigrate.policy import Policy, for_environment
from dbmigrate.target import DRIVER, DatabaseTarget

# Environment names become tags, artifact keys, concurrency-limit names and backup paths.
ENVIRONMENT_NAME = r"^[a-z0-9][a-z0-9_-]{0,62}$"
# Where the UI sends a reader of these blocks: docs/ENVIRONMENTS.md, "Environments (Prefect blocks)".
# The project has no public home yet: set the real repository here when it has one.
DOCUMENTATION_URL = "https://github.com/dbmigrate/dbmigrate/blob/main/docs/ENVIRONMENTS.md#environments-prefect-blocks"


class DatabaseCredentials(Block):
    """Connection details of one environment's PostgreSQL database."""

    _block_type_name = "dbmigrate Database Credentials"
    _block_type_slug = "dbmigrate-database-credentials"
    _description = "Host, database and credentials of the PostgreSQL database of one environment."
    _documentation_url = DOCUMENTATION_URL

    host: str = Field(title="Host", description="Hostname or IP address of the PostgreSQL server, or the "
                                                "directory of its unix socket (an absolute path).")
    port: int = Field(default=5432, ge=1, le=65535, title="Port", description="TCP port of the server.")
    database: str = Field(title="Database", description="Name of the database to migrate.")
    username: str = Field(title="Username", description="Role that owns the schema being migrated.")
    password: SecretStr | None = Field(
        default=None, title="Password",
        description="Password of that role; empty for a server that trusts it. Stored encrypted, never logged.")
    sslmode: Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"] = Field(
        default="prefer", title="SSL mode", description="libpq sslmode for connections to this database."
    )
    connect_timeout: int = Field(
        default=10, ge=1, le=600, title="Connect timeout (s)", description="Seconds to wait for a connection."
    )
    environment: str | None = Field(
        default=None, pattern=ENVIRONMENT_NAME, title="Environment",
        description="The environment this database belongs to (development, staging, production...): its policy "
                    "applies, and only that environment's deployments may change it. Empty: the block's name.",
    )

    def url(self) -> URL:
        """SQLAlchemy URL with the password; callers must not print it. A socket directory goes
        where libpq takes it, ``?host=``: in the URL's host place it would be parsed as a path."""
        socket = self.host.startswith("/")
        return URL.create(
            DRIVER,
            username=self.username,
            password=(self.password.get_secret_value() if self.password else None) or None,
            host=None if socket else self.host,
            port=self.port,
            database=self.database,
            query={**({"host": self.host} if socket else {}), "sslmode": self.sslmode,
                   "connect_timeout": str(self.connect_timeout)},
        )


def _policy_overrides() -> type[BaseModel]:
    """A field per field of ``Policy``, with its title and description; None (not set): the
    environment's default. A tuple is shown as a list, the form the UI edits."""
    types = get_type_hints(Policy)
    fields = {}
    for rule in dataclasses.fields(Policy):
        kind = types[rule.name]
        kind = list[get_args(kind)[0]] if get_origin(kind) is tuple else kind
        fields[rule.name] = (kind | None, Field(default=None, **rule.metadata))
    return create_model("PolicyOverrides", **fields)


class EnvironmentPolicy(Block, _policy_overrides()):
    """Overrides of an environment's migration policy (see dbmigrate.policy for the fields and their
    defaults: production strict, development and staging with automatic rollback). Name it after the
    environment."""

    _block_type_name = "dbmigrate Environment Policy"
    _block_type_slug = "dbmigrate-environment-policy"
    _description = "What db-migrate requires and allows in one environment."
    _documentation_url = DOCUMENTATION_URL


def require_api() -> str:
    """The Prefect API this process talks to, checked to answer. Without PREFECT_API_URL Prefect
    would start a throw-away server of its own (some 15 s) and then find no blocks in it."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise ConfigError("no Prefect API: set PREFECT_API_URL (your server's, or the one `dbmigrate local up` "
                          "prints)")
    with get_client(sync_client=True) as client:
        error = client.api_healthcheck()
    if error is not None:
        raise ConfigError(f"the Prefect API at {url} is unreachable: {first_line(error)}")
    return url


def load_target(name: str) -> DatabaseTarget:
    """The database of the DatabaseCredentials block named ``name``, in the environment the
    block records (by default its name): that environment's policy applies to it."""
    try:
        block = DatabaseCredentials.load(name)
    except ValueError:
        raise ConfigError(
            f"no DatabaseCredentials block named '{name}' "
            "(create one, see docs/ENVIRONMENTS.md#environments-prefect-blocks)"
        ) from None
    except Exception as exc:
        if isinstance(exc.__cause__, ValidationError):  # Prefect wraps a document that does not validate
            error = exc.__cause__.errors()[0]
            field = ".".join(str(part) for part in error["loc"])
            raise ConfigError(f"DatabaseCredentials block '{name}' is invalid: {field}: {error['msg']}") from None
        # the API is down or unreachable: say so, in one line
        raise ConfigError(f"cannot load block '{name}' from the Prefect API: {type(exc).__name__}: {exc}") from None
    return target_of(block, name)


def target_of(block: DatabaseCredentials, name: str) -> DatabaseTarget:
    """The database of the credentials block saved as ``name``, in the environment it records (else its name)."""
    return DatabaseTarget(block.url(), block.environment or name)


def load_scratch_server(policy: Policy) -> DatabaseTarget | None:
    """The server the policy's ``scratch_server`` block names, if it names one."""
    return load_target(policy.scratch_server) if policy.scratch_server else None


def environments() -> list[str]:
    """The names of the DatabaseCredentials blocks: every environment, for `dbmigrate overview`; but
    a block an EnvironmentPolicy names as its ``scratch_server``, which holds no migrated database."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import PrefectHTTPStatusError

    with get_client(sync_client=True) as client:
        documents = client.read_block_documents_by_type(DatabaseCredentials.get_block_type_slug(),
                                                        include_secrets=False)
        try:
            policies = client.read_block_documents_by_type(EnvironmentPolicy.get_block_type_slug(),
                                                           include_secrets=False)
        except PrefectHTTPStatusError as exc:
            if exc.response.status_code != 404:  # 404: the type is not registered, so no policy names one
                raise
            policies = []
    scratch_servers = {p.data.get("scratch_server") for p in policies}
    return sorted(d.name for d in documents if d.name and not d.is_anonymous and d.name not in scratch_servers)


def load_policy(environment: str) -> Policy:
    """The environment's default policy with the EnvironmentPolicy block of that name applied."""
    try:
        block = EnvironmentPolicy.load(environment)
    except ValueError:  # no block of that name: the defaults
        return for_environment(environment)
    overrides = {k: getattr(block, k) for k in Policy.__dataclass_fields__ if getattr(block, k) is not None}
    return for_environment(environment, **overrides)


__all__ = ["DatabaseCredentials", "EnvironmentPolicy", "environments", "load_policy", "load_scratch_server",
           "load_target", "require_api", "target_of"]
