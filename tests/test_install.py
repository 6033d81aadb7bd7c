"""The plain command line installed without Prefect (`pip install dbmigrate`, no extras) in an
application's own environment, and the db-migrate flow migrating that application through it."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from tests.support.helpers import (REPO, assert_no_canary, fingerprint_of, last_report, one_line_error, scalar,
                                   scratch_databases, sql, wait_until)
from tests.support.pgcluster import environ_without_db
from tests.support.projects import linear, stock_project

# The application's virtualenv, built once: one worker runs the module (--dist loadgroup).
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("application-venv")]

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


def wrapped(app_venv: Path, tmp_path: Path, newer: bool = False) -> tuple[Path, Path]:
    """The application's dbmigrate behind a shell script that logs each command line; (script, log).
    ``newer``: its JSON has a key this worker's dbmigrate does not know in each lint finding and
    exception, as another version's would."""
    argv_log, wrapper = tmp_path / "argv.log", tmp_path / "dbmigrate"
    run = f"{app_venv}/bin/dbmigrate \"$@\"" + (""" | sed 's/"rule": /"since": "9.9", "rule": /'""" if newer else "")
    wrapper.write_text(f'#!/bin/sh\nprintf "%s\\n" "$*" >> {argv_log}\n{run}\n')
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
    from prefect.settings import PREFECT_UI_URL

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
    assert broken.is_failed() and broken.message.startswith("load failed: alembic config not found: "), \
        broken.message  # its error line, not a traceback
    argv_log.unlink()

    state = db_migrate(environment=name, alembic_config=ini, dbmigrate_executable=str(wrapper),
                       requested_by="ops", return_state=True)
    assert state.is_completed(), state.message
    report = state.result()
    assert (report["status"], report["revision_after"], report["approval"]["approver"]) == ("succeeded", "r1", "ops")
    assert report["backup"] and report["lint"]["revisions"][0]["revision"] == "r1"
    assert report["run_url"] == f"{PREFECT_UI_URL.value()}/runs/flow-run/{state.state_details.flow_run_id}"
    assert fingerprint_of(target).revisions == ("r1",)
    calls = argv_log.read_text().splitlines()
    assert [call.split()[0] for call in calls] == ["upgrade", "lint", "upgrade"]  # the plan, its lint, the run
    assert calls[2].startswith("upgrade -r r1 --expect-current base ") and "--lint-level warning" in calls[2]
    assert_no_canary(argv_log.read_text(), "the subprocess's command line")


def test_production_through_the_applications_dbmigrate_is_linted_approved_in_the_ui_and_rehearsed(
        app_venv, environment, target, home, tmp_path):
    """The production policy holds through the subprocess: the lint blocks (read from a newer
    dbmigrate's JSON too), the approver sees the plan of a dry run and approves in the UI, the run
    backs up and rehearses, and runs what was approved: not a revision deployed while the approval waited."""
    from prefect.flow_runs import resume_flow_run

    from flows.migrate import db_migrate
    from tests.support.flows import wait_for_approval_form

    name = environment("production")
    executable, argv_log = wrapped(app_venv, tmp_path, newer=True)
    blocked = application_project(tmp_path / "blocked", "op.create_index('ix_t_id', 't', ['id'])")
    state = db_migrate(environment=name, alembic_config=blocked, dbmigrate_executable=str(executable),
                       return_state=True)
    assert state.is_failed()
    assert state.message.startswith("lint: 1 finding(s) at or above warning block this run in production: "
                                    "revision r2: require-concurrent-index-creation"), state.message
    assert fingerprint_of(target).revisions == ()
    assert [call.split()[0] for call in argv_log.read_text().splitlines()] == ["upgrade", "lint"]

    argv_log.unlink()
    clean = application_project(tmp_path / "clean", TABLE.replace("'t'", "'t2'"))
    r2 = tmp_path / "clean" / "migrations" / "versions" / "r2.py"
    later = r2.rename(tmp_path / "r2.py")  # deployed while the approval waits
    seen = {}

    def approve_once_r2_is_deployed():
        wait_for_approval_form(seen)
        later.rename(r2)
        resume_flow_run(seen["run"].id, run_input={"decision": "approve", "approver": "Alice"})

    approver = threading.Thread(target=approve_once_r2_is_deployed)
    approver.start()
    state = db_migrate(environment=name, alembic_config=clean, dbmigrate_executable=str(executable),
                       return_state=True)
    approver.join()
    assert state.is_completed(), state.message
    report = state.result()
    assert report["approval"]["approver"] == "Alice" and report["status"] == "succeeded"
    assert report["backup"] and [s["revision"] for s in report["rehearsal"]["steps"]] == ["r1"]
    assert "- `r1` step 1" in seen["description"] and "CREATE TABLE t" in seen["description"]
    calls = argv_log.read_text().splitlines()
    assert [call.split()[:2] for call in calls] == [["upgrade", "-r"], ["lint", "-r"], ["upgrade", "-r"]]
    assert "--dry-run" in calls[0] and "--rehearse" in calls[2]
    assert calls[2].startswith("upgrade -r r1 --expect-current base --approver Alice ")
    assert fingerprint_of(target).revisions == ("r1",), "r2 was not approved"


def test_upgrade_refuses_a_database_no_longer_where_the_plan_started_and_blocks_at_the_lint_level_given(
        cli, url, target, tmp_path):
    ini = str(stock_project(tmp_path, linear(TABLE, "op.create_index('ix_t_id', 't', ['id'])")))
    env = {"DATABASE_URL": url}
    moved = cli("upgrade", "--yes", "--expect-current", "r1", "--alembic-config", ini, env=env)
    assert moved.returncode == 1 and one_line_error(moved.stderr) == (
        "dbmigrate: error: the database is at base, not at r1 where the approved plan started: nothing was changed")
    assert cli("upgrade", "-r", "r1", "--yes", "--expect-current", "base", "--alembic-config", ini,
               env=env).returncode == 0
    blocked = cli("upgrade", "--yes", "--lint-level", "warning", "--alembic-config", ini, env=env)
    assert blocked.returncode == 1
    assert "revision r2: require-concurrent-index-creation" in one_line_error(blocked.stderr)
    assert fingerprint_of(target).revisions == ("r1",)


def test_the_applications_dbmigrate_rehearses_on_the_policys_scratch_server_its_password_kept_out_of_the_log(
        app_venv, environment, pg_cluster, tmp_path):
    from blocks import DatabaseCredentials
    from flows.migrate import db_migrate
    from tests.support.flows import run_logs

    role, password = f"scratch_{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    sql(pg_cluster.target("postgres"), f"CREATE ROLE {role} LOGIN SUPERUSER PASSWORD '{password}'")
    try:
        ini = application_project(tmp_path)
        env_py = tmp_path / "migrations" / "env.py"  # an application that logs its environment
        env_py.write_text("import os, sys\n"
                          "print('scratch:', os.environ.get('DBMIGRATE_SCRATCH_URL'), file=sys.stderr)\n"
                          + env_py.read_text())
        DatabaseCredentials(host="127.0.0.1", port=pg_cluster.port, database="postgres", username=role,
                            password=password, sslmode="disable", connect_timeout=5).save("scratch", overwrite=True)
        name = environment("staging", rehearse=True, scratch_server="scratch")
        state = db_migrate(environment=name, alembic_config=ini,
                           dbmigrate_executable=str(app_venv / "bin" / "dbmigrate"), return_state=True)
        assert state.is_completed(), state.message
        checked = {c["name"]: c for c in state.result()["health_checks"]}["scratch_server"]
        assert checked["status"] == "ok" and checked["data"]["role"] == role
        logs = run_logs(state)
        assert f"scratch: postgresql+psycopg://{role}:***@127.0.0.1:{pg_cluster.port}/postgres" in logs
        assert password not in logs
        assert_no_canary(logs, "the run log")
    finally:
        sql(pg_cluster.target("postgres"), f"DROP ROLE {role}")


def test_a_run_stopped_mid_rehearsal_lets_the_applications_dbmigrate_drop_its_copy_and_write_its_report(
        app_venv, environment, target, pg_cluster, home, tmp_path):
    """Prefect stops a flow run (cancelled, or its worker stopped) with SIGTERM to its process: here
    this test's, where the flow runs. The application's dbmigrate gets SIGTERM in turn, in its rehearsal."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import TerminationSignal

    from flows.migrate import db_migrate

    ini = application_project(tmp_path, "op.execute('SELECT pg_sleep(60)')")
    name = environment("staging", rehearse=True)

    def stop_the_run_once_the_copy_sleeps():
        wait_until(lambda: scalar(pg_cluster.target("postgres"), "SELECT count(*) FROM pg_stat_activity WHERE "
                                  "datname LIKE %s AND query LIKE %s", "dbmigrate\\_%", "%pg_sleep%"),
                   120, "the rehearsal's slow revision")
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=stop_the_run_once_the_copy_sleeps, daemon=True).start()
    previous = signal.signal(signal.SIGTERM, lambda *_: None)  # Prefect hands the signal on to it, the run ended
    try:
        with pytest.raises(TerminationSignal):
            db_migrate(environment=name, alembic_config=ini, dbmigrate_executable=str(app_venv / "bin" / "dbmigrate"))
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert scratch_databases(pg_cluster) == []
    report = last_report(home)
    assert (report["status"], report["error"]["phase"], report["error"]["message"]) == (
        "failed", "rehearsal", "terminated by SIGTERM")
    assert fingerprint_of(target).revisions == ()
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(report["run_url"].rsplit("/", 1)[1])
    assert "during the application's dbmigrate (backup, rehearsal, migration): database at base" in run.state.message
