"""A fleet's members (issue 17): the DatabaseFleet block on a real Prefect API, its members on the real
PostgreSQL, `dbmigrate fleet status`, `blocks sync`'s fleet variables and `local up --fleet N`.
Each environment here has a name of its own: the Prefect API is the session's, shared."""

from __future__ import annotations

import json
import uuid

import pytest

from dbmigrate import fleet
from dbmigrate.errors import ConfigError
from tests.support.helpers import SAMPLE_CONFIG, SAMPLE_HEAD, libpq_url, one_line_error, save_environment, scalar, sql
from tests.support.pgcluster import CANARY_PASSWORD, free_port

HOSTILE = 'te"nant \'one\'; drop  x'


@pytest.fixture
def env_name() -> str:
    return "fleet-" + uuid.uuid4().hex[:8]


@pytest.fixture
def api_env(prefect_api) -> dict[str, str]:
    return {"PREFECT_API_URL": prefect_api}


@pytest.fixture
def databases(pg_cluster):
    """Databases made on the test's server, dropped at the end: ``make(name)`` returns its target."""
    made: list[str] = []

    def make(name: str | None = None):
        name = name or pg_cluster.create_database()
        if name not in made and name not in pg_cluster.databases():
            with pg_cluster.admin() as conn:
                conn.execute(f'CREATE DATABASE "{name.replace(chr(34), chr(34) * 2)}"')
        made.append(name)
        return pg_cluster.target(name)

    yield make
    for name in made:
        pg_cluster.drop_database(name.replace('"', '""'))


def save_fleet(env_name: str, **fields) -> None:
    from blocks.fleet import DatabaseFleet

    DatabaseFleet.register_type_and_schema()
    DatabaseFleet(environment=env_name, **fields).save(f"{env_name}-fleet", overwrite=True)


def upgrade(cli, target, revision: str) -> None:
    result = cli("upgrade", "-r", revision, "--yes", env={"DATABASE_URL": libpq_url(target)})
    assert result.returncode == 0, result.stderr


def test_a_member_named_with_quotes_and_spaces_is_read_and_shown(cli, api_env, env_name, target, databases):
    from blocks.fleet import load_fleet

    hostile, plain = databases(HOSTILE), databases()
    upgrade(cli, hostile, "0004")
    save_environment(target, env_name)  # the server's credentials, in env_name
    save_fleet(env_name, credentials=env_name, databases=[plain.database, HOSTILE], canary=[HOSTILE])

    members = load_fleet(env_name)
    assert [m.name for m in members] == [HOSTILE, plain.database]  # the canary first
    assert members[0].target.database == HOSTILE and members[0].target.environment == env_name

    status = cli("fleet", "status", "--env", env_name, "--json", env=api_env)
    assert status.returncode == 0, status.stderr
    result = json.loads(status.stdout)
    rows = {row["name"]: row for row in result["members"]}
    assert rows[HOSTILE]["current"] == ["0004"] and rows[HOSTILE]["pending"] == 2
    assert rows[plain.database]["current"] == [] and rows[plain.database]["pending"] == 6
    assert result["summary"] == "2 databases: 1 at 0004, 1 at base"
    shown = cli("fleet", "status", "--env", env_name, env=api_env)
    assert shown.returncode == 0 and any(line.startswith(HOSTILE) and "0004  2 pending" in line
                                         for line in shown.stdout.splitlines())

    # a '?' would be read as the start of connection options: refused, in one line
    save_fleet(env_name, credentials=env_name, databases=["tenant?host=elsewhere"])
    with pytest.raises(ConfigError, match=r"^fleet '[a-z0-9-]+-fleet': database name 'tenant\?host=elsewhere' holds a "
                                          r"'\?', which dbmigrate cannot pass in a connection URL$"):
        load_fleet(env_name)


def test_a_query_selecting_no_database_stops_in_one_line(cli, api_env, env_name, target):
    save_environment(target, env_name)
    save_fleet(env_name, credentials=env_name,
               query=r"select datname from pg_database where datname like 'no\_such\_tenant\_%'")
    result = cli("fleet", "status", "--env", env_name, env=api_env)
    assert result.returncode == 2 and result.stdout == ""
    assert one_line_error(result.stderr) == (f"dbmigrate: error: fleet '{env_name}-fleet': its query selected no "
                                             "database: nothing was run")


def test_the_query_selects_in_its_order_and_cannot_write(api_env, env_name, target, databases):
    from blocks.fleet import load_fleet

    prefix = "q" + uuid.uuid4().hex[:6]
    for n in (2, 1, 3):
        databases(f"{prefix}_{n}")
    save_environment(target, env_name)
    save_fleet(env_name, credentials=env_name,
               query=f"select datname from pg_database where datname like '{prefix}\\_%' order by datname desc")
    assert [m.name for m in load_fleet(env_name)] == [f"{prefix}_3", f"{prefix}_2", f"{prefix}_1"]

    sql(target, "CREATE TABLE probe (name text)")
    save_fleet(env_name, credentials=env_name,
               query="with written as (insert into probe values ('x') returning name) select name from written")
    with pytest.raises(ConfigError, match=f"^fleet '{env_name}-fleet': its query failed: cannot execute [A-Z]+ in a "
                                          "read-only transaction$"):
        load_fleet(env_name)
    assert scalar(target, "SELECT count(*) FROM probe") == 0


def test_a_staging_fleet_naming_a_production_member_is_refused_before_anything_runs(
        cli, api_env, env_name, target, databases):
    production = databases()
    production_env = env_name + "-prod"
    save_environment(target, env_name)
    save_environment(production, f"{production_env}-db", database_of=production_env)

    # a member block that records production
    save_fleet(env_name, members=[env_name, f"{production_env}-db"])
    refused = cli("fleet", "status", "--env", env_name, env=api_env)
    assert refused.returncode == 2
    assert one_line_error(refused.stderr) == (
        f"dbmigrate: error: the {env_name} fleet refuses member '{production_env}-db': it is the {production_env} "
        f"database ({production.where})")

    # production's database reached through the staging server's own credentials
    save_fleet(env_name, credentials=env_name, databases=[production.database])
    refused = cli("fleet", "status", "--env", env_name, "--json", env=api_env)
    assert refused.returncode == 2 and refused.stdout == ""
    assert one_line_error(refused.stderr) == (
        f"dbmigrate: error: the {env_name} fleet refuses member '{production.database}': it is the "
        f"{production_env} database ({production.where})")

    # a fleet block recording another environment than the one asked for
    from blocks.fleet import DatabaseFleet

    DatabaseFleet(environment=production_env, members=[f"{production_env}-db"]).save(f"{env_name}-fleet",
                                                                                    overwrite=True)
    refused = cli("fleet", "status", "--env", env_name, env=api_env)
    assert one_line_error(refused.stderr) == (f"dbmigrate: error: the {env_name} fleet refuses block "
                                              f"'{env_name}-fleet': it is the {production_env} fleet")


def test_an_unreachable_member_is_reported_and_refuses_the_fleet_unless_it_skips_such(
        cli, api_env, env_name, target, databases, prefect_api):
    from blocks import DatabaseCredentials
    from blocks.fleet import load_fleet, load_fleet_block

    reachable = databases()
    upgrade(cli, reachable, "head")
    save_environment(reachable, env_name)
    gone = f"{env_name}-gone"
    DatabaseCredentials(host="127.0.0.1", port=free_port(), database="tenant_gone", username="postgres",
                        password=CANARY_PASSWORD, sslmode="disable", connect_timeout=2,
                        environment=env_name).save(gone, overwrite=True)
    save_fleet(env_name, members=[env_name, gone])

    status = cli("fleet", "status", "--env", env_name, "--json", env=api_env)
    assert status.returncode == 0, status.stderr
    result = json.loads(status.stdout)
    assert result["summary"] == f"2 databases: 1 at head ({SAMPLE_HEAD}), 1 unreachable"
    [row] = [row for row in result["members"] if row["name"] == gone]
    assert row["reachable"] is False and row["why"] == "connection refused: no server listening at that address"

    members = load_fleet(env_name)
    states = fleet.fleet_status(members, _project(), timeout_s=2)
    with pytest.raises(ConfigError, match=f"^1 fleet member cannot be migrated, nothing was started: {gone}: "
                                          "connection refused"):
        fleet.admit(states, load_fleet_block(env_name).skip_unreachable)
    save_fleet(env_name, members=[env_name, gone], skip_unreachable=True)
    startable, left_out = fleet.admit(states, load_fleet_block(env_name).skip_unreachable)
    assert startable == [env_name] and [state.name for state in left_out] == [gone]


def test_fleet_status_needs_its_environment(cli, api_env, env_name):
    result = cli("fleet", "status", env=api_env)
    assert result.returncode == 2
    assert one_line_error(result.stderr).startswith("dbmigrate: error: fleet status needs --env ENV")
    missing = cli("fleet", "status", "--env", env_name, env=api_env)
    assert one_line_error(missing.stderr) == (f"dbmigrate: error: no DatabaseFleet block named '{env_name}-fleet' "
                                              "(create one, see docs/FLEETS.md)")


def _project():
    from dbmigrate import revisions

    return revisions.load(str(SAMPLE_CONFIG))


def test_blocks_sync_writes_the_fleet_block_from_variables(cli, api_env, env_name, target):
    from blocks.fleet import load_fleet_block

    server = {"DB_HOST": "127.0.0.1", "DB_PORT": str(target.port), "DB_NAME": target.database, "DB_USER": "postgres",
              "DB_PASSWORD": CANARY_PASSWORD, "DB_SSLMODE": "disable", **api_env}

    def sync(**variables):
        return cli("blocks", "sync", "--env", env_name, "--from-env", env={**server, **variables})

    listed = sync(FLEET_DATABASES='["tenant,a", "tenant b"]', FLEET_CANARY="tenant b")
    assert listed.returncode == 0, listed.stderr
    assert f"dbmigrate-database-fleet/{env_name}-fleet: created" in listed.stdout.splitlines()
    block = load_fleet_block(env_name)
    assert (block.credentials, block.databases, block.query, block.canary) == (
        env_name, ["tenant,a", "tenant b"], None, ["tenant b"])

    query = r"select datname from pg_database where datname like 'tenant\_%'"
    moved = sync(FLEET_QUERY=query, FLEET_SKIP_UNREACHABLE="true")
    assert f"dbmigrate-database-fleet/{env_name}-fleet: updated: databases, query, canary, skip_unreachable" \
        in moved.stdout.splitlines()
    block = load_fleet_block(env_name)
    assert (block.databases, block.query, block.canary, block.skip_unreachable) == (None, query, [], True)
    again = sync(FLEET_QUERY=query, FLEET_SKIP_UNREACHABLE="true")
    assert f"dbmigrate-database-fleet/{env_name}-fleet: unchanged" in again.stdout.splitlines()

    for variables, error in (
            ({"FLEET_CANARY": "a"}, "FLEET_CANARY needs one of FLEET_MEMBERS, FLEET_DATABASES, FLEET_QUERY: "
                                    "nothing was written"),
            ({"FLEET_DATABASES": "a", "FLEET_QUERY": query},
             "give one of FLEET_MEMBERS, FLEET_DATABASES, FLEET_QUERY, not FLEET_DATABASES and FLEET_QUERY: "
             "nothing was written"),
            ({"FLEET_DATABASES": '["a", 1]'}, "FLEET_DATABASES is not a JSON array of strings: nothing was written"),
            ({"FLEET_SKIP_UNREACHABLE": "maybe", "FLEET_QUERY": query},
             "FLEET_SKIP_UNREACHABLE: Input should be a valid boolean, unable to interpret input")):
        refused = sync(**variables)
        assert refused.returncode == 2 and one_line_error(refused.stderr) == f"dbmigrate: error: {error}"
    assert load_fleet_block(env_name).query == query
