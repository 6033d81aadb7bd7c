"""Prefect flows (db-migrate, db-rollback, db-health, db-backup) compose the phases of
:mod:`dbmigrate.pipeline` as tasks; the operations themselves stay plain Python."""
