"""Alembic environment of the sample Cloud Optimizer schema.

The stock template, plus two things: the models' metadata for autogenerate, and
DATABASE_URL as a fallback so plain `alembic upgrade head` works. dbmigrate does not
rely on anything here beyond the stock contract (it sets sqlalchemy.url).
"""

import os
import sys
from logging.config import fileConfig

from sqlalchemy import engine_from_config, pool
from sqlalchemy.engine import make_url

from alembic import context

sys.path.insert(0, os.path.dirname(__file__))
from cloud_optimizer_models import metadata  # noqa: E402

config = context.config

if config.config_file_name is not None:
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = metadata


def database_url() -> str:
    raw = config.get_main_option("sqlalchemy.url") or os.environ.get("DATABASE_URL")
    if not raw:
        raise SystemExit("no database URL: set DATABASE_URL or sqlalchemy.url")
    url = make_url(raw)
    if url.drivername in ("postgresql", "postgres"):  # SQLAlchemy 2.0 would pick psycopg2: the sample uses psycopg 3
        url = url.set(drivername="postgresql+psycopg")
    return url.render_as_string(hide_password=False)


def run_migrations_offline() -> None:
    context.configure(
        url=database_url(),
        target_metadata=target_metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    section = config.get_section(config.config_ini_section, {})
    section["sqlalchemy.url"] = database_url()
    connectable = engine_from_config(section, prefix="sqlalchemy.", poolclass=pool.NullPool)
    with connectable.connect() as connection:
        context.configure(connection=connection, target_metadata=target_metadata)
        with context.begin_transaction():
            context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
