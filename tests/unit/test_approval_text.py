"""The SQL in the approval form (flows.artifacts.readable_sql): every line fits the dialog,
and only blanks between words change, never inside a quoted string or name."""

from flows.artifacts import readable_sql

SQL = """BEGIN;

-- Running upgrade 0004 -> 0005, a comment long enough that it has to be continued as one

UPDATE alembic_version SET version_num='0005' WHERE alembic_version.version_num = '0004';

INSERT INTO notes (body, "Display Name Of The Column") VALUES ('two  spaces stay, inside a quoted string', 'x');

COMMENT ON TABLE t IS 'an unbreakable literal: it is the one line allowed to be longer than the width';

COMMIT;
"""

SHOWN = """BEGIN;
-- Running upgrade 0004 -> 0005, a comment long
-- enough that it has to be continued as one
UPDATE alembic_version SET version_num='0005' WHERE
    alembic_version.version_num = '0004';
INSERT INTO notes (body,
    "Display Name Of The Column") VALUES
    ('two  spaces stay, inside a quoted string',
    'x');
COMMENT ON TABLE t IS
    'an unbreakable literal: it is the one line allowed to be longer than the width';
COMMIT;"""


def test_lines_fit_the_form_and_only_blanks_between_words_change():
    assert readable_sql(SQL, width=52) == SHOWN


def test_the_approval_page_shows_how_the_migration_takes_its_locks():
    from pathlib import Path

    from dbmigrate.lockretry import LockRetries
    from dbmigrate.migrate import SessionLimits
    from dbmigrate.settings import Settings
    from flows.artifacts import lock_policy_section

    plain = Settings(Path("."), limits=SessionLimits(lock_timeout_s=10))
    assert lock_policy_section(plain) == (
        "**Locks**: one attempt; each statement waits up to **10 s** for a lock, the application's queries on "
        "that table queueing behind it meanwhile.")
    retried = Settings(Path("."), lock_retries=LockRetries((0.1, 0.5, 2), pause_s=1, total_s=120))
    assert lock_policy_section(retried) == (
        "**Locks**: lock retries: lock_timeout 0.1, 0.5, 2 s (the last repeats), 1 s between attempts, giving up "
        "after 120 s; an attempt that times out is rolled back and tried again (a revision that changed something "
        "outside a transaction never is), so the application's queries queue at most 2 s behind the migration.")
def test_the_approval_form_shows_the_lint_before_the_sql():
    from dbmigrate.lint import Excepted, Finding, LintResult, RevisionLint
    from dbmigrate.phases import Plan
    from dbmigrate.revisions import PlannedStep
    from dbmigrate.target import parse_url
    from flows.artifacts import approval_page

    lint = LintResult("16.4", [
        RevisionLint("r1", "table", excepted=[Excepted("ban-drop-column", "nobody reads it", 3, 1)]),
        RevisionLint("r2", "index", [Finding("require-concurrent-index-creation", "warning", "Blocks writes.", 5,
                                             "CREATE INDEX ix ON t (a);")]),
        RevisionLint("r3", "data", not_linted="cannot be rendered offline: no connection"),
        RevisionLint("r4", "column"),
    ], blocking_level=None)
    plan = Plan((), "r4", [PlannedStep(r.revision, r.message) for r in lint.revisions], True, ("r4",), lint)
    text = approval_page(parse_url("postgresql://u@h/db", "staging"), plan, "r4", "SELECT 1;")
    section = text[text.index("### Lint"):text.index("The SQL")]
    assert section == (
        "### Lint (squawk, PostgreSQL 16.4, findings warn only)\n\n"
        "- `r1` excepted **ban-drop-column** (1 finding(s)): nobody reads it\n"
        "- `r2` **require-concurrent-index-creation** (warning), SQL line 5: Blocks writes. "
        "`CREATE INDEX ix ON t (a);`\n"
        "- `r3` not linted: cannot be rendered offline: no connection\n"
        "- `r4`: no finding\n\n")
