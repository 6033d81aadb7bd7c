"""`dbmigrate overview` (every environment: revision, head, pending, the last run, the last good
backup) and `dbmigrate history` (the applied revisions: when, who, how long, the run's link),
against real PostgreSQL databases, their Prefect blocks and the reports of real runs."""

import json
import uuid

from tests.support.helpers import libpq_url, save_environment
from tests.support.projects import linear, stock_project

TABLE = "op.create_table('{0}', sa.Column('id', sa.Integer, primary_key=True))"


def test_overview_and_history_of_every_environment(cli, pg_cluster, target, prefect_api, home, tmp_path,
                                                   monkeypatch):
    from prefect.settings import PREFECT_UI_URL

    from flows.migrate import db_migrate

    monkeypatch.setenv("DBMIGRATE_HOME", str(home))
    ini = str(stock_project(tmp_path, linear(TABLE.format("t1"), TABLE.format("t2"))))
    suffix = uuid.uuid4().hex[:6]
    staging, development, gone = f"ov-staging-{suffix}", f"ov-dev-{suffix}", f"ov-gone-{suffix}"
    other = pg_cluster.target(pg_cluster.create_database())
    try:
        save_environment(target, staging)
        save_environment(other, development, approval_required=False, rehearse=False, backup_required=False,
                         lint_blocks=False)
        save_environment(target, gone, port=1)  # an environment whose server is down
        # staging: r1 by the command line, with a backup; development: head by the db-migrate flow
        env = {"DATABASE_URL": libpq_url(target), "DBMIGRATE_ENVIRONMENT": staging}
        assert cli("upgrade", "-r", "r1", "--backup", "--approver", "ana", "--alembic-config", ini,
                   env=env).returncode == 0
        state = db_migrate(environment=development, alembic_config=ini, backup=False, requested_by="ben",
                           return_state=True)
        assert state.is_completed(), state.message

        shown = cli("overview", "--json", "--alembic-config", ini, env={"PREFECT_API_URL": prefect_api})
        assert shown.returncode == 0, shown.stderr
        states = {s["environment"]: s for s in json.loads(shown.stdout)}
        s, d, g = states[staging], states[development], states[gone]
        assert (s["current"], s["heads"], s["pending"]) == (["r1"], ["r2"], ["r2"])
        assert s["last_run"]["status"] == "succeeded" and s["last_run"]["target_revision"] == "r1"
        assert s["last_good_backup"]["revision"] is None  # taken before r1 was applied
        assert (d["current"], d["pending"], d["last_good_backup"]) == (["r2"], [], None)
        assert d["last_run"]["status"] == "succeeded"
        assert d["last_run"]["link"] == f"{PREFECT_UI_URL.value()}/runs/flow-run/{state.state_details.flow_run_id}"
        assert g["current"] is None and "127.0.0.1:1" in g["error"] and g["last_run"] is None

        text = cli("overview", "--alembic-config", ini, env={"PREFECT_API_URL": prefect_api}).stdout
        assert f"{staging}  (127.0.0.1:{target.port}/{target.database})\n  current:  r1   head: r2   pending: 1 (r2)" \
               in text

        history = cli("history", "--json")
        assert history.returncode == 0, history.stderr
        applied = [(c["environment"], c["revision"], c["by"], c["run_status"]) for c in json.loads(history.stdout)
                   if c["environment"] in (staging, development)]
        assert applied == [(staging, "r1", "ana", "succeeded"), (development, "r1", "ben", "succeeded"),
                           (development, "r2", "ben", "succeeded")]
        [only] = json.loads(cli("history", "--json", "--env", staging).stdout)
        assert only["duration_s"] >= 0 and only["link"].startswith(str(home / "reports"))
        assert only["finished_at"] and only["message"] == "step 1"
    finally:
        pg_cluster.drop_database(other.database)
