"""Backups against the real PostgreSQL and moto's S3 server: taken, verified,
listed, restored, pruned, and every failure leaving nothing behind."""

import json
import subprocess
import threading
import time

import pytest

from dbmigrate import backup, catalogue, db, restore
from dbmigrate.backup import DumpOptions
from dbmigrate.errors import BackupUnreadable, ConfigError, DumpFailed, RestoreFailed, StorageFailed
from dbmigrate.storage import LocalStorage
from tests.support.helpers import fill, fingerprint_of, last_report, reports_in, scalar, session, sql


def stamp(target, revision: str) -> None:
    """The database at ``revision``, as Alembic records it."""
    sql(target, "CREATE TABLE IF NOT EXISTS alembic_version (version_num varchar(32) PRIMARY KEY); "
                "DELETE FROM alembic_version")
    sql(target, "INSERT INTO alembic_version VALUES (%s)", revision)


def revision_of(target) -> list[str]:
    return [row[0] for row in sql(target, "SELECT version_num FROM alembic_version")]


@pytest.fixture
def local_storage(tmp_path):
    return LocalStorage(tmp_path / "backups")


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path):
    if request.param == "local":
        return LocalStorage(tmp_path / "backups")
    return request.getfixturevalue("s3_storage")


def test_backup_manifest_verify_and_list(storage, pg_cluster, target):
    fill(target, 1000)
    stamp(target, "0003")
    manifest = backup.take(target, storage, DumpOptions(verify_restore=True))
    assert manifest.row_counts == {"public.alembic_version": 1, "public.payload": 1000}
    assert manifest.revision == "0003"
    assert manifest.verified and manifest.checks == {"sha256": True, "pg_restore_list": True, "restore": True}
    assert manifest.key == f"test/{target.database}/{manifest.id}.dump" and manifest.id.endswith("-0003")
    assert manifest.compression in ("zstd:3", "gzip:6") and manifest.size_bytes > 0
    stored = json.loads(storage.read_text(manifest.manifest_key))
    assert stored["sha256"] == manifest.sha256 and stored["server_version"] and stored["pg_dump_version"]
    with storage.open(manifest.key) as body:
        import hashlib

        assert hashlib.sha256(body.read()).hexdigest() == manifest.sha256
    second = backup.take(target, storage)
    assert not second.verified and second.checks == {"sha256": True, "pg_restore_list": True}
    assert [m.id for m in catalogue.list_backups(storage, target)] == [second.id, manifest.id]
    scratch = [n for n in pg_cluster.databases() if n.startswith("dbmigrate_verify_")]
    assert scratch == [], "the scratch database of --verify-restore must be dropped"


def test_row_counts_come_from_the_dumped_snapshot(local_storage, target):
    """Rows inserted while the dump runs are neither dumped nor counted."""
    fill(target, 200_000)
    inserted = threading.Event()

    def insert_once(size, rate):
        if not inserted.is_set():
            sql(target, "INSERT INTO payload SELECT g, 'late', '{}' FROM generate_series(1000001, 1000500) g")
            inserted.set()

    manifest = backup.take(target, local_storage, DumpOptions(verify_restore=True, progress_interval_s=0),
                           on_progress=insert_once)
    assert inserted.is_set()
    assert manifest.row_counts == {"public.payload": 200_000} and manifest.verified


def test_the_manifest_names_the_revision_that_was_dumped(cli, url, pg_cluster, target, tmp_path):
    """The revision is read in the dump's snapshot: a migration committing before the snapshot
    is in both the dump and the manifest, one committing after it (pg_dump running) in neither.
    A pg_dump shim on PG_BIN_DIR commits those changes: 0002 when pg_dump is looked up (after
    an earlier connection could have read the revision, before the snapshot), 0003 just before
    the dump itself starts (after the snapshot was exported)."""
    from dbmigrate import pgtools

    fill(target, 1000)
    stamp(target, "0001")
    with db.connect(target) as conn:
        major = db.server_version(conn)[0]
    conninfo = tmp_path / "conninfo"  # the password stays out of the shim's argv
    conninfo.write_text(url)
    conninfo.chmod(0o600)
    shim_dir = tmp_path / "bin"
    shim_dir.mkdir()
    (shim_dir / "pg_dump").write_text(
        "#!/bin/sh\n"
        'case "$*" in *--snapshot=*) revision=0003 ;; *) revision=0002 ;; esac\n'
        f'{pgtools.find("psql", major)} --no-psqlrc --quiet --set=ON_ERROR_STOP=1 "$(cat {conninfo})" '
        '--command="UPDATE alembic_version SET version_num = \'$revision\'" >/dev/null || exit 99\n'
        f'exec {pgtools.find("pg_dump", major)} "$@"\n'
    )
    (shim_dir / "pg_dump").chmod(0o755)
    env = {"DATABASE_URL": url, "PG_BIN_DIR": str(shim_dir)}

    taken = cli("backup", "--json", env=env)
    assert taken.returncode == 0, taken.stderr
    manifest = json.loads(taken.stdout)
    assert revision_of(target) == ["0003"], "the shim committed both changes"
    copy = target.database + "_copy"
    restored = cli("restore", manifest["id"], "--target-db", copy, env=env)
    try:
        assert restored.returncode == 0, restored.stderr
        assert revision_of(target.with_database(copy)) == ["0002"]
    finally:
        pg_cluster.drop_database(copy)
    assert manifest["revision"] == "0002" and manifest["id"].endswith("-0002")


def test_pg_dump_failure_leaves_nothing(storage, target):
    fill(target, 10)
    with session(target) as blocker:
        blocker.autocommit = False
        blocker.execute("LOCK TABLE payload IN ACCESS EXCLUSIVE MODE")
        with pytest.raises(DumpFailed, match="pg_dump failed: .*statement timeout .*LOCK TABLE public.payload"):
            backup.take(target, storage, DumpOptions(table_lock_wait_s=1))
        blocker.rollback()
    assert storage.keys("") == [] and catalogue.list_backups(storage, target) == []


def test_pg_dump_dying_mid_stream_leaves_nothing(storage, target):
    fill(target, 400_000)  # more than one S3 part, so the upload is under way when pg_dump dies

    def kill_pg_dump(size, rate):
        sql(target, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'pg_dump'")

    with pytest.raises(DumpFailed, match="pg_dump failed"):
        backup.take(target, storage, DumpOptions(progress_interval_s=0), on_progress=kill_pg_dump)
    assert storage.keys("") == [] and catalogue.list_backups(storage, target) == []


def test_disk_full_removes_the_partial_file(target, tmp_path):
    mountpoint = tmp_path / "small-disk"
    mountpoint.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mountpoint)],
                             capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        fill(target, 100_000)
        storage = LocalStorage(mountpoint / "backups")
        with pytest.raises(StorageFailed, match="storage: writing .* failed: No space left on device"):
            backup.take(target, storage)
        assert storage.keys("") == []
        assert not any(pg_dump_processes()), "pg_dump must not be left running"
    finally:
        subprocess.run(["umount", str(mountpoint)], check=True)


def pg_dump_processes():
    """This process's pg_dump children: other xdist workers (and anything else on the machine) run their own."""
    import psutil

    return [p for p in psutil.Process().children(recursive=True) if p.name() == "pg_dump"]


def test_missing_bucket_fails_before_anything_is_stored(s3_storage, target):
    from dbmigrate.storage import S3Storage

    missing = S3Storage(s3_storage.client, "no-such-bucket")
    with pytest.raises(StorageFailed, match="storage: upload to s3://no-such-bucket/.* failed: .*NoSuchBucket"):
        backup.take(target, missing)


def test_s3_endpoint_going_away_mid_upload(target):
    """The endpoint dies after the first part and comes back: the multipart upload is
    aborted, nothing is listed, and the error names the storage step."""
    from moto.server import ThreadedMotoServer

    from dbmigrate.storage import S3Storage
    from tests.support.helpers import s3_bucket_block
    from tests.support.pgcluster import free_port

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    # No botocore retries, so the outage outlasts them and the upload fails at once.
    block = s3_bucket_block(f"http://127.0.0.1:{port}", "outage", client_config={"retries": {"max_attempts": 1}})
    storage = S3Storage.from_block(block)
    storage.client.create_bucket(Bucket="outage")
    fill(target, 400_000)  # well over one 16 MiB part
    replacement = {}

    def cut_after_first_part(size, rate):
        if size > storage.PART_SIZE + (1 << 20) and "server" not in replacement:
            server.stop()
            replacement["server"] = None

            def come_back():
                time.sleep(3)
                replacement["server"] = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
                replacement["server"].start()

            threading.Thread(target=come_back).start()

    try:
        with pytest.raises(StorageFailed, match="storage: upload to s3://outage/.* failed"):
            backup.take(target, storage, DumpOptions(progress_interval_s=0), on_progress=cut_after_first_part)
        assert storage.client.list_multipart_uploads(Bucket="outage").get("Uploads", []) == []
        assert storage.keys("") == [] and catalogue.list_backups(storage, target) == []
    finally:
        if replacement.get("server"):
            replacement["server"].stop()


@pytest.fixture
def changed_after_backup(storage, target):
    """A backup, then changes a migration might make: (manifest, the state backed up, the state now)."""
    fill(target, 500)
    before = fingerprint_of(target)
    manifest = backup.take(target, storage)
    sql(target, "DELETE FROM payload WHERE id <= 100; CREATE TABLE added_later (id int REFERENCES payload(id))")
    return manifest, before, fingerprint_of(target)


def test_restore_into_a_new_database(storage, target, changed_after_backup):
    manifest, _, changed = changed_after_backup
    copy = restore.into_new_database(target, storage, manifest, target.database + "_copy", 10)
    try:
        assert fingerprint_of(target.with_database(copy.database)).row_counts == {"public.payload": 500}
    finally:
        db.drop_database(target, copy.database, 10)
    assert fingerprint_of(target) == changed, "the original is left alone"


def test_restore_over_the_original_takes_a_safety_backup_first(storage, target, changed_after_backup):
    manifest, before, changed = changed_after_backup
    result = restore.over_original(target, storage, manifest, 10,
                                   lambda: backup.take(target, storage))
    assert fingerprint_of(target) == before
    assert result.safety_backup.row_counts == changed.row_counts
    assert {m.id for m in catalogue.list_backups(storage, target)} == {manifest.id, result.safety_backup.id}


def test_failed_restore_leaves_the_database_as_it_was(local_storage, target):
    sql(target, "CREATE ROLE short_lived; CREATE TABLE owned (id int); ALTER TABLE owned OWNER TO short_lived")
    manifest = backup.take(target, local_storage)
    sql(target, "ALTER TABLE owned OWNER TO postgres; DROP ROLE short_lived; INSERT INTO owned VALUES (1), (2)")
    before = fingerprint_of(target)
    with pytest.raises(RestoreFailed, match='restore failed, database left as it was: .*role "short_lived"'):
        restore.over_original(target, local_storage, manifest, 10, None)
    assert fingerprint_of(target) == before


def test_a_corrupted_backup_is_refused_before_touching_the_database(local_storage, target):
    fill(target, 100)
    manifest = backup.take(target, local_storage)
    sql(target, "DELETE FROM payload")
    before = fingerprint_of(target)
    path = local_storage.root / manifest.key
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(BackupUnreadable, match="verify: .* does not match its sha256"):
        restore.over_original(target, local_storage, manifest, 10, None)
    assert fingerprint_of(target) == before


def test_prune_keeps_the_newest_verified(local_storage, target):
    fill(target, 10)
    verified = backup.take(target, local_storage, DumpOptions(verify_restore=True))
    newer = [backup.take(target, local_storage) for _ in range(3)]
    deleted = catalogue.prune(local_storage, target, keep_last=1, keep_days=None)
    assert {m.id for m in deleted} == {newer[0].id, newer[1].id}
    assert [m.id for m in catalogue.list_backups(local_storage, target)] == [newer[2].id, verified.id]
    assert sorted(local_storage.keys("")) == sorted(
        k for m in (newer[2], verified) for k in (m.key, m.manifest_key)
    )
    assert catalogue.prune(local_storage, target, keep_last=1, keep_days=1) == [], "all are younger than a day"


@pytest.fixture
def taken_by_cli(cli, url, target) -> dict:
    """`dbmigrate backup --verify-restore` of 50 rows: its manifest."""
    fill(target, 50)
    taken = cli("backup", "--verify-restore", "--json", env={"DATABASE_URL": url})
    assert taken.returncode == 0, taken.stderr
    return json.loads(taken.stdout)


def test_backup_command_verifies_and_lists(cli, url, taken_by_cli):
    assert taken_by_cli["verified"] and taken_by_cli["row_counts"] == {"public.payload": 50}
    listed = cli("backups", "list", env={"DATABASE_URL": url})
    assert listed.returncode == 0 and taken_by_cli["id"] in listed.stdout and "verified" in listed.stdout


def test_restore_command_asks_for_yes_without_a_terminal(cli, url, target, taken_by_cli):
    sql(target, "DELETE FROM payload")
    refused = cli("restore", taken_by_cli["id"], env={"DATABASE_URL": url})
    assert refused.returncode == 2 and "no terminal to ask on (pass --yes)" in refused.stderr
    assert fingerprint_of(target).row_counts == {"public.payload": 0}


def test_restore_command_takes_a_safety_backup_first(cli, url, target, taken_by_cli):
    sql(target, "DELETE FROM payload")
    restored = cli("restore", taken_by_cli["id"], "--yes", env={"DATABASE_URL": url})
    assert restored.returncode == 0, restored.stderr
    assert fingerprint_of(target).row_counts == {"public.payload": 50}
    assert "safety backup of the previous state" in restored.stdout
    listed = json.loads(cli("backups", "list", "--json", env={"DATABASE_URL": url}).stdout)
    assert [m["row_counts"] for m in listed] == [{"public.payload": 0}, {"public.payload": 50}]


def test_a_restore_from_the_command_line_leaves_the_report_the_flow_leaves(cli, url, target, home, taken_by_cli):
    """Issue 16 item 1: a restore over the database, one into a new database and one refused each leave
    the report of the db-rollback flow's restore (tests/test_flows.py), through the same pipeline."""
    env = {"DATABASE_URL": url}
    sql(target, "DELETE FROM payload WHERE id <= 10")
    restored = cli("restore", taken_by_cli["id"], "--yes", env=env)
    assert restored.returncode == 0, restored.stderr
    over = last_report(home)
    assert f"report:   {reports_in(home)[-1]}" in restored.stdout
    safety = json.loads(cli("backups", "list", "--json", env=env).stdout)[0]
    assert safety["row_counts"] == {"public.payload": 40}
    assert (over["operation"], over["status"], over["error"], over["target_revision"]) == ("restore", "succeeded",
                                                                                            None, "base")
    assert over["restore"] == {"backup_id": taken_by_cli["id"], "tables_changing": ["public.payload"],
                               "safety_backup": safety["id"]}
    assert (over["approval"]["approved"], over["approval"]["via"]) == (True, "--yes")
    assert over["database"]["name"] == target.database

    copy = target.database + "_report"
    into = cli("restore", taken_by_cli["id"], "--target-db", copy, env=env)
    assert into.returncode == 0, into.stderr
    new = last_report(home)
    assert (new["operation"], new["status"], new["approval"]) == ("restore", "succeeded", None)
    assert new["restore"] == {"backup_id": taken_by_cli["id"], "tables_changing": ["public.payload"],
                              "safety_backup": None, "new_database": copy}
    assert scalar(target.with_database(copy), "SELECT count(*) FROM payload") == 50
    db.drop_database(target, copy, 5)

    refused = cli("restore", taken_by_cli["id"], env=env)
    assert refused.returncode == 2
    assert (last_report(home)["status"], last_report(home)["error"]["phase"]) == ("failed", "approval")
    assert len(reports_in(home)) == 3


def test_restore_command_refuses_an_unknown_backup(cli, url, taken_by_cli):
    unknown = cli("restore", "20000101T000000.000Z-nope", "--yes", env={"DATABASE_URL": url})
    assert unknown.returncode == 2 and "no valid backup '20000101T000000.000Z-nope'" in unknown.stderr


def test_prune_command_keeps_the_newest_and_the_verified(cli, url, taken_by_cli):
    env = {"DATABASE_URL": url}
    assert cli("backup", env=env).returncode == 0
    pruned = cli("backups", "prune", "--keep-last", "1", env=env)
    assert pruned.returncode == 0 and "nothing to prune" in pruned.stdout, "the newest and the verified one stay"
    remaining = json.loads(cli("backups", "list", "--json", env=env).stdout)
    assert [m["id"] for m in remaining][1:] == [taken_by_cli["id"]]


def test_parallel_directory_format(local_storage, s3_storage, target):
    fill(target, 20_000)
    sql(target, "CREATE TABLE second AS SELECT * FROM payload WHERE id <= 500")
    manifest = backup.take(target, local_storage, DumpOptions(jobs=2, verify_restore=True))
    assert manifest.format == "directory" and manifest.key.endswith(".dir") and manifest.verified
    assert manifest.row_counts == {"public.payload": 20_000, "public.second": 500}
    assert (local_storage.root / manifest.key / "toc.dat").is_file()

    copy = restore.into_new_database(target, local_storage, manifest, target.database + "_par", 10, jobs=2)
    try:
        assert fingerprint_of(target.with_database(copy.database)).row_counts == manifest.row_counts
    finally:
        db.drop_database(target, copy.database, 10)

    sql(target, "DROP TABLE second")
    restore.over_original(target, local_storage, manifest, 10, None)
    assert fingerprint_of(target).row_counts == manifest.row_counts

    listed = catalogue.catalogue(local_storage, target).backups
    assert [(b.manifest.id, b.stored_size, b.damage) for b in listed] == [(manifest.id, manifest.size_bytes, None)]
    with pytest.raises(ConfigError, match="--jobs needs a local directory"):
        backup.take(target, s3_storage, DumpOptions(jobs=2))


def test_plain_s3_url_uses_boto3_credentials_without_prefect(cli, url, s3_endpoint, s3_storage, target):
    env = {"DATABASE_URL": url, "AWS_ENDPOINT_URL": s3_endpoint, "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "DBMIGRATE_BACKUP_STORAGE": f"s3://{s3_storage.bucket}/plain"}
    taken = cli("backup", "--json", env=env)
    assert taken.returncode == 0, taken.stderr
    manifest = json.loads(taken.stdout)
    assert manifest["location"].startswith(f"s3://{s3_storage.bucket}/plain/url/{target.database}/")
    assert [m["id"] for m in json.loads(cli("backups", "list", "--json", env=env).stdout)] == [manifest["id"]]
