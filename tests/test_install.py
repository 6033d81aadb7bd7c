"""The plain command line installed without Prefect (`pip install dbmigrate`, no extras) in an
application's own environment, and the db-migrate flow migrating that application through it."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import REPO, assert_no_canary, fingerprint_of
from tests.pgcluster import environ_without_db
from tests.projects import linear, stock_project

TABLE = "op.create_table('t', sa.Column('id', sa.Integer, primary_key=True))"
EXTRA = "pip install 'dbmigrate[prefect]'"


@pytest.fixture(scope="module")
def app_venv(tmp_path_factory) -> Path:
    """An application's environment: a fresh venv with `pip install <worktree>` (no extras; about
    25 s from pip's cache), and the application, a module only this environment can import."""
    venv = tmp_path_factory.mktemp("application") / "venv"
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([venv / "bin" / "pip", "install", "--quiet", str(REPO)], check=True, capture_output=True)
    print(f"core install: {time.monotonic() - started:.0f} s")
    [site] = (venv / "lib").glob("python*/site-packages")
    (site / "the_application.py").write_text("NAME = 'the application'\n")
    return venv


def application_project(base: Path, *steps: str) -> str:
    """A stock project (r1 creates t, then ``steps``) whose env.py imports the application, as a
    real one imports its models."""
    ini = stock_project(base, linear(TABLE, *steps))
    env_py = base / "migrations" / "env.py"
    env_py.write_text("import the_application  # noqa: F401\n" + env_py.read_text())
    return str(ini)


def run(venv: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run([venv / "bin" / "dbmigrate", *args], env={**environ_without_db(), **(env or {})},
                            capture_output=True, text=True, timeout=120, cwd=venv)
    assert "Traceback" not in result.stderr, result.stderr
    assert_no_canary(result.stdout + result.stderr, f"dbmigrate {args[0]}")
    return result


def wrapped(app_venv: Path, tmp_path: Path) -> tuple[Path, Path]:
    """The application's dbmigrate behind a shell script that logs each command line; (script, log)."""
    argv_log, wrapper = tmp_path / "argv.log", tmp_path / "dbmigrate"
    wrapper.write_text(f'#!/bin/sh\nprintf "%s\\n" "$*" >> {argv_log}\nexec {app_venv}/bin/dbmigrate "$@"\n')
    wrapper.chmod(0o755)
    return wrapper, argv_log


def test_the_command_line_installs_without_prefect_and_names_the_extra_where_needed(app_venv, url, home, tmp_path):
    no_prefect = subprocess.run([app_venv / "bin" / "python", "-c", "import prefect"], capture_output=True, text=True)
    assert "No module named 'prefect'" in no_prefect.stderr
    env = {"DBMIGRATE_HOME": str(home)}
    ini = application_project(tmp_path)

    status = run(app_venv, "status", "--json", "--alembic-config", ini, env={**env, "DATABASE_URL": url})
    assert status.returncode == 0, status.stderr
    assert [p["revision"] for p in json.loads(status.stdout)["pending"]] == ["r1"]

    for args, what in ((("status", "--env", "staging"), "--env"),
                       (("blocks", "sync", "--env", "staging", "--from-env"), "dbmigrate blocks"),
                       (("backups", "list", "--storage", "s3-bucket/backups", "--alembic-config", ini),
                        "the storage s3-bucket/backups")):
        refused = run(app_venv, *args, env={**env, "DATABASE_URL": url} if args[0] == "backups" else env)
        assert refused.returncode == 2
        assert refused.stderr == f"dbmigrate: error: {what} needs Prefect, which is not installed here: {EXTRA}\n"


def test_a_worker_migrates_an_application_it_cannot_import_through_the_applications_dbmigrate(
        app_venv, environment, target, home, tmp_path):
    """The worker (this process, with Prefect) cannot import the application; the flow runs the
    application environment's dbmigrate as a subprocess, the password never on its command line."""
    from flows.migrate import db_migrate

    ini = application_project(tmp_path)
    wrapper, argv_log = wrapped(app_venv, tmp_path)
    name = environment("staging", lint_blocks=True)
    refused = db_migrate(environment=name, alembic_config=ini, dbmigrate_executable=str(wrapper),
                         backup_storage="s3-bucket/backups", return_state=True)
    assert refused.is_failed() and "has no Prefect for the storage s3-bucket/backups" in refused.message
    assert not argv_log.exists()
    broken = db_migrate(environment=name, alembic_config=str(tmp_path / "missing.ini"),
                        dbmigrate_executable=str(wrapper), return_state=True)
    assert broken.is_failed() and broken.message.startswith("the application's dbmigrate lint exited 2: "), \
        broken.message  # its error line, not a traceback
    argv_log.unlink()

    state = db_migrate(environment=name, alembic_config=ini, dbmigrate_executable=str(wrapper),
                       requested_by="ops", return_state=True)
    assert state.is_completed(), state.message
    report = state.result()
    assert (report["status"], report["revision_after"], report["approval"]["approver"]) == ("succeeded", "r1", "ops")
    assert report["backup"] and report["lint"]["revisions"][0]["revision"] == "r1"
    assert "/flow-run/" in report["run_url"], "the report the subprocess wrote links to the flow run"
    assert fingerprint_of(target).revisions == ("r1",)
    calls = argv_log.read_text().splitlines()
    assert [call.split()[0] for call in calls] == ["lint", "upgrade"]
    assert_no_canary(argv_log.read_text(), "the subprocess's command line")


def test_production_through_the_applications_dbmigrate_is_linted_approved_in_the_ui_and_rehearsed(
        app_venv, environment, target, home, tmp_path):
    """The production policy holds through the subprocess: the lint blocks, the approver sees the
    plan of a dry run and approves in the UI, the run backs up and rehearses."""
    import threading

    from flows.migrate import db_migrate
    from tests.test_flows import _resume_when_paused

    name = environment("production")
    executable, argv_log = wrapped(app_venv, tmp_path)
    blocked = application_project(tmp_path / "blocked", "op.create_index('ix_t_id', 't', ['id'])")
    state = db_migrate(environment=name, alembic_config=blocked, dbmigrate_executable=str(executable),
                       return_state=True)
    assert state.is_failed()
    assert state.message.startswith("lint: 1 finding(s) at or above warning block this run in production: "
                                    "revision r2: require-concurrent-index-creation"), state.message
    assert fingerprint_of(target).revisions == ()
    assert [call.split()[0] for call in argv_log.read_text().splitlines()] == ["lint"]

    argv_log.unlink()
    seen = {}
    approver = threading.Thread(target=_resume_when_paused, args=({"decision": "approve", "approver": "Alice"}, seen))
    approver.start()
    state = db_migrate(environment=name, alembic_config=application_project(tmp_path / "clean"),
                       dbmigrate_executable=str(executable), return_state=True)
    approver.join()
    assert state.is_completed(), state.message
    report = state.result()
    assert report["approval"]["approver"] == "Alice" and report["status"] == "succeeded"
    assert report["backup"] and report["rehearsal"]["steps"][0]["revision"] == "r1"
    assert "- `r1` step 1" in seen["description"] and "CREATE TABLE t" in seen["description"]
    assert [call.split()[:2] for call in argv_log.read_text().splitlines()] == [
        ["lint", "-r"], ["upgrade", "-r"], ["upgrade", "-r"]]  # the lint, the dry run shown to the approver, the run
    assert "--dry-run" in argv_log.read_text().splitlines()[1] and "--rehearse" in argv_log.read_text().splitlines()[2]
    assert fingerprint_of(target).revisions == ("r1",)
