"""Prefect's own standard checks for block types (a description, a documentation link, a
description ending in a full stop on every field, a code example that loads the block), run
over dbmigrate's blocks. Pure class checks: no Prefect API is needed."""

import pytest
from prefect.testing.standard_test_suites import BlockStandardTestSuite

from blocks import DatabaseCredentials, EnvironmentPolicy


class TestBlocks(BlockStandardTestSuite):
    @pytest.fixture(params=[DatabaseCredentials, EnvironmentPolicy], ids=lambda block: block.__name__)
    def block(self, request):
        return request.param

    @pytest.mark.skip(reason="the blocks have no logo (the UI shows Prefect's default) and checking one downloads it")
    def test_has_a_valid_image(self, block):
        """Prefect's check, skipped here whether or not Pillow is installed."""
