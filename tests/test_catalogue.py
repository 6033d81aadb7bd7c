"""The backup catalogue under attack and failure: hostile and damaged manifests, hostile
names, retention that would delete everything, S3 failing, a disk too full for the manifest.
Real PostgreSQL, real pg_dump, moto's S3 server on loopback, a small tmpfs."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dbmigrate import backup, catalogue
from dbmigrate.errors import ConfigError
from dbmigrate.storage import LocalStorage
from dbmigrate.target import DatabaseTarget
from tests.support.helpers import one_line_error, sql
from tests.support.pgcluster import free_port


def small_table(target, rows: int = 20) -> None:
    sql(target, "CREATE TABLE item (id int PRIMARY KEY, name text)")
    sql(target, "INSERT INTO item SELECT g, 'item ' || g FROM generate_series(1, %s) g", rows)


def plant_manifest(storage: LocalStorage, like: catalogue.Manifest, backup_name: str, **fields) -> str:
    """A manifest beside the real ones, copied from ``like`` with ``fields`` changed."""
    key = f"{like.key.rsplit('/', 1)[0]}/{backup_name}.json"
    data = {**json.loads(like.to_json()), "id": backup_name, "created_at": "2000-01-01T00:00:00+00:00", **fields}
    (storage.root / key).write_text(json.dumps(data))
    return key


@pytest.fixture
def store(tmp_path) -> LocalStorage:
    return LocalStorage(tmp_path / "store" / "backups")


@pytest.fixture
def as_url(target) -> DatabaseTarget:
    """The target as the CLI sees it with DATABASE_URL (environment "url")."""
    return DatabaseTarget(target.url, "url")


def test_prune_never_deletes_what_a_manifest_names_outside_the_storage(cli, url, target, as_url, store, tmp_path):
    """Item 6: manifests naming an absolute path and a ../ path; both victims live outside the storage."""
    small_table(target)
    env = {"DATABASE_URL": url}
    taken = cli("backup", "--json", "--storage", str(store.root), env=env)
    assert taken.returncode == 0, taken.stderr
    good = catalogue.Manifest.from_json(taken.stdout)
    absolute_victim, relative_victim = tmp_path / "absolute-victim", tmp_path / "relative-victim"
    for victim in (absolute_victim, relative_victim):
        victim.write_text("not a backup: must survive any prune")
    # <root>/../../relative-victim is tmp_path/relative-victim
    planted = [
        plant_manifest(store, good, "20000101T000000.000Z-abs", key=str(absolute_victim)),
        plant_manifest(store, good, "20000101T000000.001Z-rel", key="../../relative-victim"),
    ]

    pruned = cli("backups", "prune", "--keep-last", "1", "--storage", str(store.root), env=env)
    assert pruned.returncode == 0, pruned.stderr
    assert absolute_victim.exists() and relative_victim.exists()
    warnings = pruned.stderr.splitlines()
    assert len(warnings) == 2 and all(w.startswith("dbmigrate: warning: skipped damaged manifest") for w in warnings)
    assert all(any(key in w for w in warnings) for key in planted), pruned.stderr
    assert "nothing to prune" in pruned.stdout
    assert [m.id for m in catalogue.list_backups(store, as_url)] == [good.id]


def test_a_dump_symlinked_out_of_the_storage_is_never_read(target, store, tmp_path):
    """Item 6: a planted symlink as a dump, with a manifest that names it properly."""
    small_table(target)
    good = backup.take(target, store)
    outside = tmp_path / "outside.dump"
    outside.write_bytes((store.root / good.key).read_bytes())
    name = "20000101T000000.000Z-link"
    link = store.root / f"{good.key.rsplit('/', 1)[0]}/{name}.dump"
    link.symlink_to(outside)
    plant_manifest(store, good, name, key=f"{good.key.rsplit('/', 1)[0]}/{name}.dump")

    assert [m.id for m in catalogue.list_backups(store, target)] == [good.id]
    with pytest.raises(ConfigError, match="the manifest of backup .* is damaged \\(refusing storage key"):
        catalogue.find(store, target, name)


def test_an_environment_named_dotdot_writes_only_inside_the_storage(cli, url, target, store):
    """Item 6: DBMIGRATE_ENVIRONMENT=.. used to put the backup beside the storage directory."""
    small_table(target)
    outside = store.root.parent
    taken = cli("backup", "--json", "--storage", str(store.root), env={"DATABASE_URL": url, "DBMIGRATE_ENVIRONMENT": ".."})
    assert taken.returncode == 0, taken.stderr
    written = [p for p in outside.rglob("*") if p.is_file()]
    assert written and all(p.is_relative_to(store.root) for p in written), written
    assert json.loads(taken.stdout)["key"].startswith(f"__/{target.database}/")
    assert catalogue.prefix(DatabaseTarget(target.url, "..").with_database("..")) == "__/__/", "a database named .."


def test_s3_keys_follow_the_same_rules(s3_storage, target):
    """Item 6 on S3: a manifest naming an object outside its own prefix is skipped, never followed."""
    small_table(target)
    good = backup.take(target, s3_storage)
    s3_storage.write_text("victims/precious.dump", "another environment's backup")
    for name, key in (("20000101T000000.000Z-other", "victims/precious.dump"),
                      ("20000101T000000.001Z-up", "../victims/precious.dump")):
        data = {**json.loads(good.to_json()), "id": name, "key": key, "created_at": "2000-01-01T00:00:00+00:00"}
        s3_storage.write_text(f"{catalogue.prefix(target)}{name}.json", json.dumps(data))

    assert catalogue.prune(s3_storage, target, keep_last=1, keep_days=None) == []
    assert s3_storage.read_text("victims/precious.dump") == "another environment's backup"
    assert len(catalogue.catalogue(s3_storage, target).skipped) == 2
    with pytest.raises(ConfigError, match="refusing storage key"):
        s3_storage.delete("test/../victims/precious.dump")


@pytest.mark.parametrize("retention, says", [
    (["--keep-last", "0"], "--keep-last 0 refused: it could delete every backup"),
    (["--keep-last", "-1"], "--keep-last -1 refused"),
    (["--keep-last", "1", "--keep-days", "nan"], "argument --keep-days: must be a number of days"),
    (["--keep-last", "1", "--keep-days", "inf"], "argument --keep-days: must be a number of days"),
    (["--keep-last", "1", "--keep-days", "0"], "--keep-days must be a finite number of days above 0"),
], ids=["keep-last 0", "keep-last -1", "keep-days nan", "keep-days inf", "keep-days 0"])
def test_keep_last_below_one_and_bad_keep_days_are_refused(retention, says, cli, url, target, store):
    """Item 7: a plain backup is only "checked"; --keep-last 0 used to delete it, and --keep-days nan
    was a traceback."""
    small_table(target)
    env = {"DATABASE_URL": url}
    assert cli("backup", "--storage", str(store.root), env=env).returncode == 0
    before = store.keys("")
    result = cli("backups", "prune", *retention, "--storage", str(store.root), env=env)
    assert result.returncode == 2 and says in one_line_error(result.stderr), result.stderr
    assert store.keys("") == before, "a refused prune changes nothing"


def test_the_newest_good_backup_survives_prune_when_newer_ones_are_damaged(target, store):
    """Items 7 and 19: nothing is verified; the newer backups lost or truncated their dump."""
    small_table(target)
    good, lost, truncated = (backup.take(target, store) for _ in range(3))
    (store.root / lost.key).unlink()
    with open(store.root / truncated.key, "r+b") as dump:
        dump.truncate(truncated.size_bytes // 2)

    assert [m.id for m in catalogue.prune(store, target, keep_last=1, keep_days=None, dry_run=True)] == [lost.id]
    listing = catalogue.catalogue(store, target)
    assert [(b.manifest.id, b.status) for b in listing.backups] == [
        (truncated.id, "damaged"), (lost.id, "damaged"), (good.id, "checked")]
    assert listing.newest_restorable().manifest.id == good.id
    with pytest.raises(ConfigError, match="is damaged \\(size differs: truncated or corrupted"):
        catalogue.find(store, target, truncated.id)

    assert [m.id for m in catalogue.prune(store, target, keep_last=1, keep_days=None)] == [lost.id]
    assert [b.manifest.id for b in catalogue.catalogue(store, target).backups] == [truncated.id, good.id]
    assert (store.root / good.key).exists()


def test_list_says_what_it_knows_of_each_backup(cli, url, pg_cluster, target, as_url, store):
    """Item 19 and 14: a truncated dump, a deleted dump and a truncated manifest are shown as damaged
    (exit 0: the listing worked); the good backups stay listed and restorable."""
    small_table(target)
    env = {"DATABASE_URL": url}
    storage = ["--storage", str(store.root)]
    verified = backup.take(as_url, store, backup.DumpOptions(verify_restore=True))
    checked, lost, truncated, unreadable = (backup.take(as_url, store) for _ in range(4))
    (store.root / lost.key).unlink()
    with open(store.root / truncated.key, "r+b") as dump:
        dump.truncate(truncated.size_bytes - 1)
    manifest = store.root / unreadable.manifest_key
    manifest.write_text(manifest.read_text()[:100])

    listed = cli("backups", "list", *storage, env=env)
    assert listed.returncode == 0, listed.stderr
    [warning] = listed.stderr.splitlines()
    assert warning.startswith(f"dbmigrate: warning: skipped damaged manifest {unreadable.manifest_key}: "), warning
    lines = {line.split()[0]: line for line in listed.stdout.splitlines()}
    assert set(lines) == {verified.id, checked.id, lost.id, truncated.id}
    assert "DAMAGED" in lines[lost.id] and "dump missing" in lines[lost.id]
    assert "DAMAGED" in lines[truncated.id] and "size differs: truncated or corrupted" in lines[truncated.id]
    assert "checked" in lines[checked.id] and "sha256 + pg_restore --list at creation" in lines[checked.id]
    assert "dump present, size as recorded" in lines[checked.id]
    assert f"restore-verified at {verified.verified_at}" in lines[verified.id]

    as_json = {m["id"]: m for m in json.loads(cli("backups", "list", "--json", *storage, env=env).stdout)}
    assert {i: m["status"] for i, m in as_json.items()} == {
        verified.id: "verified", checked.id: "checked", lost.id: "damaged", truncated.id: "damaged",
        unreadable.id: "damaged"}
    assert as_json[lost.id]["damage"] == "dump missing" and as_json[lost.id]["stored_size_bytes"] is None
    assert as_json[truncated.id]["stored_size_bytes"] == truncated.size_bytes - 1
    assert as_json[unreadable.id]["damage"].startswith("manifest unreadable: ")

    refused = cli("restore", unreadable.id, "--target-db", target.database + "_bad", *storage, env=env)
    assert refused.returncode == 2 and "the manifest of backup" in one_line_error(refused.stderr)
    restored = cli("restore", checked.id, "--target-db", target.database + "_copy", *storage, env=env)
    try:
        assert restored.returncode == 0, restored.stderr
    finally:
        pg_cluster.drop_database(target.database + "_copy")


@pytest.fixture(scope="module")
def s3_checking_credentials():
    """A moto server that checks credentials and knows none: every key is wrong."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline and server.poll() is None, "moto did not start"
                time.sleep(0.2)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait()


S3_FAILURES = {
    "missing bucket": lambda endpoint: ("s3://no-such-bucket", {"AWS_ENDPOINT_URL": endpoint}, "NoSuchBucket"),
    "wrong credentials": lambda endpoint: ("s3://some-bucket", {"AWS_ENDPOINT_URL": endpoint}, "InvalidAccessKeyId"),
    "no credentials": lambda endpoint: ("s3://some-bucket", {
        "AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": "",
        "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent", "AWS_CONFIG_FILE": "/nonexistent",
        "AWS_EC2_METADATA_DISABLED": "true"}, "Unable to locate credentials"),
    "endpoint down": lambda endpoint: ("s3://some-bucket", {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"},
                                       "Could not connect to the endpoint URL"),
}


@pytest.mark.parametrize("failure", list(S3_FAILURES))
@pytest.mark.parametrize("command", [["backups", "list"], ["backups", "prune", "--keep-last", "1"],
                                     ["restore", "20000101T000000.000Z-base", "--yes"]],
                         ids=["list", "prune", "restore"])
def test_s3_failures_are_one_line_errors(command, cli, url, s3_endpoint, failure, request):
    """Item 14: list, prune and restore against a missing bucket, with wrong credentials, without
    credentials, and with the endpoint down (a closed loopback port)."""
    endpoint = request.getfixturevalue("s3_checking_credentials") if failure == "wrong credentials" else s3_endpoint
    spec, aws, says = S3_FAILURES[failure](endpoint)
    env = {"DATABASE_URL": url, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_MAX_ATTEMPTS": "1", **aws}
    result = cli(*command, "--storage", spec, env=env)
    error = one_line_error(result.stderr)
    assert result.returncode == 1 and error.startswith("dbmigrate: error: storage: listing s3://"), error
    assert says in error, error


def test_a_manifest_that_does_not_fit_leaves_nothing_behind(cli, url, target, tmp_path):
    """Item 14: the dump fits on the disk, its manifest does not (many tables: a long manifest)."""
    sql(target, "; ".join(f"CREATE TABLE table_with_a_rather_long_name_to_make_the_manifest_long_{i:03} (id int)"
                          for i in range(200)))
    env = {"DATABASE_URL": url}
    measured = cli("backup", "--json", "--storage", str(tmp_path / "measure"), env=env)
    assert measured.returncode == 0, measured.stderr
    dump_size, manifest_size = json.loads(measured.stdout)["size_bytes"], len(measured.stdout)
    page = 4096
    room = -(-dump_size // page) * page + page  # the dump, and one page: less than the manifest needs
    assert manifest_size > 2 * page, "the manifest must need more than the room left"

    disk = tmp_path / "small-disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        stat = os.statvfs(disk)
        (disk / "filler").write_bytes(b"\0" * (stat.f_bavail * stat.f_frsize - room))
        result = cli("backup", "--storage", str(disk / "backups"), env=env)
        assert result.returncode == 1
        error = one_line_error(result.stderr)
        assert "storage: writing " in error and ".json failed: No space left on device" in error, error
        assert [p.name for p in disk.rglob("*") if p.is_file()] == ["filler"], "neither the dump nor a .json.tmp"
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_storage_failures_are_their_own_kind(tmp_path):
    """Item 14/16: code tells a storage failure by its type, not by the text of its message."""
    from dbmigrate.errors import BackupFailed, StorageFailed

    storage = LocalStorage(tmp_path / "backups")
    with pytest.raises(StorageFailed) as failed:
        storage.read_text("test/db/missing.json")
    assert isinstance(failed.value, BackupFailed) and "No such file or directory" in str(failed.value)
    (tmp_path / "backups").write_text("a file where the directory should be")
    with pytest.raises(StorageFailed):
        storage.write_text("test/db/x.json", "{}")
    assert not Path(tmp_path / "backups" / "test").exists()
