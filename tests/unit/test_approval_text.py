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
