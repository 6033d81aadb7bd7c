"""While revisions run on a copy, the environment's ways of naming the real database name the copy
(dbmigrate.isolation.environment_at); everything else, and everything afterwards, is as it was."""

import os

from psycopg.conninfo import conninfo_to_dict

from dbmigrate.isolation import environment_at
from dbmigrate.target import parse_url

REAL = parse_url("postgresql://app:s3cret@db.internal:5432/app")
COPY = REAL.with_database("dbmigrate_rehearsal_1234")
GIVEN = {
    "APP_DB_URL": "postgresql://reader:other@db.internal/app?sslmode=require",
    "SQLALCHEMY_URL": "postgresql+psycopg2://app:s3cret@db.internal:5432/app",
    "APP_DSN": "host=db.internal dbname=app user=app connect_timeout=5",
    "PGDATABASE": "app",
    "REPORTING_URL": "postgresql://app:s3cret@db.internal:5432/reporting",
    "NOT_A_URL": "dbname is app",
}


def test_every_variable_naming_the_database_names_the_copy_then_is_restored(monkeypatch):
    for name in ("PGHOST", "PGPORT", "PGUSER", "PGPASSWORD", "PGOPTIONS"):
        monkeypatch.delenv(name, raising=False)
    for name, value in GIVEN.items():
        monkeypatch.setenv(name, value)

    with environment_at(REAL, COPY):
        assert os.environ["APP_DB_URL"] == "postgresql://app:s3cret@db.internal:5432/dbmigrate_rehearsal_1234"
        assert os.environ["SQLALCHEMY_URL"] == \
            "postgresql+psycopg2://app:s3cret@db.internal:5432/dbmigrate_rehearsal_1234"
        assert conninfo_to_dict(os.environ["APP_DSN"]) == {
            "host": "db.internal", "port": "5432", "dbname": "dbmigrate_rehearsal_1234", "user": "app",
            "password": "s3cret", "connect_timeout": "5"}
        assert (os.environ["PGDATABASE"], os.environ["PGHOST"], os.environ["PGPASSWORD"]) == \
            ("dbmigrate_rehearsal_1234", "db.internal", "s3cret")
        assert os.environ["REPORTING_URL"] == GIVEN["REPORTING_URL"] and os.environ["NOT_A_URL"] == GIVEN["NOT_A_URL"]

    assert {name: os.environ[name] for name in GIVEN} == GIVEN
    assert "PGHOST" not in os.environ and "PGPASSWORD" not in os.environ
