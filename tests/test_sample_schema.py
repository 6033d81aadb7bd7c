"""pytest-alembic's standard checks of the sample schema, against the real PostgreSQL."""

import pytest
from pytest_alembic import Config
from pytest_alembic.tests import (  # noqa: F401  (collected as tests here)
    test_model_definitions_match_ddl,
    test_single_head_revision,
    test_up_down_consistency,
    test_upgrade,
)
from sqlalchemy import create_engine
from sqlalchemy.pool import NullPool

from tests.support.helpers import SAMPLE_CONFIG


@pytest.fixture
def alembic_config(target):
    # ConfigParser interpolates '%', and the canary password has one.
    return Config(config_options={"file": str(SAMPLE_CONFIG), "sqlalchemy.url": target.sqlalchemy_url().replace("%", "%%")})


@pytest.fixture
def alembic_engine(target):
    engine = create_engine(target.sqlalchemy_url(), poolclass=NullPool)
    yield engine
    engine.dispose()
