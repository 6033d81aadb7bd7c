"""The scratch databases dbmigrate makes (the rehearsal's copy, drift's replay, a backup's
verify-restore): shaped like the live database, only its own named as leftovers, and made on a
server of their own when the database's role may not CREATE DATABASE. Against real PostgreSQL."""

import json
import uuid
from contextlib import contextmanager

import pytest

from dbmigrate import db
from dbmigrate.target import DatabaseTarget
from tests.support import pgcluster
from tests.support.helpers import (fill, fingerprint_of, last_report, libpq_url, one_line_error, reports_in, scalar,
                                   scratch_databases, sql)
from tests.support.pgcluster import CANARY_PASSWORD
from tests.support.projects import linear, stock_project

TABLE = "op.create_table('t', sa.Column('id', sa.Integer, primary_key=True), sa.Column('n', sa.Integer))"
WIDEN = "op.alter_column('t', 'n', type_=sa.BigInteger)"


def at_r1_with_rows(tmp_path, cli, target, *steps) -> str:
    """A stock project (t, then ``steps``) whose database is at r1 with rows in t."""
    ini = str(stock_project(tmp_path, linear(TABLE, *steps)))
    assert cli("upgrade", "-r", "r1", "--yes", "--alembic-config", ini,
               env={"DATABASE_URL": libpq_url(target)}).returncode == 0
    sql(target, "INSERT INTO t SELECT g, g FROM generate_series(1, 50) g")
    return ini


# --- item 5: health names only the tool's own leftovers -----------------------------------

def test_health_names_only_the_scratch_databases_dbmigrate_made(cli, url, target, pg_cluster):
    fill(target, 10)
    taken = cli("backup", "--json", env={"DATABASE_URL": url})
    assert taken.returncode == 0, taken.stderr
    restored = "dbmigrate_check_before_release"  # a user's restore, named like a scratch database
    look_alike = "dbmigrate_drift_0123abcd"  # the scratch pattern exactly, made by someone else
    assert cli("restore", json.loads(taken.stdout)["id"], "--target-db", restored,
               env={"DATABASE_URL": url}).returncode == 0
    left = None
    try:
        sql(pg_cluster.target("postgres"), f'CREATE DATABASE "{look_alike}"')
        left = db.scratch_database(target, "rehearsal", 10).database  # a killed run's: made, never dropped
        result = cli("health", "--json", env={"DATABASE_URL": url})
        assert result.returncode == 0, result.stderr
        check = {c["name"]: c for c in json.loads(result.stdout)["checks"]}["scratch_databases"]
        assert check["status"] == "warn" and left in check["data"]["abandoned"], check
        assert not {restored, look_alike} & set(check["data"]["abandoned"])
        assert restored not in check["detail"] and look_alike not in check["detail"]
        assert restored in pg_cluster.databases() and look_alike in pg_cluster.databases()
    finally:
        for name in (restored, look_alike, left):
            if name:
                pg_cluster.drop_database(name)


# --- item 8: like the live database, not like template1 -----------------------------------

SCHEMA_APP = ('op.execute("CREATE SCHEMA app; CREATE TYPE app.mood AS ENUM (\'ok\', \'sad\'); '
              'CREATE TABLE app.parent (id int PRIMARY KEY); CREATE TABLE app.child (id int PRIMARY KEY, '
              'parent_id int REFERENCES app.parent, m app.mood DEFAULT \'ok\', CHECK (m <> \'sad\'))")')


def test_a_database_level_search_path_is_no_drift(cli, url, target, tmp_path):
    sql(target, f'ALTER DATABASE "{target.database}" SET search_path = app, public')
    ini = str(stock_project(tmp_path, linear(SCHEMA_APP)))
    env = {"DATABASE_URL": url}
    assert cli("upgrade", "--yes", "--alembic-config", ini, env=env).returncode == 0

    result = cli("drift", "--alembic-config", ini, env=env)
    assert result.returncode == 0, result.stdout
    assert result.stdout.startswith("no drift: the schema matches the migrations at r1")


@contextmanager
def dba_additions_to_template1(pg_cluster):
    """What a DBA may add to template1: an extension, and a helper function every new database gets."""
    template1 = pg_cluster.target("template1")
    sql(template1, "CREATE EXTENSION vector; "
                   "CREATE FUNCTION public.dba_helper() RETURNS int LANGUAGE sql AS 'SELECT 1'")
    try:
        yield
    finally:
        sql(template1, "DROP EXTENSION vector; DROP FUNCTION public.dba_helper()")


def test_what_a_dba_put_in_template1_is_not_missing_from_a_database_made_before(cli, target, pg_cluster, tmp_path):
    ini = at_r1_with_rows(tmp_path, cli, target, WIDEN)
    with dba_additions_to_template1(pg_cluster):
        drifted = cli("drift", "--alembic-config", ini, env={"DATABASE_URL": libpq_url(target)})
    assert drifted.returncode == 0 and drifted.stdout.startswith("no drift"), drifted.stdout
    assert scratch_databases(pg_cluster) == []


def test_what_a_dba_put_in_template1_does_not_break_a_rehearsal_or_a_verify_restore(cli, pg_cluster, tmp_path):
    with dba_additions_to_template1(pg_cluster):
        newer = pg_cluster.target(pg_cluster.create_database())  # made after: it has them, so its backups too
        try:
            ini = at_r1_with_rows(tmp_path, cli, newer, WIDEN)
            env = {"DATABASE_URL": libpq_url(newer)}
            rehearsed = cli("rehearse", "--alembic-config", ini, env=env)
            assert rehearsed.returncode == 0, rehearsed.stderr
            verified = cli("backup", "--verify-restore", "--json", env=env)
            assert verified.returncode == 0, verified.stderr
            assert json.loads(verified.stdout)["verified"]
            restored = cli("restore", json.loads(verified.stdout)["id"], "--target-db", newer.database + "_copy",
                           env=env)
            assert restored.returncode == 0, restored.stderr
            assert fingerprint_of(newer.with_database(newer.database + "_copy")).row_counts["public.t"] == 50
        finally:
            pg_cluster.drop_database(newer.database + "_copy")
            pg_cluster.drop_database(newer.database)
    assert scratch_databases(pg_cluster) == []


# --- item 6: a role without CREATEDB, and a server of their own ----------------------------

@pytest.fixture
def least_privileged(pg_cluster):
    """The usual production role: owns its database, may not CREATE DATABASE."""
    role = "app_" + uuid.uuid4().hex[:8]
    admin = pg_cluster.target("postgres")
    sql(admin, f"CREATE ROLE {role} LOGIN NOCREATEDB PASSWORD '{CANARY_PASSWORD}'")
    sql(admin, f"CREATE DATABASE {role} OWNER {role}")
    yield DatabaseTarget(pg_cluster.url(role).set(username=role), "production")
    pg_cluster.drop_database(role)
    sql(admin, f"DROP ROLE {role}")


SCRATCH_ROLE = "scratcher"


@pytest.fixture(scope="module")
def scratch_cluster(tmp_path_factory):
    """A server of their own for the scratch databases: the production roles do not exist there;
    dbmigrate logs in as SCRATCH_ROLE, which may CREATE DATABASE and nothing more."""
    with pgcluster.running(tmp_path_factory.mktemp("scratch-pg")) as cluster:
        sql(cluster.target("postgres"),
            f"CREATE ROLE {SCRATCH_ROLE} LOGIN NOSUPERUSER CREATEDB PASSWORD '{CANARY_PASSWORD}'")
        yield cluster


def scratch_login(cluster) -> DatabaseTarget:
    return DatabaseTarget(cluster.url("postgres").set(username=SCRATCH_ROLE), "scratch")


ADVICE = ('grant it (ALTER ROLE "{role}" CREATEDB), or give dbmigrate a server of its own for scratch databases '
          "(DBMIGRATE_SCRATCH_URL, or the policy's scratch_server block)")


def refusal_of(role: str, port: int, purpose: str) -> str:
    return (f"dbmigrate: error: {purpose} makes a scratch database on 127.0.0.1:{port}, where role '{role}' may not "
            f"CREATE DATABASE: {ADVICE.format(role=role)}"
            + (", or turn the policy's rehearsal off (rehearse=false)" if purpose == "the rehearsal" else ""))


def test_without_createdb_a_rehearsal_is_refused_before_the_backup_and_runs_on_a_server_of_its_own(
        cli, home, least_privileged, pg_cluster, scratch_cluster, tmp_path):
    target, role = least_privileged, least_privileged.url.username
    ini = at_r1_with_rows(tmp_path, cli, target, WIDEN)
    env = {"DATABASE_URL": libpq_url(target)}
    before, reports = fingerprint_of(target), len(reports_in(home))

    for args in (("upgrade", "--rehearse", "--yes"), ("rehearse",)):
        refused = cli(*args, "--alembic-config", ini, env=env)
        assert refused.returncode == 2, refused.stderr
        assert one_line_error(refused.stderr) == refusal_of(role, pg_cluster.port, "the rehearsal")
        assert not list((home / "backups").rglob("*.dump")), "refused before any backup was written"
        assert fingerprint_of(target) == before
    report = last_report(home)  # each refusal leaves its report: the upgrade's and the rehearsal's
    assert len(reports_in(home)) == reports + 2 and report["error"]["phase"] == "health_checks"
    assert report["operation"] == "rehearse" and report["backup"] is None
    drift_refused = cli("drift", "--alembic-config", ini, env=env)
    assert drift_refused.returncode == 2
    assert one_line_error(drift_refused.stderr) == refusal_of(role, pg_cluster.port, "drift's replay")
    unverified = cli("backup", "--verify-restore", env=env)
    assert unverified.returncode == 2 and one_line_error(unverified.stderr).endswith(
        f"permission denied to create database: {ADVICE.format(role=role)}")
    assert not list((home / "backups").rglob("*.dump")), "an unverified backup is not kept"

    env["DBMIGRATE_SCRATCH_URL"] = libpq_url(scratch_login(scratch_cluster))
    drifted = cli("drift", "--alembic-config", ini, env=env)
    assert drifted.returncode == 0 and drifted.stdout.startswith("no drift"), drifted.stderr
    verified = cli("backup", "--verify-restore", "--json", env=env)
    assert verified.returncode == 0 and json.loads(verified.stdout)["verified"], verified.stderr
    upgraded = cli("upgrade", "--rehearse", "--yes", "--alembic-config", ini, env=env)
    assert upgraded.returncode == 0, upgraded.stderr
    report = last_report(home)
    [step] = report["rehearsal"]["steps"]
    assert step["revision"] == "r2" and step["tables_rewritten"] == {"public.t": 50}
    checked = {c["name"]: c for c in report["health_checks"]}["scratch_server"]
    assert checked["status"] == "ok" and checked["data"]["server"] == f"127.0.0.1:{scratch_cluster.port}"
    assert checked["data"]["role"] == SCRATCH_ROLE  # CREATEDB, not a superuser
    assert scalar(target, "SELECT version_num FROM alembic_version") == "r2"
    assert scratch_databases(scratch_cluster) == [] and scratch_databases(pg_cluster) == []

    # The rest of docs/SAFETY.md's table of what each command needs, for this role.
    assert cli("health", "--alembic-config", ini, env=env).returncode == 0
    taken = report["backup"]["id"]
    into_new = cli("restore", taken, "--target-db", f"{role}_copy", env=env)
    assert into_new.returncode == 1 and one_line_error(into_new.stderr) == (
        f'dbmigrate: error: CREATE DATABASE "{role}_copy" on 127.0.0.1:{pg_cluster.port}: permission denied to '
        "create database")
    over = cli("restore", taken, "--yes", env=env)
    assert over.returncode == 0, over.stderr
    assert scalar(target, "SELECT version_num FROM alembic_version") == "r1"


def test_the_production_policy_checks_createdb_before_the_backup_and_rehearses_on_its_scratch_server_block(
        prefect_api, least_privileged, scratch_cluster, pg_cluster, home, cli, tmp_path, monkeypatch):
    from blocks import DatabaseCredentials, EnvironmentPolicy, environments
    from tests.support.flows import run_flow, run_named

    monkeypatch.setenv("DBMIGRATE_HOME", str(home))
    target, role = least_privileged, least_privileged.url.username
    ini = at_r1_with_rows(tmp_path, cli, target, WIDEN)
    before = fingerprint_of(target)
    name = "prod-" + uuid.uuid4().hex[:6]  # an environment of no known name: production's rules, rehearsal on
    DatabaseCredentials(host="127.0.0.1", port=target.port, database=target.database, username=role,
                        password=CANARY_PASSWORD, sslmode="disable", connect_timeout=5).save(name)
    quick = {"retry_delay_s": 0.2, "approval_required": False, "lint_blocks": False}

    EnvironmentPolicy(**quick).save(name)
    state = run_flow(environment=name, alembic_config=ini)
    assert state.is_failed()
    assert refusal_of(role, pg_cluster.port, "the rehearsal").removeprefix("dbmigrate: error: ") in state.message
    assert not list((home / "backups").rglob("*.dump")), "refused before any backup was written"
    assert fingerprint_of(target) == before and last_report(home)["error"]["phase"] == "health_checks"

    DatabaseCredentials(host="127.0.0.1", port=scratch_cluster.port, database="postgres", username=SCRATCH_ROLE,
                        password=CANARY_PASSWORD, sslmode="disable", connect_timeout=5).save(f"{name}-scratch")
    EnvironmentPolicy(**quick, scratch_server=f"{name}-scratch").save(name, overwrite=True)
    state = run_flow(environment=name, alembic_config=ini)
    assert state.is_completed(), state.message
    report = last_report(home)
    assert [s["revision"] for s in report["rehearsal"]["steps"]] == ["r2"] and report["revision_after"] == "r2"
    assert scratch_databases(scratch_cluster) == [] and scratch_databases(pg_cluster) == []

    # The command line's --env uses the policy's scratch_server too, for every command.
    env = {"PREFECT_API_URL": prefect_api}
    drifted = cli("drift", "--env", name, "--alembic-config", ini, env=env)
    assert drifted.returncode == 0 and drifted.stdout.startswith("no drift"), drifted.stderr
    verified = cli("backup", "--verify-restore", "--env", name, "--json", env=env)
    assert verified.returncode == 0 and json.loads(verified.stdout)["verified"], verified.stderr

    # The scratch server's block is no environment of its own.
    assert name in environments() and f"{name}-scratch" not in environments()

    # A killed run's scratch database on the scratch server: health and db-health name it there.
    left = db.scratch_database(target, "drift", 10, scratch_login(scratch_cluster)).database
    try:
        checked = cli("health", "--env", name, "--alembic-config", ini, "--json", env=env)
        assert checked.returncode == 0, checked.stderr
        nightly = run_named("db-health", environment=name, alembic_config=ini, check_drift=False)
        assert nightly.is_completed(), nightly.message
        for checks in (json.loads(checked.stdout)["checks"], nightly.result()):
            found = {c["name"]: c for c in checks}["scratch_databases"]
            assert found["status"] == "warn", found
            assert found["data"]["servers"][f"127.0.0.1:{scratch_cluster.port}"] == [left]
            assert f"{left} on 127.0.0.1:{scratch_cluster.port}" in found["detail"]
    finally:
        scratch_cluster.drop_database(left)


def test_on_a_scratch_server_without_the_production_role_a_revision_granting_to_it_fails_the_rehearsal(
        cli, least_privileged, scratch_cluster, tmp_path):
    """The limit docs/SAFETY.md states: the production roles are not on the scratch server."""
    target, role = least_privileged, least_privileged.url.username
    ini = at_r1_with_rows(tmp_path, cli, target, f'op.execute("GRANT SELECT ON t TO {role}")')
    env = {"DATABASE_URL": libpq_url(target), "DBMIGRATE_SCRATCH_URL": libpq_url(scratch_login(scratch_cluster))}
    rehearsed = cli("rehearse", "--alembic-config", ini, env=env)
    assert rehearsed.returncode == 1, rehearsed.stderr
    assert f'role "{role}" does not exist' in rehearsed.stdout + rehearsed.stderr
    assert scalar(target, "SELECT version_num FROM alembic_version") == "r1"
    assert scratch_databases(scratch_cluster) == []
