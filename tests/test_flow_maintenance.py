"""The maintenance flows, db-health and db-backup, against a real Prefect API (the test harness), PostgreSQL and
S3."""

from tests.support.flows import artifact, run_named
from tests.support.helpers import sql
from tests.support.projects import linear, stock_project, table_step


def test_db_health_reports_pending_revisions_and_drift(environment, target, tmp_path, cli, url, pg_cluster):
    ini = str(stock_project(tmp_path, linear(table_step("t1"), table_step("t2"))))
    assert cli("upgrade", "-r", "r1", "--yes", "--alembic-config", ini, env={"DATABASE_URL": url}).returncode == 0
    name = environment("staging")

    state = run_named("db-health", environment=name, alembic_config=ini)
    assert state.is_completed(), state.message
    checks = {c["name"]: c for c in state.result()}
    assert checks["pending_revisions"]["status"] == "warn" and checks["drift"]["status"] == "ok"
    assert checks["drift"]["data"] == {"revision": "r1", "drift": False, "findings": [],
                                       "models": "models not compared: the database is not at head (r2)"}

    sql(target, "ALTER TABLE t1 ADD COLUMN hotfix text")  # a change made by hand, outside Alembic
    state = run_named("db-health", environment=name, alembic_config=ini)
    assert state.is_failed()
    assert state.message == ("health failed: drift: 1 difference(s) from the migrations at r1: extra column "
                             "public.t1.hotfix (text); models not compared: the database is not at head (r2)")
    report = artifact("db-migrate-staging-health")
    assert "| drift | fail |" in report
    assert report.endswith("### drift: 1 finding(s)\n\n- extra column public.t1.hotfix (text)")
    assert not [n for n in pg_cluster.databases() if n.startswith("dbmigrate_drift_")], "scratch database dropped"


def test_db_backup_to_an_s3_bucket_block_prunes_but_keeps_the_newest_verified(environment, target, s3_endpoint):
    import uuid

    from dbmigrate import catalogue
    from dbmigrate.storage import S3Storage
    from dbmigrate.target import DatabaseTarget
    from tests.support.helpers import s3_bucket_block

    block = s3_bucket_block(s3_endpoint, "nightly-" + uuid.uuid4().hex[:8], "db")
    storage = S3Storage.from_block(block)
    storage.client.create_bucket(Bucket=block.bucket_name)
    block.save("nightly-backups", overwrite=True)
    name = environment("production")
    production = DatabaseTarget(target.url, name)

    def nightly(**parameters) -> str:
        state = run_named("db-backup", environment=name, backup_storage="s3-bucket/nightly-backups", **parameters)
        assert state.is_completed(), state.message
        return state.result()["id"]

    verified = nightly(verify_restore=True)
    unverified = nightly(verify_restore=False, keep_last=1)
    assert [m.id for m in catalogue.list_backups(storage, production)] == [unverified, verified], \
        "the newest verified backup is never pruned"
    newest = nightly(verify_restore=True, keep_last=1)
    assert [m.id for m in catalogue.list_backups(storage, production)] == [newest]
    assert sorted(storage.keys("")) == sorted(f"production/{target.database}/{newest}.{ext}" for ext in ("dump", "json"))
