"""The squawk lint of pending revisions: `dbmigrate lint`, and the lint phase of upgrades under
each environment's policy (the command line with --env, and the db-migrate flow)."""

import json
import threading
import time
from pathlib import Path

import pytest

from tests.support.helpers import fingerprint_of, last_report, one_line_error, sql
from tests.support.projects import linear, stock_project

TABLE = "op.create_table('t', sa.Column('a', sa.Integer))"
INDEX = "op.create_index('ix_t_a', 't', ['a'])"
ALLOW = "# dbmigrate: allow require-concurrent-index-creation -- t is empty at deploy time"
FINDING = ("revision r2: require-concurrent-index-creation (warning) at line 5 (CREATE INDEX ix_t_a ON t (a);): "
           "During normal index creation, table updates are blocked, but reads are still allowed.")


def index_project(tmp_path: Path, exception: str | None = None) -> str:
    """r1 creates the table t, r2 an index on it without CONCURRENTLY; ``exception`` heads r2's file."""
    ini = stock_project(tmp_path, linear(TABLE, INDEX))
    if exception is not None:
        r2 = tmp_path / "migrations" / "versions" / "r2.py"
        r2.write_text(f"{exception}\n{r2.read_text()}")
    return str(ini)


def test_lint_json_names_the_finding_and_exits_1(cli, url, target, tmp_path):
    result = cli("lint", "--json", "--alembic-config", index_project(tmp_path), env={"DATABASE_URL": url})
    assert result.returncode == 1, result.stderr
    data = json.loads(result.stdout)
    assert data["blocking"] == 1 and data["blocking_level"] == "warning"
    assert data["revision_before"] is None and data["target_revision"] == "head"
    r1, r2 = data["revisions"]
    assert r1 == {"revision": "r1", "message": "step 1", "findings": [], "excepted": [], "not_linted": None}
    assert r2["findings"] == [{
        "rule": "require-concurrent-index-creation", "level": "warning", "line": 5,
        "message": "During normal index creation, table updates are blocked, but reads are still allowed.",
        "statement": "CREATE INDEX ix_t_a ON t (a);"}]
    assert "require-lock-timeout" in data["rules_off"]
    assert fingerprint_of(target).revisions == ()


def test_each_revision_is_linted_on_its_own_across_branches_and_a_merge(cli, url, tmp_path):
    step = {"downgrade": "pass"}
    ini = stock_project(tmp_path, [
        {**step, "revision": "r1", "message": "table", "upgrade": TABLE},
        {**step, "revision": "a", "down": "r1", "message": "index", "upgrade": INDEX},
        {**step, "revision": "b", "down": "r1", "message": "column",
         "upgrade": "op.add_column('t', sa.Column('b', sa.Text))"},
        {**step, "revision": "m", "down": ("a", "b"), "message": "merge", "upgrade": "pass"},
    ])
    result = cli("lint", "--json", "--alembic-config", str(ini), env={"DATABASE_URL": url})
    assert result.returncode == 1, result.stderr
    found = {r["revision"]: [(f["rule"], f["statement"]) for f in r["findings"]]
             for r in json.loads(result.stdout)["revisions"] if not r["not_linted"]}
    assert found == {"r1": [], "a": [("require-concurrent-index-creation", "CREATE INDEX ix_t_a ON t (a);")],
                     "b": [], "m": []}


READS = "op.get_bind().execute(sa.text('SELECT count(*) FROM t')).scalar()"
UNRENDERABLE = ("r2  unrenderable (error): not linted: cannot be rendered offline: "
                "'NoneType' object has no attribute 'scalar'")


def unrenderable_project(tmp_path: Path, exception: str | None = None) -> str:
    """r2 builds a blocking index beside one op.get_bind() read: offline, squawk never sees the index."""
    ini = stock_project(tmp_path, linear(TABLE, f"{INDEX}\n    {READS}"))
    if exception is not None:
        r2 = tmp_path / "migrations" / "versions" / "r2.py"
        r2.write_text(f"{exception}\n{r2.read_text()}")
    return str(ini)


def test_a_revision_that_cannot_be_rendered_offline_is_a_finding_unless_excepted(cli, url, target, tmp_path):
    """Offline, op.get_bind() has no database to read: the SQL is unchecked, which is a finding at the highest
    level (it blocks wherever the policy blocks), until a reviewer excepts it."""
    result = cli("lint", "--alembic-config", unrenderable_project(tmp_path / "plain"), env={"DATABASE_URL": url})
    assert result.returncode == 1, result.stderr
    assert result.stdout.splitlines() == [UNRENDERABLE,
                                          "lint: 1 finding(s) at or above warning in 2 pending revision(s)"]

    allow = "# dbmigrate: allow unrenderable -- reads t to size the batch; the index was reviewed by hand"
    ini = unrenderable_project(tmp_path / "allowed", allow)
    result = cli("lint", "--json", "--alembic-config", ini, env={"DATABASE_URL": url})
    assert result.returncode == 0, result.stderr
    r2 = json.loads(result.stdout)["revisions"][1]
    assert r2["findings"] == [] and r2["not_linted"].startswith("cannot be rendered offline: ")
    assert r2["excepted"] == [{"rule": "unrenderable", "line": 1, "findings": 1,
                               "reason": "reads t to size the batch; the index was reviewed by hand"}]
    assert fingerprint_of(target).revisions == ()


def test_production_blocks_an_upgrade_whose_revision_cannot_be_linted(cli, environment, prefect_api, target, home,
                                                                      tmp_path):
    environment("production", cli_changes_allowed=True)
    blocked = cli("upgrade", "--env", "production", "--backup", "--approver", "ops", "--alembic-config",
                  unrenderable_project(tmp_path), env={"PREFECT_API_URL": prefect_api})
    assert blocked.returncode == 1
    assert one_line_error(blocked.stderr) == (
        "dbmigrate: error: lint: 1 finding(s) at or above warning block this run in production: revision "
        f"{UNRENDERABLE.replace('  ', ': ', 1)}; after review, except a rule in the revision file with "
        "'# dbmigrate: allow RULE -- REASON'")
    assert fingerprint_of(target).revisions == ()
    assert last_report(home)["error"]["phase"] == "lint"


def test_lint_up_to_a_revision_lints_only_that_range(cli, url, tmp_path):
    result = cli("lint", "-r", "r1", "--alembic-config", index_project(tmp_path), env={"DATABASE_URL": url})
    assert result.returncode == 0, result.stderr
    assert result.stdout == "lint: 0 finding(s) at or above warning in 1 pending revision(s)\n"
    assert result.stderr == "", "no Alembic INFO lines per rendered revision"


def test_without_squawk_the_lint_is_one_line_error(monkeypatch, tmp_path):
    import sysconfig

    from dbmigrate.errors import ConfigError
    from dbmigrate.lint import squawk_binary

    monkeypatch.setattr(sysconfig, "get_path", lambda name: str(tmp_path))
    with pytest.raises(ConfigError) as refused:
        squawk_binary()
    assert str(refused.value) == (f"squawk is not installed ({tmp_path}/squawk is missing): "
                                  "pip install 'squawk-cli>=2.70,<3'")


def test_an_exception_in_the_revision_file_is_recorded_as_excepted(cli, url, tmp_path):
    ini = index_project(tmp_path, ALLOW)
    result = cli("lint", "--alembic-config", ini, env={"DATABASE_URL": url})
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "r2  excepted require-concurrent-index-creation (1 finding(s)): t is empty at deploy time",
        "lint: 0 finding(s) at or above warning in 2 pending revision(s)"]


def test_a_malformed_exception_is_an_error_naming_file_and_line(cli, url, tmp_path):
    for number, (exception, problem) in enumerate((
        ("# dbmigrate: allow require-concurrent-index-creation",
         "malformed lint exception: write '# dbmigrate: allow RULE -- REASON'"),
        ("# dbmigrate: allow no-such-rule -- because", "lint exception names an unknown squawk rule 'no-such-rule'"),
        ("# dbmigrate: allow require-concurrent-index-creation -- --",
         "lint exception gives no reason after '--': write '# dbmigrate: allow RULE -- REASON'"),
    )):
        ini = index_project(tmp_path / str(number), exception)
        result = cli("lint", "--alembic-config", ini, env={"DATABASE_URL": url})
        r2 = Path(ini).parent / "migrations" / "versions" / "r2.py"
        assert result.returncode == 2
        assert result.stderr == f"dbmigrate: error: {r2}:1: {problem}\n"


def test_an_exception_inside_the_sql_text_is_not_honoured(cli, url, tmp_path):
    """Only a Python comment excepts a rule: the same words in a string (here, in the SQL itself) do not."""
    smuggled = ('op.execute("CREATE INDEX ix_t_a ON t (a) '
                '/* # dbmigrate: allow require-concurrent-index-creation -- nobody looked */")')
    ini = stock_project(tmp_path, linear(TABLE, smuggled))
    result = cli("lint", "--json", "--alembic-config", str(ini), env={"DATABASE_URL": url})
    assert result.returncode == 1, result.stderr
    r2 = json.loads(result.stdout)["revisions"][1]
    assert r2["excepted"] == [] and [f["rule"] for f in r2["findings"]] == ["require-concurrent-index-creation"]


def fake_squawk(directory: Path, body: str, executable: bool = True) -> str:
    directory.mkdir()
    path = directory / "squawk"
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755 if executable else 0o644)
    return str(path)


def test_a_squawk_that_cannot_run_or_prints_garbage_is_one_line(cli, url, target, tmp_path):
    ini = index_project(tmp_path)
    for squawk, code, error in (
        (fake_squawk(tmp_path / "plain", "exit 0", executable=False), 2,
         "squawk cannot be run ({}): Permission denied"),
        (fake_squawk(tmp_path / "garbage", "echo 'Segmentation fault (core dumped)'; exit 1"), 2,
         "squawk ({}) printed something other than its JSON report: 'Segmentation fault (core dumped)'"),
    ):
        result = cli("lint", "--alembic-config", ini, env={"DATABASE_URL": url, "DBMIGRATE_SQUAWK": squawk})
        assert (result.returncode, result.stderr) == (code, f"dbmigrate: error: {error.format(squawk)}\n")
    assert fingerprint_of(target).revisions == ()


def test_a_hanging_squawk_is_stopped_after_its_time_bound(cli, url, target, home, tmp_path):
    """lint and upgrade both give up on a squawk that never answers, and nothing changes."""
    squawk = fake_squawk(tmp_path / "hangs", "sleep 600")
    env = {"DATABASE_URL": url, "DBMIGRATE_SQUAWK": squawk, "DBMIGRATE_SQUAWK_TIMEOUT": "1"}
    for command in (("lint",), ("upgrade", "--yes")):
        started = time.monotonic()
        result = cli(*command, "--alembic-config", index_project(tmp_path / command[0]), env=env)
        print(f"{command[0]} gave up after {time.monotonic() - started:.1f}s")
        assert time.monotonic() - started < 30
        assert result.returncode == 2
        assert one_line_error(result.stderr) == (
            f"dbmigrate: error: squawk ({squawk}) did not finish within 1s (set DBMIGRATE_SQUAWK_TIMEOUT to wait "
            "longer): nothing was linted")
    assert fingerprint_of(target).revisions == ()
    assert last_report(home)["error"]["phase"] == "lint"


def test_the_sample_schema_lints_clean_with_its_reviewed_exceptions(cli, url):
    result = cli("lint", "--json", env={"DATABASE_URL": url})
    assert result.returncode == 0, result.stderr
    revisions = json.loads(result.stdout)["revisions"]
    assert [r["revision"] for r in revisions] == ["0001", "0002", "0003", "0004", "0005", "0006"]
    assert all(not r["findings"] and not r["not_linted"] for r in revisions)
    assert {r["revision"]: [(e["rule"], e["findings"]) for e in r["excepted"]] for r in revisions if r["excepted"]} == {
        "0005": [("adding-not-nullable-field", 1), ("ban-drop-column", 1)],
        "0006": [("require-concurrent-index-creation", 2)]}


def test_production_policy_blocks_the_upgrade_before_anything_changes(cli, environment, prefect_api, target, home,
                                                                      tmp_path):
    api = {"PREFECT_API_URL": prefect_api}
    environment("production", cli_changes_allowed=True)
    args = ("upgrade", "--env", "production", "--backup", "--approver", "ops")
    blocked = cli(*args, "--alembic-config", index_project(tmp_path / "blocked"), env=api)
    assert blocked.returncode == 1
    assert one_line_error(blocked.stderr) == (
        f"dbmigrate: error: lint: 1 finding(s) at or above warning block this run in production: {FINDING}; "
        "after review, except a rule in the revision file with '# dbmigrate: allow RULE -- REASON'")
    assert fingerprint_of(target).revisions == ()
    report = last_report(home)
    assert report["error"]["phase"] == "lint" and report["backup"] is None and report["approval"] is None
    assert report["lint"]["revisions"][1]["findings"][0]["rule"] == "require-concurrent-index-creation"

    allowed = cli(*args, "--alembic-config", index_project(tmp_path / "allowed", ALLOW), env=api)
    assert allowed.returncode == 0, allowed.stderr
    report = last_report(home)
    assert report["status"] == "succeeded" and report["lint"]["blocking_level"] == "warning"
    assert report["lint"]["revisions"][1]["excepted"] == [{
        "rule": "require-concurrent-index-creation", "reason": "t is empty at deploy time", "line": 1,
        "findings": 1}]
    assert fingerprint_of(target).revisions == ("r2",)


def test_staging_only_warns_and_records_the_findings(cli, environment, prefect_api, home, target, tmp_path):
    environment("staging")
    result = cli("upgrade", "--env", "staging", "--yes", "--alembic-config", index_project(tmp_path),
                 env={"PREFECT_API_URL": prefect_api})
    assert result.returncode == 0, result.stderr
    assert f"lint:     r2  {FINDING.removeprefix('revision r2: ')}" in result.stdout.splitlines()
    report = last_report(home)
    assert report["status"] == "succeeded" and report["lint"]["blocking_level"] is None
    assert [f["rule"] for f in report["lint"]["revisions"][1]["findings"]] == ["require-concurrent-index-creation"]
    assert fingerprint_of(target).revisions == ("r2",)


def test_the_flow_blocks_in_production_and_publishes_the_lint(environment, target, home, tmp_path):
    from tests.support.flows import artifact, resume_when_paused, run_flow

    state = run_flow(environment=environment("production"), alembic_config=index_project(tmp_path / "blocked"))
    assert state.is_failed()
    assert state.message.startswith(f"lint failed: lint: 1 finding(s) at or above warning block this run in "
                                    f"production: {FINDING}")
    assert fingerprint_of(target).revisions == ()
    assert last_report(home)["backup"] is None
    shown = artifact("db-migrate-production-lint")
    assert "- `r2` **require-concurrent-index-creation** (warning), SQL line 5:" in shown

    seen = {}
    approver = threading.Thread(target=resume_when_paused, args=({"decision": "approve", "approver": "Ann"}, seen))
    approver.start()
    state = run_flow(environment="production", alembic_config=index_project(tmp_path / "allowed", ALLOW))
    approver.join()
    assert state.is_completed(), state.message
    [version] = sql(target, "SHOW server_version")[0]
    assert (f"### Lint (squawk, PostgreSQL {version.split()[0]}, blocking from warning)\n\n- `r1`: no finding\n"
            "- `r2` excepted **require-concurrent-index-creation** (1 finding(s)): t is empty at deploy time\n\n"
            "The SQL") in seen["description"], "the approver reads the lint before the SQL"
    assert fingerprint_of(target).revisions == ("r2",)
    assert last_report(home)["lint"]["revisions"][1]["excepted"][0]["reason"] == "t is empty at deploy time"
    assert ("- `r2` excepted **require-concurrent-index-creation** (1 finding(s)): t is empty at deploy time"
            in artifact("db-migrate-production-lint"))
