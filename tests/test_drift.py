"""Drift: the live schema against what the migrations build (and the models), named object by object."""

import json
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest

from tests.support.helpers import fingerprint_of, one_line_error, scalar, sql
from tests.support.projects import (
    BEST_EFFORT_INDEX,
    DUPLICATES,
    PSYCOPG2_FROM_DATABASE_URL,
    linear,
    stock_project,
)

MODELS = '''import sqlalchemy as sa
target_metadata = sa.MetaData()
sa.Table("people", target_metadata, sa.Column("id", sa.Integer, primary_key=True),
         sa.Column("name", sa.String(100), nullable=False), sa.Column("email", sa.String(50)))'''
PEOPLE = 'op.execute("CREATE TABLE people (id integer PRIMARY KEY, name varchar(100) NOT NULL)")'


def leave_an_invalid_index(target, table: str, column: str, name: str) -> None:
    """What a failed CREATE INDEX CONCURRENTLY leaves: a unique index over duplicates, marked invalid."""
    with pytest.raises(psycopg.errors.UniqueViolation):
        sql(target, f"CREATE UNIQUE INDEX CONCURRENTLY {name} ON {table} ({column})")


def scratch_databases(pg_cluster) -> list[str]:
    return [name for name in pg_cluster.databases() if name.startswith("dbmigrate_drift_")]


def test_hand_made_changes_and_an_invalid_index_are_named_and_nothing_changes(cli, url, target, pg_cluster):
    env = {"DATABASE_URL": url}
    assert cli("upgrade", "--yes", env=env).returncode == 0
    clean = cli("drift", env=env)
    assert clean.returncode == 0, clean.stderr
    assert clean.stdout.startswith("no drift: the schema matches the migrations at 0006 (models compared")

    sql(target, "INSERT INTO accounts (name, provider, external_id) VALUES ('a', 'aws', '1'), ('b', 'aws', '2')")
    sql(target, "ALTER TABLE accounts ADD COLUMN note text")
    sql(target, "ALTER TABLE accounts ALTER COLUMN name TYPE varchar(300)")
    sql(target, "ALTER TABLE accounts ALTER COLUMN provider SET DEFAULT 'aws'")
    sql(target, "ALTER TABLE accounts ALTER COLUMN external_id DROP NOT NULL")
    sql(target, "DROP INDEX ix_cost_records_resource_date")
    sql(target, "ALTER TABLE accounts ADD CONSTRAINT name_not_empty CHECK (name <> '')")
    leave_an_invalid_index(target, "accounts", "provider", "ix_accounts_provider")
    before = fingerprint_of(target)

    found = cli("drift", env=env)
    assert found.returncode == 1, found.stderr
    assert found.stdout.splitlines() == [
        ("invalid index public.ix_accounts_provider on public.accounts (a failed CREATE INDEX CONCURRENTLY leaves "
         "one: drop it, build it again)"),
        "column public.accounts.external_id: nullable in the database, NOT NULL in the migrations",
        ("column public.accounts.name: type character varying(300) in the database, character varying(200) in the "
         "migrations"),
        "extra check constraint public.accounts.name_not_empty (CHECK (((name)::text <> ''::text)))",
        "extra column public.accounts.note (text)",
        "column public.accounts.provider: default 'aws'::character varying in the database, none in the migrations",
        ("missing index public.ix_cost_records_resource_date (on public.cost_records USING btree (resource_id, "
         "usage_date))"),
        "models: column public.accounts.external_id: nullable in the database, NOT NULL in the models",
        "models: column public.accounts.name: type VARCHAR(300) in the database, VARCHAR(200) in the models",
        "models: extra column public.accounts.note (TEXT)",
        "models: extra index public.ix_accounts_provider",
        "models: missing index public.ix_cost_records_resource_date",
        found.stdout.splitlines()[-1],
    ]
    assert found.stdout.splitlines()[-1].startswith(
        "drift: 12 difference(s) from the migrations at 0006 (models compared (compare_metadata); ")

    as_json = cli("drift", "--json", env=env)
    assert as_json.returncode == 1, as_json.stderr
    document = json.loads(as_json.stdout)
    assert document["findings"] == found.stdout.splitlines()[:-1]
    assert {k: document[k] for k in ("environment", "revision", "drift", "models")} == {
        "environment": "url", "revision": "0006", "drift": True, "models": "models compared (compare_metadata)"}
    assert document["database"]["name"] == target.database and document["duration_s"] > 0

    assert fingerprint_of(target) == before, "drift only reads the database"
    assert not scratch_databases(pg_cluster), "the scratch database is dropped"


def test_a_table_only_one_side_has_is_one_finding_and_a_project_without_models_says_so(cli, url, target, tmp_path):
    ini = str(stock_project(tmp_path, linear(PEOPLE, 'op.execute("CREATE TABLE pets (id integer PRIMARY KEY)")')))
    env = {"DATABASE_URL": url}
    assert cli("upgrade", "--yes", "--alembic-config", ini, env=env).returncode == 0
    clean = cli("drift", "--json", "--alembic-config", ini, env=env)
    assert clean.returncode == 0, clean.stderr
    assert json.loads(clean.stdout)["models"] == "no models: compare_metadata skipped"

    sql(target, "DROP TABLE pets; CREATE TABLE audit (id bigint PRIMARY KEY, what text); "
                "CREATE SEQUENCE audit_seq; ALTER TABLE people ALTER COLUMN id TYPE bigint; "
                "CREATE VIEW people_names AS SELECT name FROM people; CREATE EXTENSION vector")
    found = cli("drift", "--alembic-config", ini, env=env)
    assert found.returncode == 1, found.stderr
    vector = scalar(target, "SELECT extversion FROM pg_extension WHERE extname = 'vector'")
    assert found.stdout.splitlines()[:-1] == [
        "extra table public.audit",
        "extra sequence public.audit_seq",
        "column public.people.id: type bigint in the database, integer in the migrations",
        "extra view public.people_names",
        "missing table public.pets",
        f"extra extension vector ({vector})",
    ]
    assert found.stdout.splitlines()[-1].startswith(
        "drift: 6 difference(s) from the migrations at r2 (no models: compare_metadata skipped; ")


def test_the_models_are_compared_where_env_py_has_them(cli, url, target, tmp_path):
    ini = str(stock_project(tmp_path, linear(PEOPLE), models=MODELS))
    env = {"DATABASE_URL": url}
    assert cli("upgrade", "--yes", "--alembic-config", ini, env=env).returncode == 0
    before = fingerprint_of(target)

    found = cli("drift", "--json", "--alembic-config", ini, env=env)
    assert found.returncode == 1, found.stderr
    document = json.loads(found.stdout)
    assert document["findings"] == ["models: missing column public.people.email (VARCHAR(50))"]
    assert document["models"] == "models compared (compare_metadata)"
    assert fingerprint_of(target) == before


def test_below_head_the_models_are_not_compared_and_no_version_table_is_made(cli, url, target, tmp_path):
    ini = str(stock_project(tmp_path, linear(PEOPLE), models=MODELS))
    env = {"DATABASE_URL": url}
    clean = cli("drift", "--json", "--alembic-config", ini, env=env)
    assert clean.returncode == 0, clean.stderr
    assert json.loads(clean.stdout)["models"] == "models not compared: the database is not at head (r1)"

    sql(target, "CREATE TABLE stray (id integer)")
    found = cli("drift", "--alembic-config", ini, env=env)
    assert found.returncode == 1, found.stderr
    assert found.stdout.splitlines()[0] == "extra table public.stray"
    assert found.stdout.splitlines()[1].startswith("drift: 1 difference(s) from the migrations at base (models not "
                                                   "compared: the database is not at head (r1); ")
    assert sql(target, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'") == [("stray",)]


def test_comparing_the_models_makes_no_version_table(cli, url, target, tmp_path):
    ini = str(stock_project(tmp_path, [], models=MODELS))  # no revision yet: base is the head
    found = cli("drift", "--alembic-config", ini, env={"DATABASE_URL": url})
    assert found.returncode == 1, found.stderr
    assert found.stdout.splitlines()[0] == "models: missing table public.people"
    assert sql(target, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'") == []


def test_a_replay_that_fails_is_one_line_exit_2_and_the_scratch_is_dropped(cli, url, target, tmp_path, pg_cluster):
    ini = stock_project(tmp_path, linear(PEOPLE))
    env = {"DATABASE_URL": url}
    assert cli("upgrade", "--yes", "--alembic-config", str(ini), env=env).returncode == 0
    revision = tmp_path / "migrations" / "versions" / "r1.py"  # edited since it ran: now it fails
    revision.write_text(revision.read_text().replace(PEOPLE, 'op.execute("SELECT 1/0")'))
    before = fingerprint_of(target)

    failed = cli("drift", "--alembic-config", str(ini), env=env)
    assert failed.returncode == 2 and failed.stdout == ""
    assert one_line_error(failed.stderr) == ("dbmigrate: error: replaying the migrations up to r1 into a scratch "
                                            "database failed: division by zero")
    assert fingerprint_of(target) == before
    assert not scratch_databases(pg_cluster)


def test_an_env_py_that_reads_database_url_replays_into_the_scratch_database(cli, url, target, tmp_path, pg_cluster):
    ini = str(stock_project(tmp_path, linear(PEOPLE), engine=PSYCOPG2_FROM_DATABASE_URL))
    env = {"DATABASE_URL": url}
    assert cli("upgrade", "--yes", "--alembic-config", ini, env=env).returncode == 0
    before = fingerprint_of(target)

    clean = cli("drift", "--alembic-config", ini, env=env)
    assert clean.returncode == 0, clean.stderr
    assert clean.stdout.startswith("no drift: the schema matches the migrations at r1")
    assert fingerprint_of(target) == before
    assert not scratch_databases(pg_cluster)


def test_an_env_py_with_a_url_of_its_own_is_refused_not_compared(cli, url, target, tmp_path, pg_cluster):
    ini = str(stock_project(tmp_path, linear(PEOPLE), engine=f"create_engine({url!r}, poolclass=pool.NullPool)"))
    env = {"DATABASE_URL": url}
    assert cli("upgrade", "--yes", "--alembic-config", ini, env=env).returncode == 0
    before = fingerprint_of(target)

    failed = cli("drift", "--alembic-config", ini, env=env)
    assert failed.returncode == 2 and failed.stdout == ""
    assert one_line_error(failed.stderr) == (
        "dbmigrate: error: replaying the migrations up to r1 into a scratch database failed: env.py connected to "
        f"database '{target.database}', not drift's scratch database: its statement was refused there; give env.py "
        "the URL dbmigrate sets (config 'sqlalchemy.url', or DATABASE_URL)")
    assert fingerprint_of(target) == before
    assert not scratch_databases(pg_cluster)


def test_several_revisions_in_the_version_table_is_an_error(cli, url, target, tmp_path):
    ini = str(stock_project(tmp_path, linear(PEOPLE, "pass")))
    assert cli("upgrade", "--yes", "--alembic-config", ini, env={"DATABASE_URL": url}).returncode == 0
    sql(target, "INSERT INTO alembic_version VALUES ('r1')")
    failed = cli("drift", "--alembic-config", ini, env={"DATABASE_URL": url})
    assert failed.returncode == 2
    assert one_line_error(failed.stderr).startswith("dbmigrate: error: alembic_version holds 2 rows: r1, r2")


def test_the_check_the_db_health_flow_runs_carries_the_findings(target, tmp_path, pg_cluster):
    from dbmigrate import drift
    from dbmigrate.settings import Settings

    settings = Settings(tmp_path / "home", alembic_config=str(stock_project(tmp_path, linear(PEOPLE))),
                        project_logging=False)
    sql(target, "CREATE TABLE alembic_version (version_num varchar(32) PRIMARY KEY); "
                "INSERT INTO alembic_version VALUES ('r1'); CREATE TABLE people (id integer PRIMARY KEY)")
    check = drift.check(target, settings)
    assert (check.name, check.status) == ("drift", "fail")
    assert check.data["findings"] == ["missing column public.people.name (character varying(100))"]
    assert check.detail == ("1 difference(s) from the migrations at r1: missing column public.people.name "
                            "(character varying(100)); no models: compare_metadata skipped")
    assert not scratch_databases(pg_cluster)


# -- invalid indexes: a warning before a run, a failed validation after one that leaves one ------------------



def test_health_warns_of_an_invalid_index_naming_its_table(cli, url, target):
    env = {"DATABASE_URL": url}
    clean = json.loads(cli("health", "--json", env=env).stdout)
    assert {c["name"]: (c["status"], c["detail"]) for c in clean["checks"]}["invalid_indexes"] == (
        "ok", "no invalid index")

    sql(target, "CREATE TABLE t (n integer); INSERT INTO t VALUES (1), (1)")
    leave_an_invalid_index(target, "t", "n", "ix_t_n")
    health = cli("health", "--json", env=env)
    assert health.returncode == 0, health.stderr
    document = json.loads(health.stdout)
    check = {c["name"]: c for c in document["checks"]}["invalid_indexes"]
    assert document["status"] == "warn" and check["status"] == "warn"
    assert check["detail"].startswith("1 invalid index(es): public.ix_t_n on public.t: left by a failed CREATE "
                                      "INDEX CONCURRENTLY")
    assert check["data"] == {"invalid_indexes": ["public.ix_t_n on public.t"]}
    assert "WARN  invalid_indexes" in cli("health", env=env).stdout


def test_a_run_that_leaves_an_invalid_index_fails_its_validation(cli, url, target, tmp_path, home):
    from tests.support.helpers import last_report

    ini = str(stock_project(tmp_path, linear(DUPLICATES, BEST_EFFORT_INDEX)))
    result = cli("upgrade", "--yes", "--alembic-config", ini, env={"DATABASE_URL": url})
    assert result.returncode == 1, result.stderr
    assert ("validation failed: invalid index(es) left by the run: public.ix_t_n on public.t (a CREATE INDEX "
            "CONCURRENTLY failed): drop and build again") in result.stderr
    report = last_report(home)
    assert (report["status"], report["error"]["phase"], report["revision_after"]) == ("failed", "validate", "r2")
    check = {c["name"]: c for c in report["validation"]}["invalid_indexes"]
    assert check["status"] == "fail" and check["data"] == {"invalid_indexes": ["public.ix_t_n on public.t"]}


def test_an_invalid_index_from_before_the_run_does_not_fail_it(cli, url, target, tmp_path, home):
    from tests.support.helpers import last_report

    ini = str(stock_project(tmp_path, linear(DUPLICATES, "pass")))
    env = {"DATABASE_URL": url}
    assert cli("upgrade", "-r", "r1", "--yes", "--alembic-config", ini, env=env).returncode == 0
    leave_an_invalid_index(target, "t", "n", "ix_t_n")
    result = cli("upgrade", "--yes", "--alembic-config", ini, env=env)
    assert result.returncode == 0, result.stderr
    check = {c["name"]: c for c in last_report(home)["validation"]}["invalid_indexes"]
    assert check["status"] == "warn"
    assert check["detail"] == "invalid index(es) from before the run: public.ix_t_n on public.t"


def test_an_unreachable_database_is_one_line_and_exit_2(cli):
    from tests.support.pgcluster import free_port

    failed = cli("drift", "--json", "--timeout", "2",
                 env={"DATABASE_URL": f"postgresql://postgres:x@127.0.0.1:{free_port()}/nowhere"})
    assert failed.returncode == 2 and failed.stdout == ""
    assert one_line_error(failed.stderr).endswith("connection refused: no server listening at that address")



# -- what the catalogs hold besides tables and columns: partitions, security, durability -----------------

PARTITIONED = ('op.execute("""'
               "CREATE TABLE events (id bigint, at date NOT NULL, what text) PARTITION BY RANGE (at); "
               "CREATE TABLE events_2026 PARTITION OF events FOR VALUES FROM ('2026-01-01') TO ('2027-01-01'); "
               "CREATE INDEX ix_events_at ON events (at)"
               '""")')
# One of each: row-level security and a policy, a trigger and its function, an enum, a domain with a
# CHECK, a view, a comment.
SECURED = ('op.execute("""'
           "CREATE TYPE mood AS ENUM ('ok', 'bad'); "
           "CREATE DOMAIN positive AS integer CONSTRAINT positive_check CHECK (VALUE > 0); "
           "CREATE TABLE notes (id integer PRIMARY KEY, owner_name text NOT NULL, title text, body text, "
           "mood mood, stars positive, updated_at timestamptz); "
           "COMMENT ON TABLE notes IS 'what users wrote'; "
           "ALTER TABLE notes ENABLE ROW LEVEL SECURITY; "
           "CREATE POLICY own_notes ON notes USING (owner_name = current_user); "
           "CREATE POLICY migrator_writes ON notes FOR INSERT TO CURRENT_USER WITH CHECK (true); "
           "CREATE FUNCTION touch() RETURNS trigger LANGUAGE plpgsql AS $$ "
           "BEGIN NEW.updated_at = now(); RETURN NEW; END $$; "
           "CREATE TRIGGER notes_touch BEFORE UPDATE ON notes FOR EACH ROW EXECUTE FUNCTION touch(); "
           "CREATE VIEW recent_notes AS SELECT id, body FROM notes WHERE updated_at > now() - interval '1 day'"
           '""")')


@contextmanager
def own_role(target, name: str):
    """A login role that owns ``target``'s database, as an application's install guide sets it up, and
    ``target`` as that role; roles are the cluster's: it is dropped at the end."""
    from dbmigrate.target import DatabaseTarget
    from tests.support.pgcluster import CANARY_PASSWORD

    sql(target, f"CREATE ROLE {name} LOGIN PASSWORD '{CANARY_PASSWORD}'; "
                f"ALTER DATABASE {target.database} OWNER TO {name}")
    try:
        yield DatabaseTarget(target.url.set(username=name), target.environment)
    finally:
        sql(target, f"REASSIGN OWNED BY {name} TO CURRENT_USER; DROP OWNED BY {name}; DROP ROLE {name}")


def migrated(target, tmp_path, *steps: str):
    """Settings for a project of ``steps`` (r1, r2, ...), and ``target`` upgraded to its head in-process."""
    from dbmigrate import migrate
    from dbmigrate.settings import Settings

    settings = Settings(tmp_path / "home", alembic_config=str(stock_project(tmp_path, linear(*steps))),
                        project_logging=False)
    migrate.run(settings.project(target), "head", upgrade=True, limits=settings.limits, on_step=lambda step: None)
    return settings


def test_partitioned_tables_and_their_indexes_are_read_and_compared(target, tmp_path):
    from dbmigrate import drift

    settings = migrated(target, tmp_path, PARTITIONED)
    assert drift.find(target, settings).findings == []

    sql(target, "ALTER TABLE events DETACH PARTITION events_2026; "
                "CREATE TABLE events_2027 PARTITION OF events FOR VALUES FROM ('2027-01-01') TO ('2028-01-01')")
    assert drift.find(target, settings).findings == [
        "table public.events_2026: partition of none in the database, public.events FOR VALUES FROM "
        "('2026-01-01') TO ('2027-01-01') in the migrations",
        "extra table public.events_2027",
    ]


def test_security_and_durability_changes_are_named_one_line_each(target, tmp_path, db_name):
    from dbmigrate import drift

    settings = migrated(target, tmp_path, SECURED)
    assert drift.find(target, settings).findings == []

    intruder = f"{db_name}_intruder"  # roles are the cluster's: one of this test's own, dropped at the end
    sql(target, f"CREATE ROLE {intruder}")
    try:
        sql(target, "ALTER TABLE notes DISABLE ROW LEVEL SECURITY, FORCE ROW LEVEL SECURITY; "
                    "DROP POLICY own_notes ON notes; "
                    "ALTER TABLE notes DISABLE TRIGGER notes_touch; "
                    "CREATE TRIGGER notes_audit AFTER INSERT ON notes FOR EACH ROW EXECUTE FUNCTION touch(); "
                    "CREATE OR REPLACE FUNCTION touch() RETURNS trigger LANGUAGE plpgsql AS $$ "
                    "BEGIN RETURN NEW; END $$; "
                    "CREATE FUNCTION backdoor() RETURNS int LANGUAGE sql SECURITY DEFINER AS 'SELECT 1'; "
                    "ALTER TYPE mood ADD VALUE 'great'; ALTER DOMAIN positive DROP CONSTRAINT positive_check; "
                    "ALTER TABLE notes SET UNLOGGED; ALTER TABLE notes ALTER COLUMN title TYPE text COLLATE \"C\"; "
                    f"GRANT ALL ON notes TO PUBLIC; ALTER FUNCTION touch() OWNER TO {intruder}; "
                    "ALTER TABLE notes SET (autovacuum_enabled = false); COMMENT ON TABLE notes IS 'changed'; "
                    "CREATE OR REPLACE VIEW recent_notes AS SELECT id, body FROM notes; "
                    "REVOKE EXECUTE ON FUNCTION touch() FROM PUBLIC; GRANT CREATE ON SCHEMA public TO PUBLIC; "
                    "COMMENT ON COLUMN notes.body IS 'markdown'; GRANT SELECT (owner_name) ON notes TO PUBLIC")
        found = drift.find(target, settings).findings
    finally:
        sql(target, f"REASSIGN OWNED BY {intruder} TO CURRENT_USER; DROP OWNED BY {intruder}; DROP ROLE {intruder}")
    assert found == [
        "grant on schema public to PUBLIC: privileges CREATE, USAGE in the database, USAGE in the migrations",
        "extra function public.backdoor()",
        "enum public.mood: values 'ok', 'bad', 'great' in the database, 'ok', 'bad' in the migrations",
        ("extra grant on table public.notes to PUBLIC (DELETE, INSERT, MAINTAIN, REFERENCES, SELECT, TRIGGER, "
         "TRUNCATE, UPDATE)"),
        "table public.notes: unlogged in the database, logged in the migrations",
        "table public.notes: row level security disabled, forced in the database, enabled in the migrations",
        "table public.notes: options autovacuum_enabled=false in the database, none in the migrations",
        "table public.notes: comment 'changed' in the database, 'what users wrote' in the migrations",
        "column public.notes.body: comment 'markdown' in the database, none in the migrations",
        "extra trigger public.notes.notes_audit (AFTER INSERT ON public.notes FOR EACH ROW EXECUTE FUNCTION touch())",
        "trigger public.notes.notes_touch: disabled in the database, enabled in the migrations",
        "missing policy public.notes.own_notes (FOR ALL TO PUBLIC USING ((owner_name = CURRENT_USER)))",
        'column public.notes.title: collation "C" in the database, default in the migrations',
        "extra grant on column public.notes.owner_name to PUBLIC (SELECT)",
        "missing domain constraint public.positive.positive_check (CHECK ((VALUE > 0)))",
        "view public.recent_notes: definition differs",
        "missing grant on function public.touch() to PUBLIC (EXECUTE)",
        "function public.touch(): definition differs",
        f"function public.touch(): owner {intruder} in the database, the migrating role in the migrations",
    ]


def test_a_schema_migrated_by_its_own_role_has_no_drift_for_the_superuser(target, tmp_path, db_name):
    """Owners, grants and a policy TO CURRENT_USER name the role that ran the migrations; the replay runs as
    the superuser, who owns what it builds: both are the migrating role."""
    from dbmigrate import drift, migrate
    from dbmigrate.settings import Settings

    settings = Settings(tmp_path / "home", alembic_config=str(stock_project(tmp_path, linear(SECURED))),
                        project_logging=False)
    with own_role(target, f"{db_name}_app") as as_app:
        migrate.run(settings.project(as_app), "head", upgrade=True, limits=settings.limits, on_step=lambda step: None)
        assert drift.find(target, settings).findings == []


@pytest.mark.slow  # CKAN's 110 revisions, then their replay
def test_a_real_projects_chain_run_as_shipped_by_its_own_role_has_no_drift(target, tmp_path, db_name):
    """CKAN's Alembic chain (110 revisions, from the ckan package the dev extra pins) run as shipped by
    the role that owns CKAN's database, as CKAN's install guide sets it up; drift, run by the superuser,
    replays it into a scratch database the superuser owns: nothing differs, owners included."""
    import ckan.migration

    from dbmigrate import drift, migrate
    from dbmigrate.settings import Settings

    ini = stock_project(tmp_path, [], version_locations=Path(ckan.migration.__file__).parent / "versions")
    settings = Settings(tmp_path / "home", alembic_config=str(ini), project_logging=False)
    role = f"{db_name}_ckan"
    with own_role(target, role) as as_ckan:
        migrate.run(settings.project(as_ckan), "heads", upgrade=True, limits=settings.limits,
                    on_step=lambda step: None)
        found = drift.find(target, settings)
        tables = sql(target, "SELECT tableowner, count(*) FROM pg_tables WHERE schemaname = 'public' GROUP BY 1")
    assert tables == [(role, 27)]
    assert (found.revision, found.findings) == (settings.project().script.get_current_head(), [])
