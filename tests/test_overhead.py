"""What a run costs beside the migration itself (issue 17, "Performance"): the lint runs env.py once
per chain, not once per revision, and gives each revision the SQL it had alone; a run opens fewer
sessions, SQLAlchemy reads the server's details once per run, and every check still happens."""

from pathlib import Path

from sqlalchemy import event
from sqlalchemy.pool import Pool

from tests.support.helpers import scalar
from tests.support.projects import linear, stock_project

TABLE = "op.create_table('t{n}', sa.Column('a', sa.Integer))"
INDEX = "op.create_index('ix_t{n}_a', 't{n}', ['a'])"
READS = "op.get_bind().execute(sa.text('SELECT 1')).scalar()"  # offline there is no bind: unrenderable
ENV_RUNS = "import pathlib; pathlib.Path(__file__).with_name('runs').open('a').write('x')\n"


def counting_env(ini: Path) -> Path:
    """Each run of the project's env.py adds a character to ``runs`` beside it."""
    env_py = ini.parent / "migrations" / "env.py"
    env_py.write_text(ENV_RUNS + env_py.read_text())
    return env_py.with_name("runs")


def chain(length: int, unrenderable: int) -> list[str]:
    """Revision n: a table t<n> and (from the second) an index on the table the one before made, which
    squawk finds; revision ``unrenderable`` reads the database as well."""
    steps = [TABLE.format(n=1)] + [f"{TABLE.format(n=n)}\n    {INDEX.format(n=n - 1)}" for n in range(2, length + 1)]
    steps[unrenderable - 1] += f"\n    {READS}"
    return steps


def test_the_lint_renders_a_chain_in_one_pass_as_each_revision_alone(target, tmp_path):
    """40 revisions, the 25th unrenderable offline: env.py runs 4 times (the pass up to it, its
    own render, the close of the pass before it, the pass after it), not 40; each revision's
    SQL, findings and line numbers are what rendering it alone gives."""
    from dbmigrate import lint, migrate
    from dbmigrate.settings import Settings

    ini = stock_project(tmp_path, linear(*chain(40, unrenderable=25)))
    runs = counting_env(ini)
    project = Settings(tmp_path / "home", alembic_config=str(ini), project_logging=False).project(target)
    steps = project.plan_upgrade((), "heads")

    result = lint.lint(project, steps, "16.0")
    assert len(runs.read_text()) == 4

    by_revision = {r.revision: r for r in result.revisions}
    assert by_revision["r25"].not_linted == "cannot be rendered offline: 'NoneType' object has no attribute 'scalar'"
    assert [f.rule for f in by_revision["r25"].findings] == ["unrenderable"]
    assert by_revision["r1"].findings == []
    for n in (2, 24, 26, 40):
        finding, = by_revision[f"r{n}"].findings
        assert (finding.rule, finding.statement) == ("require-concurrent-index-creation",
                                                     f"CREATE INDEX ix_t{n - 1}_a ON t{n - 1} (a);")
        alone = migrate.render_revision(project, f"r{n}").splitlines()
        assert alone[finding.line - 1] == finding.statement  # the line as the revision alone has it
    rendered = migrate.render_revisions(project, [s.revision for s in steps])
    for step in steps:
        if step.revision != "r25":
            assert rendered[step.revision] == migrate.render_revision(project, step.revision)


def test_an_upgrade_opens_fewer_sessions_and_still_runs_every_check(target, tmp_path):
    """The sample project from base: five sessions (the health checks; the plan, whose server version
    the lint uses; the guard, which also checks the plan again; env.py's; validation, whose reading
    of the revision the report takes), not eight; SQLAlchemy reads the server's details on three engines
    (dbmigrate's, the guard's, env.py's), not on every session; and the report has every check."""
    from dbmigrate import lint, pipeline
    from dbmigrate.settings import Settings

    repo = Path(__file__).resolve().parent.parent
    settings = Settings(tmp_path / "home", alembic_config=str(repo / "alembic.ini"), project_logging=False)
    opened, engines_initialized = [], []

    def connected(dbapi_connection, record) -> None:
        opened.append(dbapi_connection.info.dbname)

    def first_connected(dbapi_connection, record) -> None:
        engines_initialized.append(dbapi_connection.info.dbname)

    event.listen(Pool, "connect", connected)
    event.listen(Pool, "first_connect", first_connected)
    try:
        outcome = pipeline.execute(target, settings, pipeline.Request("upgrade", "head"))
    finally:
        event.remove(Pool, "connect", connected)
        event.remove(Pool, "first_connect", first_connected)

    assert outcome.error is None, outcome.error
    report = outcome.report.as_dict()
    assert report["status"] == "succeeded" and report["revision_after"] == "0006"
    assert [c["name"] for c in report["health_checks"]] == [
        "connection", "disk_space", "alembic_version", "pending_revisions", "invalid_indexes", "scratch_databases"]
    assert all(c["status"] == "ok" for c in report["health_checks"])
    assert [r["revision"] for r in report["lint"]["revisions"]] == ["0001", "0002", "0003", "0004", "0005", "0006"]
    assert report["lint"]["pg_version"] == lint.pg_version(scalar(target, "SHOW server_version"))
    assert 0 < report["lint"]["duration_s"] < report["duration_s"]
    assert [c["name"] for c in report["validation"]] == ["database_answers", "invalid_indexes", "revision"]
    assert len(report["migrations_applied"]) == 6
    assert opened == [target.database] * 5
    assert len(engines_initialized) == 3
