"""Restores that fail part-way: whatever dies (pg_restore, psql, dbmigrate itself, the
stored object), a restore over the original commits all of the backup or nothing, and
a restore into a new database leaves either a checked copy or no database at all."""

import json
import os
import signal
import subprocess
import threading
import time

import psutil
import pytest

from dbmigrate import auto_rollback, backup, catalogue, db, pgrestore, restore
from dbmigrate.errors import RestoreFailed
from dbmigrate.settings import Settings
from dbmigrate.storage import LocalStorage, S3Storage
from tests.support.helpers import (IN_COPY, LONG_COPY_ROWS, fill, fingerprint_of, finish, one_line_error, scalar,
                                   session, sql, start_cli, wait_until)
from tests.support.projects import linear, stock_project


def wait_for(pg_cluster, database: str, condition: str, proc: subprocess.Popen | None = None) -> None:
    """Until a session of ``database`` matches ``condition`` (SQL over pg_stat_activity)."""
    def matched(conn) -> bool:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"dbmigrate ended first: {proc.stderr.read()}")
        return bool(conn.execute(f"SELECT 1 FROM pg_stat_activity WHERE datname = %s AND {condition}",
                                 (database,)).fetchone())

    with session(pg_cluster.target("postgres")) as conn:
        wait_until(lambda: matched(conn), 60, f"a session of {database} to come to {condition}", 0.01)


def tool(parent_pid: int, name: str) -> psutil.Process:
    found = [p for p in psutil.Process(parent_pid).children(recursive=True) if p.name() == name]
    assert len(found) == 1, f"{name} among the children of {parent_pid}: {found}"
    return found[0]


def backup_via_cli(cli, url) -> dict:
    taken = cli("backup", "--json", env={"DATABASE_URL": url})
    assert taken.returncode == 0, taken.stderr
    return json.loads(taken.stdout)


@pytest.fixture
def local_storage(tmp_path):
    return LocalStorage(tmp_path / "backups")


@pytest.fixture
def big_backup(cli, url, target):
    """A backup of a large table, then the database changed: (manifest, the state now)."""
    fill(target, LONG_COPY_ROWS)
    manifest = backup_via_cli(cli, url)
    sql(target, "DELETE FROM payload WHERE id % 3 = 0; CREATE TABLE added_later (id int)")
    return manifest, fingerprint_of(target)


@pytest.mark.parametrize("victim", ["pg_restore", "psql"])
def test_a_replay_whose_tool_is_killed_mid_copy_commits_nothing(victim, big_backup, pg_cluster, target, url, home):
    """Item 1a and 18: pg_restore or psql SIGKILLed while the data is copied: a one-line
    error naming the signal, and the database exactly as it was."""
    manifest, before = big_backup
    proc = start_cli(home, "restore", manifest["id"], "--yes", "--no-safety-backup", env={"DATABASE_URL": url})
    wait_for(pg_cluster, target.database, IN_COPY, proc)
    tool(proc.pid, victim).send_signal(signal.SIGKILL)
    result = finish(proc)
    assert result.returncode == 1
    assert one_line_error(result.stderr) == ("dbmigrate: error: restore failed, database left as it was: "
                                             f"{victim} was killed by signal 9 (SIGKILL)")
    assert fingerprint_of(target) == before, "killed mid-COPY: nothing may be committed"


def test_dbmigrate_killed_mid_replay_commits_nothing(big_backup, pg_cluster, target, url, home):
    """Item 10: the dbmigrate process SIGKILLed mid-replay: its psql and pg_restore end
    without committing, and none of them is left running."""
    manifest, before = big_backup
    proc = start_cli(home, "restore", manifest["id"], "--yes", "--no-safety-backup", env={"DATABASE_URL": url})
    wait_for(pg_cluster, target.database, IN_COPY, proc)
    tools = [tool(proc.pid, "pg_restore"), tool(proc.pid, "psql")]
    proc.kill()
    proc.wait()
    _, alive = psutil.wait_procs(tools, timeout=60)
    assert alive == [], "pg_restore and psql end with the process that fed them"
    assert fingerprint_of(target) == before


def _replaced_after_the_check(monkeypatch, storage, manifest, body: bytes) -> None:
    """The stored object passes the pre-check, then changes before the replay reads it."""
    check_stored = pgrestore.check_stored

    def check_then_replace(*args, **kwargs):
        check_stored(*args, **kwargs)
        storage.client.put_object(Bucket=storage.bucket, Key=storage._key(manifest.key), Body=body)

    monkeypatch.setattr(pgrestore, "check_stored", check_then_replace)


@pytest.mark.parametrize("change", ["truncated", "another backup"])
def test_s3_object_that_changes_after_the_check_commits_nothing(change, s3_storage, target, monkeypatch):
    """Item 1b: what the replay reads is not what was checked; known only at the end of
    the stream (a truncated object, or another valid backup with the wrong sha256)."""
    fill(target, 20_000)
    manifest = backup.take(target, s3_storage)
    with s3_storage.open(manifest.key) as body:
        original = body.read()
    sql(target, "DELETE FROM payload WHERE id > 100")
    if change == "truncated":
        replacement = original[:-5]  # all the data, without the end of its last block
    else:
        other = backup.take(target, s3_storage)
        with s3_storage.open(other.key) as body:
            replacement = body.read()
    sql(target, "CREATE TABLE added_later (id int)")
    before = fingerprint_of(target)
    _replaced_after_the_check(monkeypatch, s3_storage, manifest, replacement)

    with pytest.raises(RestoreFailed, match="restore failed, database left as it was: "):
        restore.over_original(target, s3_storage, manifest, 10, None)
    assert fingerprint_of(target) == before


def test_automatic_rollback_whose_restore_is_killed_reports_failure(cli, url, pg_cluster, target, tmp_path):
    """Item 1c: the automatic rollback falls back to the backup (the downgrade fails) and
    pg_restore dies mid-COPY: the rollback says it failed, and nothing is half-restored."""
    ini = str(stock_project(tmp_path, linear(
        f"op.execute('CREATE TABLE t1 AS SELECT g AS id, md5(g::text) AS body FROM generate_series(1, {LONG_COPY_ROWS}) g')",
        ("op.create_table('t2', sa.Column('id', sa.Integer, primary_key=True))", "op.execute('SELECT 1/0')"),
    )))
    env = {"DATABASE_URL": url}
    assert cli("upgrade", "-r", "r1", "--yes", "--alembic-config", ini, env=env).returncode == 0
    storage = LocalStorage(tmp_path / "backups")
    before = fingerprint_of(target)
    manifest = backup.take(target, storage)
    assert cli("upgrade", "-r", "r2", "--yes", "--alembic-config", ini, env=env).returncode == 0
    at_r2 = fingerprint_of(target)
    settings = Settings(home=tmp_path, alembic_config=ini)

    def kill_pg_restore_mid_copy():
        wait_for(pg_cluster, target.database, IN_COPY)
        tool(os.getpid(), "pg_restore").send_signal(signal.SIGKILL)

    killer = threading.Thread(target=kill_pg_restore_mid_copy)
    killer.start()
    result = auto_rollback.restore_starting_state(target, settings.project(target), settings, before, manifest, storage)
    killer.join()
    assert (result.performed, result.method, result.succeeded, result.revision_after) == (True, "restore", False, "r2")
    assert result.detail == (
        "downgrade failed (revision r2 failed: division by zero); restoring backup "
        f"{manifest.id} failed (restore failed, database left as it was: pg_restore was killed by signal 9 (SIGKILL))"
    )
    assert fingerprint_of(target) == at_r2, "a failed rollback leaves the database as the failed run did"


def test_restore_gives_up_on_a_held_lock_and_names_the_holder(cli, url, pg_cluster, target, home):
    """Item 13: a session holding a lock on a table: the restore waits no longer than the
    lock timeout, names that session, and blocks other readers no longer either."""
    fill(target, 2000)
    manifest = backup_via_cli(cli, url)
    sql(target, "DELETE FROM payload WHERE id > 10")
    before = fingerprint_of(target)
    with session(target) as holder, session(target) as reader:
        holder.autocommit = False
        holder.execute("SELECT count(*) FROM payload")  # an open transaction that read the table
        holder_pid = holder.info.backend_pid
        started = time.monotonic()
        proc = start_cli(home, "restore", manifest["id"], "--yes", "--no-safety-backup", "--lock-timeout", "1",
                         env={"DATABASE_URL": url})
        wait_for(pg_cluster, target.database, "wait_event_type = 'Lock'", proc)
        reading = time.monotonic()
        reader.execute("SELECT count(*) FROM payload")
        blocked = time.monotonic() - reading
        result = finish(proc)
        elapsed = time.monotonic() - started
        holder.rollback()
    assert result.returncode == 1
    line = one_line_error(result.stderr)
    assert line.startswith("dbmigrate: error: restore failed, database left as it was: a lock was not granted "
                           "within the lock timeout (1s); held by ")
    assert f"pid {holder_pid} (" in line and "idle in transaction: SELECT count(*) FROM payload" in line
    assert blocked < 1.5, f"a reader waited {blocked:.1f}s behind the restore"
    assert elapsed < 15
    assert fingerprint_of(target) == before


HOSTILE = ['x" TEMPLATE "template0', "semi; colon", "it's \"quoted\" :name %s 100%"]


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_target_db_names_create_exactly_that_database(name, cli, url, pg_cluster, target):
    """Item 8: a --target-db name is one identifier, whatever it holds."""
    fill(target, 50)
    manifest = backup_via_cli(cli, url)
    existing = set(pg_cluster.databases())
    result = cli("restore", manifest["id"], "--target-db", name, env={"DATABASE_URL": url})
    try:
        assert result.returncode == 0, result.stderr
        assert set(pg_cluster.databases()) - existing == {name}
        assert fingerprint_of(target.with_database(name)).row_counts == {"public.payload": 50}
    finally:
        for leftover in set(pg_cluster.databases()) - existing:
            db.drop_database(target, leftover, 10)


def test_schema_names_with_quotes_and_large_objects_are_restored(local_storage, target):
    """Item 8 (the DROP SCHEMA list) and large objects, which live outside any schema."""
    sql(target, 'CREATE SCHEMA "o\'dd ""schema""; x :y 5%"; CREATE TABLE "o\'dd ""schema""; x :y 5%".t AS SELECT 1 AS id')
    kept = scalar(target, "SELECT lo_from_bytea(0, 'in the backup')")
    manifest = backup.take(target, local_storage)
    sql(target, 'INSERT INTO "o\'dd ""schema""; x :y 5%".t VALUES (2); SELECT lo_from_bytea(0, \'made later\')')
    sql(target, "SELECT lo_put(%s, 0, 'CHANGED')", kept)
    restore.over_original(target, local_storage, manifest, 10, None)
    assert fingerprint_of(target).row_counts == {"o'dd \"schema\"; x :y 5%.t": 1}
    assert sql(target, "SELECT oid, lo_get(oid) FROM pg_largeobject_metadata") == [(kept, b"in the backup")]


def test_restore_into_a_new_database_checks_the_row_counts(cli, url, pg_cluster, target, home):
    """Item 19: a copy whose row counts differ from the manifest is refused and dropped."""
    fill(target, 50)
    manifest = backup_via_cli(cli, url)
    path = home / "backups" / catalogue.manifest_key(manifest["key"])
    path.write_text(json.dumps({**manifest, "row_counts": {"public.payload": 49}}))
    existing = set(pg_cluster.databases())
    result = cli("restore", manifest["id"], "--target-db", target.database + "_copy", env={"DATABASE_URL": url})
    assert result.returncode == 1
    assert one_line_error(result.stderr) == ("dbmigrate: error: row counts after the restore differ from the "
                                             "manifest in public.payload")
    assert set(pg_cluster.databases()) == existing


@pytest.mark.parametrize("where", ["local", "s3"])
def test_restore_into_a_new_database_without_its_dump(where, cli, url, pg_cluster, target, s3_endpoint, s3_storage):
    """Item 14: the manifest is there, the dump is not: one line, and no database made (the
    catalogue sees the dump is missing before anything is created)."""
    fill(target, 10)
    env = {"DATABASE_URL": url}
    if where == "s3":
        env |= {"AWS_ENDPOINT_URL": s3_endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                "AWS_DEFAULT_REGION": "us-east-1", "DBMIGRATE_BACKUP_STORAGE": f"s3://{s3_storage.bucket}/b"}
    taken = cli("backup", "--json", env=env)
    assert taken.returncode == 0, taken.stderr
    manifest = json.loads(taken.stdout)
    if where == "s3":
        S3Storage(s3_storage.client, s3_storage.bucket, "b").delete(manifest["key"])
    else:
        os.unlink(manifest["location"])
    existing = set(pg_cluster.databases())
    result = cli("restore", manifest["id"], "--target-db", target.database + "_copy", env=env)
    assert result.returncode == 2
    assert one_line_error(result.stderr) == f"dbmigrate: error: backup '{manifest['id']}' is damaged (dump missing): choose another one"
    assert set(pg_cluster.databases()) == existing


def test_restore_over_the_original_checks_the_row_counts_before_its_commit(cli, url, target, home):
    """Issue 15 item 28: the manifest says 49 rows, the dump holds 50: rolled back, the original as it was."""
    fill(target, 50)
    manifest = backup_via_cli(cli, url)
    path = home / "backups" / catalogue.manifest_key(manifest["key"])
    path.write_text(json.dumps({**manifest, "row_counts": {"public.payload": 49}}))
    sql(target, "DELETE FROM payload WHERE id <= 10; CREATE TABLE added_later (id int)")
    before = fingerprint_of(target)
    result = cli("restore", manifest["id"], "--yes", env={"DATABASE_URL": url})
    assert result.returncode == 1
    assert one_line_error(result.stderr) == ("dbmigrate: error: restore failed, database left as it was: row counts "
                                             "after the restore differ from the manifest in public.payload")
    assert fingerprint_of(target) == before
