"""Prefect flows (db-migrate, db-rollback, db-health, db-backup) compose the phases of
:mod:`dbmigrate.pipeline` as tasks; the operations themselves stay plain Python.

The flow modules (migrate, db_rollback, maintenance) build on the shared ones (common,
artifacts, concurrency, recovery) and never import each other."""
