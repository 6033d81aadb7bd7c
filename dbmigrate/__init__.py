"""dbmigrate: safe PostgreSQL + Alembic migrations.

The modules here are plain Python (no Prefect import) so the command line stays
fast and every phase can be tested against a real database without a Prefect API.
Data flows one way: target/settings -> health -> backup -> migrate -> validate -> report.
"""

__version__ = "0.1.0"
