"""Which --compress value pg_dump gets: probed on the real pg_dump this machine has (a quick
subprocess that never connects), and fixed rules for pg_dump before 16."""

import pytest

from dbmigrate import backup, pgtools
from dbmigrate.errors import ConfigError


@pytest.fixture(scope="module")
def pg_dump():
    """The newest pg_dump here (16 or later: it takes METHOD[:LEVEL])."""
    path = pgtools.find("pg_dump", 16)
    return path, pgtools.major_version(path)


def test_auto_picks_zstd_only_where_this_pg_dump_has_it(pg_dump):
    path, major = pg_dump
    auto = backup.compression_for(path, major, "auto")
    assert auto in ("zstd:3", "gzip:6")
    if auto == "zstd:3":
        assert backup.compression_for(path, major, "zstd") == "zstd"
    else:
        with pytest.raises(ConfigError, match="does not support compression 'zstd'"):
            backup.compression_for(path, major, "zstd")


@pytest.mark.parametrize("requested", ["none", "gzip", "gzip:5"])
def test_methods_every_pg_dump_has_are_passed_through(pg_dump, requested):
    assert backup.compression_for(*pg_dump, requested) == requested


@pytest.mark.parametrize("requested", ["brotli", "gzip:x", "zstd:", "auto:3", ""])
def test_an_unknown_method_is_refused_before_pg_dump_runs(pg_dump, requested):
    with pytest.raises(ConfigError, match=f"unknown compression '{requested}': use auto, zstd"):
        backup.compression_for(*pg_dump, requested)


@pytest.mark.parametrize("requested, level", [("auto", "6"), ("none", "0"), ("gzip:4", "4")])
def test_before_16_pg_dump_gets_a_gzip_level(requested, level):
    assert backup.compression_for(pgtools.find("pg_dump", 14), 15, requested) == level
