"""Prefect blocks for dbmigrate, one block per concept.

Register the block types with ``prefect block register -m blocks``; then create one
``DatabaseCredentials`` document per environment (development, staging, production)
in the UI or in code. The block name is the environment name.
"""

from typing import Literal

from prefect.blocks.core import Block
from pydantic import Field, SecretStr
from sqlalchemy.engine import URL

from dbmigrate.target import DRIVER


class DatabaseCredentials(Block):
    """Connection details of one environment's PostgreSQL database."""

    _block_type_name = "dbmigrate Database Credentials"
    _block_type_slug = "dbmigrate-database-credentials"
    _description = "Host, database and credentials of the PostgreSQL database of one environment."

    host: str = Field(title="Host", description="Hostname or IP address of the PostgreSQL server.")
    port: int = Field(default=5432, ge=1, le=65535, title="Port", description="TCP port of the server.")
    database: str = Field(title="Database", description="Name of the database to migrate.")
    username: str = Field(title="Username", description="Role that owns the schema being migrated.")
    password: SecretStr = Field(title="Password", description="Password of that role. Stored encrypted, never logged.")
    sslmode: Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"] = Field(
        default="prefer", title="SSL mode", description="libpq sslmode for connections to this database."
    )
    connect_timeout: int = Field(
        default=10, ge=1, le=600, title="Connect timeout (s)", description="Seconds to wait for a connection."
    )

    def url(self) -> URL:
        """SQLAlchemy URL with the password; callers must not print it."""
        return URL.create(
            DRIVER,
            username=self.username,
            password=self.password.get_secret_value(),
            host=self.host,
            port=self.port,
            database=self.database,
            query={"sslmode": self.sslmode, "connect_timeout": str(self.connect_timeout)},
        )


__all__ = ["DatabaseCredentials"]
