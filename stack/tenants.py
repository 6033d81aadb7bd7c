"""``dbmigrate local up --fleet N``: N tenant databases per environment on the embedded PostgreSQL,
each a copy of one template at the sample schema's revision 0004 with some rows (the fleet then
applies 0005, which converts those rows, and 0006), and the query each environment's
``DatabaseFleet`` block selects them with.

The development fleet is ``tenant_001``…, staging's ``staging_tenant_001``…, production's
``production_tenant_001``…: an environment's fleet never names another's database. The
template, ``fleet_template``, is made once (migrated in-process, filled, then marked by its
comment: an unmarked one, left by an interrupted ``up``, is made again); the tenants are
``CREATE DATABASE … TEMPLATE`` copies of it, the missing ones only.
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import text

from dbmigrate import db, revisions
from dbmigrate.errors import ConfigError
from dbmigrate.local import LocalServer
from dbmigrate.target import DatabaseTarget

TEMPLATE = "fleet_template"
TEMPLATE_MARKER = "dbmigrate local fleet template: the tenants' copy source"
TENANT_REVISION = "0004"  # the sample schema's: cost_usd in dollars, which 0005 converts to cents
MAX_TENANTS = 999
DEMO_ENVIRONMENT = "development"  # whose tenants are plain tenant_NNN (`make demo`, the benchmark)
# Some rows per tenant, in the sample schema at TENANT_REVISION: a few accounts, their resources, their costs.
ROWS = (
    "INSERT INTO accounts (id, name, provider, external_id) "
    "SELECT g, 'account ' || g, 'aws', md5(g::text) FROM generate_series(1, 5) g",
    "INSERT INTO cloud_resources (id, account_id, resource_type, region, name) "
    "SELECT g, 1 + g % 5, 'ec2', 'eu-west-1', 'vm-' || g FROM generate_series(1, 50) g",
    "INSERT INTO cost_records (id, resource_id, usage_date, cost_usd) "
    "SELECT g, 1 + g % 50, date '2026-01-01' + (g % 300), round((random() * 100)::numeric, 2) "
    "FROM generate_series(1, 500) g",
)


def tenant_prefix(environment: str) -> str:
    return "tenant_" if environment == DEMO_ENVIRONMENT else f"{environment}_tenant_"


def tenant_names(environment: str, count: int) -> list[str]:
    return [f"{tenant_prefix(environment)}{number:03d}" for number in range(1, count + 1)]


def selecting_query(environment: str) -> str:
    """The SQL the environment's fleet block selects its tenants with (``_`` is LIKE's any-character)."""
    pattern = tenant_prefix(environment).replace("_", "\\_")
    return f"select datname from pg_database where datname like '{pattern}%' order by datname"


def ensure_tenants(server: LocalServer, checkout: Path, environments: tuple[str, ...], count: int) -> str:
    """Each environment's ``count`` tenants, made where missing; what was done, in one line."""
    if not 1 <= count <= MAX_TENANTS:
        raise ConfigError(f"--fleet takes 1 to {MAX_TENANTS} tenants per environment, not {count}")
    wanted = [name for environment in environments for name in tenant_names(environment, count)]
    with db.connect(_database(server, "postgres"), isolation_level="AUTOCOMMIT") as conn:
        present = set(conn.execute(text("SELECT datname FROM pg_database")).scalars())
        missing = [name for name in wanted if name not in present]
        if not missing:
            return f"fleet: {count} tenant databases per environment, all there ({_first_names(environments)})"
        if not _template_ready(conn):
            db.execute_literal(conn, f"DROP DATABASE IF EXISTS {db.identifier(TEMPLATE)} WITH (FORCE)")
            db.execute_literal(conn, f"CREATE DATABASE {db.identifier(TEMPLATE)}")
            _fill_template(server, checkout)
            db.execute_literal(conn, f"COMMENT ON DATABASE {db.identifier(TEMPLATE)} IS {db.literal(TEMPLATE_MARKER)}")
        for name in missing:  # the default strategy (WAL_LOG): measured 2-5x faster here than FILE_COPY's checkpoints
            db.execute_literal(conn, f"CREATE DATABASE {db.identifier(name)} TEMPLATE {db.identifier(TEMPLATE)}")
    return (f"fleet: {count} tenant databases per environment ({_first_names(environments)}), {len(missing)} created "
            f"from {TEMPLATE} at revision {TENANT_REVISION}")


def _first_names(environments: tuple[str, ...]) -> str:
    return ", ".join(f"{tenant_prefix(environment)}001…" for environment in environments)


def _database(server: LocalServer, name: str) -> DatabaseTarget:
    return DatabaseTarget(server.url(name), "local")  # over the socket: no password


def _template_ready(conn) -> bool:
    marker = conn.execute(text("SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = :name"),
                          {"name": TEMPLATE}).scalar()
    return marker == TEMPLATE_MARKER


def _fill_template(server: LocalServer, checkout: Path) -> None:
    from alembic import command

    target = _database(server, TEMPLATE)
    project = revisions.load(str(checkout / "alembic.ini"), target, project_logging=False)
    command.upgrade(project.config, TENANT_REVISION)
    with db.connect(target) as conn:
        for statement in ROWS:
            db.execute_literal(conn, statement)
        conn.commit()
