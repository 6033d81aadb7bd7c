"""The ``DatabaseFleet`` block: the databases of one environment that one migration project
migrates together, and loading it as the plain members :mod:`dbmigrate.fleet` works with
(:func:`load_fleet`).

A fleet's members are either ``DatabaseCredentials`` block names (``members``), or one
credentials block (``credentials``: host, user, password) with the database names listed
(``databases``) or selected on that server when the fleet runs (``query``). Named
``<environment>-fleet`` by default, like the environment's ``<env>-backups`` and ``<env>-aws``.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from prefect.blocks.core import Block
from prefect.client.schemas.objects import BlockDocument
from pydantic import Field, ValidationError
from sqlalchemy import text

from blocks import DOCUMENTATION_URL, ENVIRONMENT_NAME, DatabaseCredentials, target_of
from dbmigrate import db
from dbmigrate.errors import ConfigError, DbMigrateError, first_line
from dbmigrate.fleet import Member, require_distinct
from dbmigrate.target import DatabaseTarget

IDENTIFIER_BYTES = 63  # PostgreSQL's NAMEDATALEN - 1
QUERY_TIMEOUT_S = 30  # the selecting query runs read-only and is cancelled after this


class DatabaseFleet(Block):
    """The databases of one environment migrated together by db-migrate-fleet: canary first, then in waves."""

    _block_type_name = "dbmigrate Database Fleet"
    _block_type_slug = "dbmigrate-database-fleet"
    _description = ("The databases (a database per tenant, shard or region) of one environment that one migration "
                    "project migrates together: a canary first, then health-gated waves.")
    _documentation_url = DOCUMENTATION_URL

    environment: str = Field(
        pattern=ENVIRONMENT_NAME, title="Environment",
        description="The environment of every member: its policy applies, and a member recorded in another "
                    "environment (or another environment's database) is refused before anything runs.")
    members: list[str] | None = Field(
        default=None, title="Members (credentials blocks)",
        description="DatabaseCredentials block names, one per member, in order. Or leave empty and give "
                    "Credentials with Databases or Query.")
    credentials: str | None = Field(
        default=None, title="Credentials (one server)",
        description="A DatabaseCredentials block (host, user, password) for members that are databases on one "
                    "server; its own database is where the Query runs.")
    databases: list[str] | None = Field(
        default=None, title="Databases", description="The members' database names on that server, in order.")
    query: str | None = Field(
        default=None, title="Query selecting the databases",
        description="SQL run read-only on that server when the fleet runs; its first column is the database names, "
                    "in order. E.g. select datname from pg_database where datname like 'tenant\\_%' order by 1")
    canary: list[str] = Field(
        default_factory=list, title="Canary",
        description="Members migrated first, in this order, before any wave (the fleet's canary count "
                    "takes the first ones of the fleet's order).")
    labels: dict[str, str] = Field(default_factory=dict, title="Labels",
                                   description="Free labels shown with the fleet (team, region...).")
    skip_unreachable: bool = Field(
        default=False, title="Skip unreachable members",
        description="Off: a member that cannot be reached stops the fleet before anything runs. On: it is "
                    "reported as not started, with why, and the others run.")


def fleet_block_name(environment: str) -> str:
    return f"{environment}-fleet"


def load_fleet_block(environment: str, name: str | None = None) -> DatabaseFleet:
    """The fleet block (``<environment>-fleet`` unless named), refused if it records another environment."""
    name = name or fleet_block_name(environment)
    try:
        block = DatabaseFleet.load(name)
    except ValueError:
        raise ConfigError(f"no DatabaseFleet block named '{name}' (create one, see docs/FLEETS.md)") from None
    except Exception as exc:  # the API is down, or the document does not validate: one line
        raise ConfigError(f"cannot load fleet block '{name}': {type(exc).__name__}: {first_line(exc)}") from None
    if block.environment != environment:
        raise ConfigError(f"the {environment} fleet refuses block '{name}': it is the {block.environment} fleet")
    return block


def load_fleet(environment: str, name: str | None = None) -> list[Member]:
    """The fleet's members, canary first, each a database of ``environment``; refused in one line
    before anything runs: a member of another environment, another environment's database, a
    database named twice, a query selecting nobody."""
    label = name or fleet_block_name(environment)
    # The fleet block and, in one call beside it, every credentials block: a fleet of 100 member
    # blocks is two API calls, not a hundred loads.
    with ThreadPoolExecutor(max_workers=1) as beside:
        reading = beside.submit(_credentials_documents)
        block = load_fleet_block(environment, name)
        documents = reading.result()
    members = _members(block, label, documents)
    if not members:
        raise ConfigError(f"fleet '{label}' has no member")
    foreign = _other_environments_databases(environment, documents)
    for member in members:
        if other := foreign.get(_location(member.target)):
            raise ConfigError(f"the {environment} fleet refuses member '{member.name}': it is the {other} "
                              f"database ({member.target.where})")
    require_distinct(members)
    return _canary_first(members, block.canary, label)


def _members(block: DatabaseFleet, label: str, documents: dict[str, BlockDocument]) -> list[Member]:
    sources = [field for field in ("members", "databases", "query") if getattr(block, field)]
    if len(sources) != 1 or (block.members and block.credentials) or (not block.members and not block.credentials):
        raise ConfigError(f"fleet '{label}' must give either members (credentials block names), or credentials "
                          "with databases or with query")
    if block.members:
        return [Member(name, _of_environment(_target(documents, name), block.environment, name))
                for name in block.members]
    server = _of_environment(_target(documents, block.credentials), block.environment, block.credentials)
    names = block.databases or _selected(server, block.query, label)
    for database in names:
        if problem := unusable_database_name(database):
            raise ConfigError(f"fleet '{label}': database name {database!r} {problem}")
    return [Member(database, server.with_database(database)) for database in names]


def _credentials_documents() -> dict[str, BlockDocument]:
    from prefect.client.orchestration import get_client

    try:
        with get_client(sync_client=True) as client:
            documents = client.read_block_documents_by_type(DatabaseCredentials.get_block_type_slug(),
                                                            include_secrets=True)
    except Exception as exc:  # the API is down, or no credentials block type was ever registered: one line
        raise ConfigError(f"cannot read the DatabaseCredentials blocks: {type(exc).__name__}: "
                          f"{first_line(exc)}") from None
    return {document.name: document for document in documents if document.name and not document.is_anonymous}


def _target(documents: dict[str, BlockDocument], name: str) -> DatabaseTarget:
    if name not in documents:
        raise ConfigError(f"no DatabaseCredentials block named '{name}' (named by the fleet)")
    try:
        block = DatabaseCredentials._from_block_document(documents[name])
    except ValidationError as exc:
        error = exc.errors()[0]
        raise ConfigError(f"DatabaseCredentials block '{name}' is invalid: "
                          f"{'.'.join(map(str, error['loc']))}: {error['msg']}") from None
    return target_of(block, name)


def _of_environment(target: DatabaseTarget, environment: str, block: str) -> DatabaseTarget:
    if target.environment != environment:
        raise ConfigError(f"the {environment} fleet refuses member '{block}': it is the {target.environment} "
                          f"database ({target.where})")
    return target


def _selected(server: DatabaseTarget, query: str, label: str) -> list[str]:
    """The database names the fleet's query selects now, read-only and time-bound."""
    try:
        with db.connect(server, QUERY_TIMEOUT_S) as conn:
            conn.execute(text("SET TRANSACTION READ ONLY"))
            conn.execute(text(f"SET LOCAL statement_timeout = {QUERY_TIMEOUT_S * 1000}"))
            names = [row[0] for row in db.execute_literal(conn, query)]
            conn.rollback()
    except DbMigrateError as exc:
        raise ConfigError(f"fleet '{label}': its query could not run: {server.redact(first_line(exc))}") from None
    except Exception as exc:  # the query itself is wrong: the server's one line
        message = first_line(getattr(exc, "orig", None) or exc)
        raise ConfigError(f"fleet '{label}': its query failed: {server.redact(message)}") from None
    if not names:
        raise ConfigError(f"fleet '{label}': its query selected no database: nothing was run")
    if not all(isinstance(name, str) for name in names):
        raise ConfigError(f"fleet '{label}': its query's first column must be database names (text)")
    return names


def unusable_database_name(name: str) -> str | None:
    if not name or not name.isprintable():
        return "is empty or holds a control character"
    if "?" in name:  # SQLAlchemy's URL string would read the rest as connection options
        return "holds a '?', which dbmigrate cannot pass in a connection URL"
    size = len(name.encode())
    return f"is {size} bytes long: PostgreSQL names are at most {IDENTIFIER_BYTES}" if size > IDENTIFIER_BYTES else None


def _location(target: DatabaseTarget) -> tuple[str, int, str]:
    return target.host, target.port, target.database


def _other_environments_databases(environment: str, documents: dict[str, BlockDocument]
                                  ) -> dict[tuple[str, int, str], str]:
    """host, port, database -> environment, of every credentials block of another environment:
    a fleet may not reach into another environment's database, even through its own credentials."""
    found = {}
    for name, document in documents.items():
        data = document.data
        owner = data.get("environment") or name
        if owner != environment and data.get("host") and data.get("database"):
            found[(data["host"], int(data.get("port") or 5432), data["database"])] = owner
    return found


def _canary_first(members: list[Member], canary: list[str], label: str) -> list[Member]:
    by_name = {member.name: member for member in members}
    if unknown := [name for name in canary if name not in by_name]:
        raise ConfigError(f"fleet '{label}': canary {', '.join(map(repr, unknown))} is not a member")
    first = [by_name[name] for name in dict.fromkeys(canary)]
    return first + [member for member in members if member.name not in set(canary)]


__all__ = ["DatabaseFleet", "fleet_block_name", "load_fleet", "load_fleet_block", "unusable_database_name"]
