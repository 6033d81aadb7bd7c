"""Where a run cut short left the database, and putting it back (dbmigrate.interruption): plain code,
against the real PostgreSQL, without Prefect (issue 16 item 2). The flows' side, the worker's hook and
the next run reading the in-flight journal, is in tests/orchestration/."""

from dbmigrate import fingerprint, interruption
from dbmigrate.interruption import InFlight, Undo
from dbmigrate.phases import Phase
from dbmigrate.settings import Settings
from tests.support.helpers import fingerprint_of, sql
from tests.support.projects import linear, stock_project


def table(name: str) -> tuple[str, str]:
    return f"op.create_table('{name}', sa.Column('id', sa.Integer))", f"op.drop_table('{name}')"


def in_flight(phase: Phase, **fields) -> InFlight:
    """The record of a run that took the slot and was killed during ``phase``."""
    return InFlight("a-flow-run", "staging-r3", "staging", "staging", None, 0.0, True, phase, **fields)


def left_between(cli, url, tmp_path) -> str:
    """A project of r1..r3, a revision per transaction, and its database left at r2 by a run from r1 to r3."""
    ini = str(stock_project(tmp_path, linear(table("t1"), table("t2"), table("t3")), transaction_per_migration=True))
    for revision in ("r1", "r2"):
        assert cli("upgrade", "-r", revision, "--yes", "--alembic-config", ini, env={"DATABASE_URL": url}).returncode == 0
    return ini


def test_a_run_killed_between_revisions_is_downgraded_to_its_start_through_the_automatic_rollback(
        cli, url, target, tmp_path):
    ini = left_between(cli, url, tmp_path)
    entry = in_flight(Phase.MIGRATE, revision_before="r1", target="r3",
                      undo=Undo.of(Settings.from_env(alembic_config=ini)))
    assert InFlight.from_dict(entry.as_dict()) == entry, "the journal keeps the record as it was"

    assert interruption.where_left(target, entry) == (
        "database left at r2, between the starting revision r1 and the target r3; rolled back automatically to r1, "
        "its starting revision")
    assert fingerprint_of(target).revisions == ("r1",)
    assert sql(target, "SELECT to_regclass('t2')") == [(None,)]


def test_without_the_automatic_rollback_the_operator_is_told_both_ways_out(cli, url, target, tmp_path):
    left_between(cli, url, tmp_path)
    before = fingerprint_of(target)
    assert interruption.where_left(target, in_flight(Phase.MIGRATE, revision_before="r1", target="r3")) == (
        "database left at r2, between the starting revision r1 and the target r3: run db-rollback to r1, or "
        "db-migrate again to finish")
    assert fingerprint_of(target) == before


def test_an_interrupted_restore_is_told_apart_by_its_row_counts(target):
    sql(target, "CREATE TABLE payload (id int); INSERT INTO payload SELECT generate_series(1, 5)")
    now = fingerprint_of(target)
    entry = in_flight(Phase.RESTORE, revision_before=None, target=None, backup="the-backup",
                      rows_before=interruption.digest(now.row_counts),
                      rows_backup=interruption.digest({"public.payload": 50}))
    assert interruption.where_left(target, entry) == (
        "the restore did not commit: database as it was (revision base and row counts as before the restore)")
    sql(target, "INSERT INTO payload SELECT generate_series(6, 50)")
    assert fingerprint.tables_differing(fingerprint_of(target).row_counts, now.row_counts) == ["public.payload"]
    assert interruption.where_left(target, entry) == (
        "the restore had committed: database now matches backup the-backup (revision base and its row counts)")
