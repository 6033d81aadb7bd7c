"""What the tests share and no test module holds: the real servers they run against (pgcluster,
prefect_server, local_stack, browser, github_actions), Alembic projects (projects), and plain helpers
(helpers). Test modules import from here, never from one another (tests/unit/test_layers.py)."""
