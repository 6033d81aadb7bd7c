"""Backup ids, storage keys, manifests and prune's choice, without a database or a storage server.
(These names move to dbmigrate/catalogue.py with issue 9, item 2.)"""

import json
from datetime import UTC, datetime, timedelta, timezone

import pytest

from dbmigrate import catalogue
from dbmigrate.storage import LocalStorage
from dbmigrate.target import parse_url

NOW = datetime(2026, 11, 25, 8, 30, 15, 123456, tzinfo=UTC)


def target(environment="staging", database="shop"):
    return parse_url(f"postgresql://u:p@db.example:5432/{database}", environment)


def manifest(backup_id: str, created_at: datetime = NOW, verified: bool = False, **fields) -> catalogue.Manifest:
    return catalogue.Manifest(
        id=backup_id, environment="staging", database="shop", key=f"staging/shop/{backup_id}.dump",
        location=f"/backups/staging/shop/{backup_id}.dump", sha256="0" * 64, size_bytes=100, compression="zstd:3",
        pg_dump_version="17.2", server_version="17.2", revision="0003", row_counts={"public.t": 1}, duration_s=1.0,
        created_at=created_at.isoformat(), checks={"sha256": True, "pg_restore_list": True}, verified=verified,
        **fields)


# --- keys and ids -----------------------------------------------------------------------

def test_a_backup_key_names_environment_database_time_and_revision():
    key = catalogue.backup_key(target(), "0003", NOW)
    assert key == "staging/shop/20261125T083015.123Z-0003.dump"
    assert catalogue.manifest_key(key) == "staging/shop/20261125T083015.123Z-0003.json"
    assert catalogue.backup_id(key) == "20261125T083015.123Z-0003"


def test_a_directory_backup_has_its_own_suffix_and_the_same_id():
    key = catalogue.backup_key(target(), "0003", NOW, directory=True)
    assert key.endswith(".dir")
    assert catalogue.manifest_key(key) == "staging/shop/20261125T083015.123Z-0003.json"
    assert catalogue.backup_id(key) == "20261125T083015.123Z-0003"


def test_the_time_in_a_key_is_utc():
    east = NOW.astimezone(timezone(timedelta(hours=5)))
    assert catalogue.backup_key(target(), "0003", east) == catalogue.backup_key(target(), "0003", NOW)


def test_a_backup_at_base_is_named_base():
    assert catalogue.backup_key(target(), None, NOW).endswith("-base.dump")


@pytest.mark.parametrize("part, safe", [
    ("staging", "staging"), ("my db", "my_db"), ("a/b", "a_b"), ("..", "__"), (".", "_"), ("", "_"),
    ("../../etc", ".._.._etc"), ("0003,0004", "0003_0004"),
])
def test_a_name_becomes_one_safe_path_segment(part, safe):
    assert catalogue._safe(part) == safe


def test_an_environment_named_dotdot_stays_inside_the_storage():
    assert catalogue.prefix(target(environment="..", database="..")) == "__/__/"


# --- manifests --------------------------------------------------------------------------

def test_a_manifest_survives_its_json():
    original = manifest("20261125T083015.123Z-0003", verified=True)
    assert catalogue.Manifest.from_json(original.to_json()) == original
    assert original.manifest_key == "staging/shop/20261125T083015.123Z-0003.json"


@pytest.mark.parametrize("change, says", [
    (lambda m: [], "argument after \\*\\* must be a mapping, not list"),
    (lambda m: {k: v for k, v in m.items() if k != "sha256"}, "missing 1 required positional argument: 'sha256'"),
    (lambda m: {**m, "surprise": 1}, "unexpected keyword argument 'surprise'"),
    (lambda m: {**m, "size_bytes": "100"}, "size_bytes is not a int"),
    (lambda m: {**m, "verified": "yes"}, "verified is not a bool"),
    (lambda m: {**m, "row_counts": []}, "row_counts is not a dict"),
    (lambda m: {**m, "created_at": "2026-11-25T08:30:15"}, "created_at has no time zone"),
    (lambda m: {**m, "format": "tar"}, "unknown format 'tar'"),
], ids=["not an object", "field missing", "unknown field", "size a string", "verified a string",
        "row counts a list", "naive time", "unknown format"])
def test_a_damaged_manifest_says_what_is_wrong(change, says):
    body = json.dumps(change(json.loads(manifest("x").to_json())))
    with pytest.raises(ValueError, match=says):
        catalogue.Manifest.from_json(body)


# --- prune's choice ---------------------------------------------------------------------

def listing(*backups: catalogue.Manifest, sizes: dict[str, int | None] | None = None) -> catalogue.Catalogue:
    """Newest first, as catalogue() lists them; ``sizes`` overrides the stored size of some."""
    sizes = sizes or {}
    return catalogue.Catalogue([catalogue.Listed(m, sizes.get(m.id, m.size_bytes)) for m in backups], [])


def pruned(backups: catalogue.Catalogue, keep_last: int, keep_days: float | None = None) -> list[str]:
    doomed = catalogue.prune(LocalStorage("/nonexistent"), target(), keep_last, keep_days, dry_run=True,
                             listing=backups)
    return [m.id for m in doomed]


def aged(days: float) -> datetime:
    return datetime.now(UTC) - timedelta(days=days)


def test_prune_deletes_beyond_the_newest_n():
    backups = [manifest(f"b{i}", aged(i)) for i in range(4)]
    assert pruned(listing(*backups), keep_last=2) == ["b2", "b3"]


def test_prune_always_keeps_the_newest_verified_backup():
    backups = [manifest("b0", aged(0)), manifest("b1", aged(1)), manifest("b2", aged(2), verified=True),
               manifest("b3", aged(3))]
    assert pruned(listing(*backups), keep_last=1) == ["b1", "b3"]


def test_prune_keeps_the_newest_intact_backup_when_newer_ones_are_damaged():
    backups = [manifest("b0", aged(0)), manifest("b1", aged(1)), manifest("b2", aged(2))]
    damaged = listing(*backups, sizes={"b0": None, "b1": 99})
    assert [b.damage for b in damaged.backups] == [
        "dump missing", "size differs: truncated or corrupted (99 bytes stored, 100 in the manifest)", None]
    assert pruned(damaged, keep_last=1) == ["b1"]


def test_prune_with_keep_days_deletes_only_older_backups():
    backups = [manifest("b0", aged(0)), manifest("b1", aged(1)), manifest("b2", aged(5)), manifest("b3", aged(9))]
    assert pruned(listing(*backups), keep_last=1, keep_days=3) == ["b2", "b3"]
    assert pruned(listing(*backups), keep_last=1, keep_days=1e9) == [], "a cutoff before the calendar: keep all"


@pytest.mark.parametrize("keep_last, keep_days, says", [
    (0, None, "--keep-last 0 refused: it could delete every backup"),
    (-1, None, "--keep-last -1 refused"),
    (1, 0, "--keep-days must be a finite number of days above 0, not 0"),
    (1, float("nan"), "--keep-days must be a finite number of days above 0, not nan"),
    (1, float("inf"), "--keep-days must be a finite number of days above 0, not inf"),
], ids=["keep-last 0", "keep-last -1", "keep-days 0", "keep-days nan", "keep-days inf"])
def test_a_retention_that_could_delete_everything_is_refused(keep_last, keep_days, says):
    from dbmigrate.errors import ConfigError

    with pytest.raises(ConfigError, match=says):
        catalogue.check_retention(keep_last, keep_days)
