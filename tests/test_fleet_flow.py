"""The db-migrate-fleet flow against a real `prefect server start`, two process workers running
prefect.yaml's fleet deployments, and tenant databases on the test PostgreSQL (made from a
template database, as a fleet of hundreds would be on this machine).

The fleet's project: r1 (a table with rows) <- r2 (another table) <- r3 (a CHECK constraint over
those rows), a transaction per revision. A tenant given a row that breaks the constraint fails in
r3, on its own data, with r2 committed.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.support.helpers import REPO, assert_no_canary, libpq_url, sql, wait_until
from tests.support.pgcluster import CANARY_PASSWORD
from tests.support.prefect_server import PrefectServer, Worker, deployed, final, flow_run, run_log, start_run
from tests.support.projects import linear, stock_project
from tests.support.webhooks import Listener

# Its own Prefect server and workers: one xdist worker runs the module (--dist loadgroup).
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("prefect-server-fleet")]

ENVIRONMENTS = ("development", "production")
HOOK = "/hooks/fleet-" + uuid.uuid4().hex  # the webhook URL's path: a secret, never in a message
TENANT_ROWS = 200
# r2 sleeps in PostgreSQL for the seconds the database's setting dbmigrate_test.sleep says (none: 0).
SLEEP = ("op.execute(\"SELECT pg_sleep(coalesce(nullif(current_setting('dbmigrate_test.sleep', true), '')::float, "
         "0))\")")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with deployed(PrefectServer(tmp_path_factory.mktemp("prefect-home"))) as server:
        yield server


@pytest.fixture(scope="module")
def workers(server, tmp_path_factory):
    """Two process workers sharing one DBMIGRATE_HOME (reports, backups), as two on one machine would."""
    state = tmp_path_factory.mktemp("worker-home")
    environ = server.environ(DBMIGRATE_CHECKOUT=str(REPO), PYTHONPATH=str(REPO), DBMIGRATE_HOME=str(state))
    started = [Worker(server, environ, state / f"worker-{n}.log") for n in (1, 2)]
    for worker in started:
        worker.start()
    try:
        yield started
    finally:
        for worker in started:
            worker.kill_all()


@pytest.fixture(scope="module")
def alerts(server, pg_cluster, tmp_path_factory):
    """A webhook listener on loopback and each environment's alerts set up by `blocks sync`, as an
    operator does it: the fleet's alerts go through the same automations as a single database's."""
    from tests.support.helpers import run_cli

    listener = Listener()
    home = tmp_path_factory.mktemp("sync-home")
    try:
        for environment in ENVIRONMENTS:
            # in this process: its client points at the server, the only setting the call names
            synced = run_cli(home, "blocks", "sync", "--env", environment, "--from-env", env={
                "PREFECT_API_URL": server.api_url, "DB_HOST": "127.0.0.1", "DB_PORT": str(pg_cluster.port),
                "DB_NAME": "postgres", "DB_USER": "postgres", "DB_PASSWORD": CANARY_PASSWORD, "DB_SSLMODE": "disable",
                "ALERT_WEBHOOK_URL": listener.url + HOOK})
            assert synced.returncode == 0, synced.stderr
        yield listener
    finally:
        listener.server.shutdown()


def alerted(listener: Listener, environment: str, subject: str, run_id: str, says: str) -> str:
    """The alert's text, delivered for the fleet run ``run_id``, with no secret in it."""
    delivery = listener.wait_for(HOOK, f"dbmigrate {environment}: {subject}", run_id, says)
    assert_no_canary(json.dumps(delivery.json), f"the fleet's {subject} alert")
    assert HOOK not in json.dumps(delivery.json)
    return delivery.text


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> str:
    steps = linear(
        ("op.execute('CREATE TABLE account (id int PRIMARY KEY, balance int NOT NULL)'); "
         f"op.execute('INSERT INTO account SELECT g, g FROM generate_series(1, {TENANT_ROWS}) g')",
         "op.drop_table('account')"),
        (f"{SLEEP}; op.create_table('audit', sa.Column('id', sa.Integer))", "op.drop_table('audit')"),
        ("op.create_check_constraint('balance_not_negative', 'account', 'balance >= 0')",
         "op.drop_constraint('balance_not_negative', 'account')"),
    )
    # A transaction per revision: a tenant failing in r3 keeps r2, which the automatic rollback undoes.
    return str(stock_project(tmp_path_factory.mktemp("fleet-project"), steps, transaction_per_migration=True))


class Tenants:
    """``count`` databases at r1, made from one template database; dropped at the end."""

    def __init__(self, pg_cluster, cli, ini: str, count: int, prefix: str):
        self.pg_cluster, self.names = pg_cluster, [f"{prefix}_{n:03d}" for n in range(1, count + 1)]
        template = f"{prefix}_template"
        pg_cluster.drop_database(template)
        with pg_cluster.admin() as conn:
            conn.execute(f'CREATE DATABASE "{template}"')
        done = cli("upgrade", "-r", "r1", "--yes", "--alembic-config", ini,
                   env={"DATABASE_URL": libpq_url(pg_cluster.target(template))})
        assert done.returncode == 0, done.stderr
        with pg_cluster.admin() as conn:
            for name in self.names:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
        pg_cluster.drop_database(template)

    def target(self, name: str):
        return self.pg_cluster.target(name)

    def revision(self, name: str) -> str | None:
        rows = sql(self.target(name), "SELECT version_num FROM alembic_version")
        return rows[0][0] if rows else None

    def slow(self, seconds: float) -> None:
        """Each tenant's r2 takes ``seconds`` from now on."""
        with self.pg_cluster.admin() as conn:
            for name in self.names:
                conn.execute(f"ALTER DATABASE \"{name}\" SET dbmigrate_test.sleep = '{seconds:g}'")

    def at(self, revision: str) -> list[str]:
        return [name for name in self.names if self.revision(name) == revision]

    def drop(self) -> None:
        for name in self.names:
            self.pg_cluster.drop_database(name)


def save_fleet(pg_cluster, environment: str, names: list[str], **policy) -> None:
    """The fleet block (one server's credentials and the database names) and a quick policy."""
    from blocks import DatabaseCredentials, EnvironmentPolicy
    from blocks.fleet import DatabaseFleet

    DatabaseCredentials(host="127.0.0.1", port=pg_cluster.port, database="postgres", username="postgres",
                        password=CANARY_PASSWORD, sslmode="disable", connect_timeout=5,
                        environment=environment).save(f"{environment}-fleet-server", overwrite=True)
    DatabaseFleet(environment=environment, credentials=f"{environment}-fleet-server",
                  databases=names).save(f"{environment}-fleet", overwrite=True)
    quick = {"retry_delay_s": 0.2, "approval_poll_s": 1, "approval_timeout_s": 300}
    EnvironmentPolicy(**{**quick, **policy}).save(environment, overwrite=True)


def start_fleet(environment: str, ini: str, **params) -> str:
    return start_run(None, environment, ini, flow="db-migrate-fleet", **params)


def batch_runs(fleet_run: str | None = None) -> list:
    """The batch runs (of one fleet run, or all), as the UI's runs list filters them by tag."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags

    tags = [f"fleet-run:{fleet_run}"] if fleet_run else ["fleet:development"]
    with get_client(sync_client=True) as client:
        return client.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=tags)))


def fleet_report(home: Path) -> dict:
    [path] = sorted(home.glob("**/reports/fleet-*.json"))[-1:]
    return json.loads(path.read_text())


class Sampler:
    """pg_stat_activity sampled every 200 ms while the fleet runs: the most tenant databases with
    a session of the fleet at once (the caps are per member: a member is a database). A database
    counts when two samples in a row see it: a member's work holds its sessions for seconds, while
    the backend of a session just closed lingers a moment under load (a third database was seen once
    in a single sample of a fleet that kept its cap)."""

    def __init__(self, pg_cluster, prefix: str):
        self.pg_cluster, self.prefix, self.most, self.done = pg_cluster, prefix, 0, threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        seen: set[str] = set()
        with self.pg_cluster.admin() as conn:
            while not self.done.is_set():
                now = {name for (name,) in conn.execute("SELECT DISTINCT datname FROM pg_stat_activity "
                                                        "WHERE datname LIKE %s AND pid <> pg_backend_pid()",
                                                        (f"{self.prefix}\\_%",))}
                self.most, seen = max(self.most, len(now & seen)), now
                time.sleep(0.2)

    def __enter__(self) -> Sampler:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.thread.join()


def test_a_member_failing_on_its_data_stops_the_fleet_within_its_wave(server, workers, pg_cluster, cli, project,
                                                                      alerts):
    """40 members, canary 1, waves of 5, C=4, H=2, two workers online; member 19 (wave 4) has a row
    its r3 refuses. No member starts after its failure (5 s), no later wave starts, the members in flight
    finish, development rolls member 19 back, the report classes all 40, and at most H=2 tenant
    databases had a session of the fleet at any moment. The waves ran in at most two
    db-migrate-fleet-batch runs (a lane per worker, not a run per wave and lane: a run costs seconds of
    fixed time, a member a fraction of one), each member migrated once, by one of them."""
    tenants = Tenants(pg_cluster, cli, project, 40, "tenant")
    try:
        sql(tenants.target("tenant_019"), "UPDATE account SET balance = -1 WHERE id = 7")
        save_fleet(pg_cluster, "development", tenants.names)
        with Sampler(pg_cluster, "tenant") as sampler:
            run_id = start_fleet("development", project, canary=1, wave_size=5, max_in_flight=4, per_server=2)
            run = final(run_id, 600)
        assert run.state.is_failed(), run.state
        assert "member failed: tenant_019" in run.state.message, run.state.message
        assert 1 <= sampler.most <= 2, f"{sampler.most} tenant databases at once with per_server=2"

        home = Path(workers[0].environ["DBMIGRATE_HOME"])
        report = fleet_report(home)
        rows = {row["member"]: row for row in report["members"]}
        assert list(rows) == tenants.names and sum(report["counts"].values()) == 40, report["counts"]
        failed = rows["tenant_019"]
        assert failed["status"] == "rolled back" and tenants.revision("tenant_019") == "r1", failed
        assert "balance_not_negative" in failed["message"] and failed["revision_after"] == "r1", failed
        assert "rollback: database back at the starting revision" in failed["message"], failed
        for name in tenants.names[:16]:  # the canary and waves 1-3
            assert rows[name]["status"] == "migrated" and tenants.revision(name) == "r3", rows[name]
        for name in tenants.names[21:]:  # waves 5-8: never started
            assert rows[name]["status"] == "not started" and tenants.revision(name) == "r1", rows[name]
        for name, row in rows.items():  # nobody started more than 5 s after the failure, and the database agrees
            if row["started_at"]:
                assert row["started_at"] <= failed["finished_at"] + 5 or row["status"] == "not started", row
            assert tenants.revision(name) == ("r3" if row["status"] == "migrated" else "r1"), row
        assert report["status"] == "failed" and "tenant_019" in report["error"]
        assert_no_canary(json.dumps(report), "the fleet report")
        assert "member failed: tenant_019" in alerted(alerts, "development", "run failed", run_id, "tenant_019")
        lanes = batch_runs(run_id)
        assert len(lanes) <= 2, [lane.name for lane in lanes]
        assert all(f"fleet-run:{run_id}" in lane.tags for lane in lanes)
        assert all(lane.state.is_completed() or lane.state.message == "member failed: tenant_019" for lane in lanes), \
            [(lane.name, lane.state.name, lane.state.message) for lane in lanes]
        for name in tenants.names[:16]:
            [migrated] = migrations("development", name)
            assert migrated["fleet_run"] == run_id and migrated["child_run"] in {str(lane.id) for lane in lanes}
    finally:
        tenants.drop()


def parent_process(workers: list[Worker], run_id: str) -> int:
    """The flow-run process of ``run_id`` (the worker starts it with PREFECT__FLOW_RUN_ID set)."""
    import psutil

    for worker in workers:
        for pid in worker.flow_run_pids():
            try:
                if psutil.Process(pid).environ().get("PREFECT__FLOW_RUN_ID") == run_id:
                    return pid
            except psutil.Error:
                continue
    return 0


def lane_worker(workers: list[Worker], run_id: str) -> Worker:
    """The worker running the lane ``run_id`` (its flow-run process's parent)."""
    pid = wait_until(lambda: parent_process(workers, run_id), 60, f"the process of lane run {run_id}")
    [worker] = [w for w in workers if pid in w.flow_run_pids()]
    return worker


def migrations(environment: str, name: str) -> list[dict]:
    """Each time the run history records ``name`` migrated (the versions of its member record saying
    so, each naming its lane, ``child_run``, and its fleet run)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows.fleet_state import member_key

    with get_client(sync_client=True) as client:
        versions = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=[member_key(environment, name)])))
    return [row for v in versions if (row := json.loads(v.data)[0])["status"] == "migrated"]


def test_the_fleet_run_sigkilled_mid_wave_then_run_again_migrates_each_member_once(server, workers, pg_cluster,
                                                                                 cli, project):
    """8 members, waves of 4, C=2 (two lanes), each member's r2 taking 3 s. The parent's process is
    SIGKILLed once 2 members are at r3 (mid first wave); its lanes go on with what they were given. A
    new fleet run waits for those instead of starting them again, leaves the ones the first run
    migrated (unchanged) and migrates the rest: every member at r3, migrated once in the run history,
    by one lane of one of the two fleet runs."""
    tenants = Tenants(pg_cluster, cli, project, 8, "resumed")
    try:
        tenants.slow(3)
        save_fleet(pg_cluster, "development", tenants.names)
        params = {"canary": 1, "wave_size": 4, "max_in_flight": 2, "per_server": 2}
        first = start_fleet("development", project, **params)
        wait_until(lambda: len(tenants.at("r3")) >= 2, 300, "2 members at r3", 0.5)
        pid = wait_until(lambda: parent_process(workers, first), 30, "the fleet run's process")
        os.kill(pid, signal.SIGKILL)
        killed = final(first, 120)
        assert killed.state.is_crashed(), killed.state
        done_before = set(tenants.at("r3"))
        assert len(done_before) < 8

        second = start_fleet("development", project, **params)
        run = final(second, 600)
        assert run.state.is_completed(), run.state
        assert tenants.at("r3") == tenants.names
        lanes = {str(child.id) for child in batch_runs(first) + batch_runs(second)}
        by_first = set()
        for name in tenants.names:
            [migrated] = migrations("development", name)
            assert migrated["child_run"] in lanes and migrated["fleet_run"] in (first, second), migrated
            if migrated["fleet_run"] == first:
                by_first.add(name)
        assert batch_runs(second), "the second run migrated some"
        # A lane still going when the parent died finishes what it was given: the second run finds
        # its members at r3 (unchanged) or waits for them. Either way the first run migrated them.
        assert done_before <= by_first
        home = Path(workers[0].environ["DBMIGRATE_HOME"])
        rows = {row["member"]: row for row in fleet_report(home)["members"]}
        assert {name for name, row in rows.items() if row["status"] == "unchanged"} <= by_first
        assert {name for name, row in rows.items() if row["status"] == "migrated"} >= set(tenants.names) - by_first
        assert all(row["status"] in ("migrated", "unchanged") for row in rows.values()), rows
    finally:
        tenants.drop()


def test_a_production_fleet_pauses_once_after_its_canary_and_a_rejection_leaves_the_rest(server, workers, pg_cluster,
                                                                                       cli, project, alerts):
    """Production: the canary is migrated (backup, rehearsal), then the fleet waits for one approval
    showing the canary's outcome and the wave plan; rejected, no other member is touched and the
    report says the canary stays migrated."""
    from prefect.client.orchestration import get_client
    from prefect.flow_runs import resume_flow_run

    from tests.support.helpers import fingerprint_of

    tenants = Tenants(pg_cluster, cli, project, 4, "prod")
    try:
        # r3's CHECK constraint without NOT VALID is a lint finding production blocks on (the fleet lints once,
        # before anything runs, and stops: seen); here the finding is reviewed and accepted
        save_fleet(pg_cluster, "production", tenants.names, lint_blocks=False)
        untouched = {name: fingerprint_of(tenants.target(name)) for name in tenants.names[1:]}
        run_id = start_fleet("production", project, canary=1, wave_size=2, requested_by="ci")
        paused = wait_until(lambda: (state := flow_run(run_id).state).is_paused() and state, 300,
                            "the fleet to wait for approval", 1)
        assert paused.message.startswith("waiting for approval of the production fleet to head (4 members)"), \
            paused.message
        assert tenants.revision("prod_001") == "r3" and tenants.at("r1") == tenants.names[1:]
        alerted(alerts, "production", "waiting for approval", run_id, "the production fleet to head (4 members)")
        resume_flow_run(run_id, run_input={"decision": "reject", "approver": "Bob"})
        run = final(run_id, 300)
        assert run.state.is_failed(), run.state
        assert "rejected by Bob: the other members were not started, the canary stays migrated" in run.state.message
        with get_client(sync_client=True) as client:
            states = client.read_flow_run_states(run_id)
        assert sum(state.is_paused() for state in states) == 1, [state.name for state in states]
        for name, before in untouched.items():
            assert fingerprint_of(tenants.target(name)) == before, name
        home = Path(workers[0].environ["DBMIGRATE_HOME"])
        report = fleet_report(home)
        rows = {row["member"]: row for row in report["members"]}
        assert rows["prod_001"]["status"] == "migrated" and rows["prod_001"]["backup"], rows["prod_001"]
        assert all(rows[name]["status"] == "not started" for name in tenants.names[1:]), rows
        assert report["approval"]["decision"] == "rejected" and report["approval"]["approver"] == "Bob"
    finally:
        tenants.drop()


def test_a_server_short_of_connections_at_a_gate_pauses_the_fleet_until_approved(server, workers, pg_cluster, cli,
                                                                                project, alerts):
    """3 members, canary 1, a wave of 2. The server is left with fewer than 20% of its connections
    free (sessions the test holds): the canary migrates, then the fleet pauses before wave 1, its
    state message and alert saying which server and why, wave 1 untouched. The sessions let go and
    the pause approved, the fleet migrates the rest."""
    import psycopg
    from prefect.flow_runs import resume_flow_run

    tenants = Tenants(pg_cluster, cli, project, 3, "gated")
    held = []
    try:
        save_fleet(pg_cluster, "development", tenants.names)
        with pg_cluster.admin() as conn:
            [(used, most)] = conn.execute("SELECT count(*), current_setting('max_connections')::int "
                                          "FROM pg_stat_activity").fetchall()
        # 15 left free: enough for the canary's sessions, under the gate's 20% of max_connections
        held = [psycopg.connect(libpq_url(tenants.target("gated_003"))) for _ in range(most - used - 15)]
        run_id = start_fleet("development", project, canary=1, wave_size=2, per_server=2)
        paused = wait_until(lambda: (state := flow_run(run_id).state).is_paused() and state, 300,
                            "the fleet to pause at the gate before wave 1", 1)
        why = f"wave 1 of the development fleet: server 127.0.0.1:{pg_cluster.port} short of free connections"
        assert paused.message.startswith(f"waiting for approval of {why}"), paused.message
        assert tenants.revision("gated_001") == "r3" and tenants.at("r1") == tenants.names[1:]
        alerted(alerts, "development", "waiting for approval", run_id, why)
        for session in held:
            session.close()
        resume_flow_run(run_id, run_input={"decision": "approve", "approver": "Alice"})
        run = final(run_id, 300)
        assert run.state.is_completed(), run.state
        assert tenants.at("r3") == tenants.names
    finally:
        for session in held:
            session.close()
        tenants.drop()


@contextmanager
def one_run_each(workers: list[Worker]):
    """The workers restarted to take one flow run each: a fleet's parent and its one batch run land
    on different workers."""
    for worker in workers:
        worker.stop()
        worker.limit = 1
        worker.start()
    try:
        yield
    finally:
        for worker in workers:
            worker.kill_all()  # with a fleet run the test left hanging, if any
            worker.limit = None
            worker.start()


def test_a_worker_killed_with_a_member_in_flight_crashes_its_batch_and_stops_the_fleet(server, workers, pg_cluster,
                                                                                     cli, tmp_path):
    """3 members, canary 1, a project whose r3 takes 20 s (r2 committed before it, a transaction per
    revision). Once the canary is inside r3, its batch run's worker is SIGKILLed with its flow-run processes:
    nobody reports, Prefect shows the batch Running. The fleet sees the member's presence gone, rolls the
    database left at r2 back to r1 (development's policy, as a single database's), sets the batch Crashed
    saying so, frees its slots and ends Failed naming the member, well before r3 would have ended; the
    others are not started and untouched."""
    from prefect.client.orchestration import get_client

    ini = str(stock_project(tmp_path, linear(
        ("op.execute('CREATE TABLE account (id int PRIMARY KEY, balance int NOT NULL)')", "op.drop_table('account')"),
        ("op.create_table('audit', sa.Column('id', sa.Integer))", "op.drop_table('audit')"),
        (f"{SLEEP}; op.create_check_constraint('balance_not_negative', 'account', 'balance >= 0')",
         "op.drop_constraint('balance_not_negative', 'account')"),
    ), transaction_per_migration=True))
    tenants = Tenants(pg_cluster, cli, ini, 3, "lost")
    try:
        tenants.slow(20)
        save_fleet(pg_cluster, "development", tenants.names)
        with one_run_each(workers):
            run_id = start_fleet("development", ini, canary=1, wave_size=2, max_in_flight=1)
            canary = tenants.names[0]
            wait_until(lambda: sql(tenants.target(canary), "SELECT count(*) FROM pg_stat_activity WHERE query LIKE "
                                   "'SELECT pg_sleep%' AND datname = current_database()")[0][0] > 0, 300,
                       "the canary inside r3", 0.5)
            assert tenants.revision(canary) == "r2"
            [batch] = batch_runs(run_id)
            worker = lane_worker(workers, str(batch.id))
            since = time.monotonic()
            worker.kill_all()  # a lost machine: the worker and its flow-run processes, SIGKILLed
            run = final(run_id, 60)
            took = time.monotonic() - since
        assert run.state.is_failed(), run.state
        assert f"member failed: {canary}" in run.state.message, run.state.message
        assert took < 20, f"the fleet took {took:.0f} s after the kill"

        [batch] = batch_runs(run_id)
        assert batch.state.is_crashed(), batch.state
        assert batch.state.message == ("Run lost during the migration (its process and worker are gone): "
                                       f"member '{canary}': database left at r2, between the starting revision r1 "
                                       "and the target r3; rolled back automatically to r1, its starting revision."), \
            batch.state.message
        assert tenants.at("r1") == tenants.names
        home = Path(workers[0].environ["DBMIGRATE_HOME"])
        rows = {row["member"]: row for row in fleet_report(home)["members"]}
        assert rows[canary]["status"] == "failed" and rows[canary]["revision_after"] == "r1", rows[canary]
        assert "its run was lost" in rows[canary]["message"], rows[canary]
        assert all(rows[name]["status"] == "not started" for name in tenants.names[1:]), rows
        with get_client(sync_client=True) as client:  # the lost member's slots freed: a rerun need not wait 5 min
            assert client.read_global_concurrency_limit_by_name("fleet-development").active_slots == 0
    finally:
        tenants.drop()


def presences(pg_cluster, run_id: str) -> list[int]:
    """The server processes of the run's presence connections (flows.recovery.presence_name)."""
    with pg_cluster.admin() as conn:
        return [pid for (pid,) in conn.execute("SELECT pid FROM pg_stat_activity WHERE application_name = %s",
                                               (f"dbmigrate run {run_id}",))]


def test_a_lane_lost_while_idle_between_waves_is_found_and_stops_the_fleet(server, workers, pg_cluster, cli, project):
    """4 members, canary 1, waves of 2, two lanes; three workers taking one run each (the parent and
    each lane alone on one). In wave 1, lane 2's member takes 20 s (its r2); lane 1 ends its own and
    waits, idle, keeping its presence connection (opened again when the server drops it); then its
    worker is SIGKILLed with its process: nobody reports, Prefect shows it Running. Wave 2 gives lane
    1 the last member: the fleet finds the lane's presence gone, sets it Crashed saying it was lost
    between members, classes the member it never started `not started` (at r1, untouched) and ends
    Failed, instead of waiting for it for ever."""
    tenants = Tenants(pg_cluster, cli, project, 4, "idle")
    canary, quick, slow, last = tenants.names
    extra = Worker(server, workers[0].environ, workers[0].log.with_name("worker-3.log"), limit=1)
    try:
        with pg_cluster.admin() as conn:
            conn.execute(f"ALTER DATABASE \"{slow}\" SET dbmigrate_test.sleep = '20'")
        save_fleet(pg_cluster, "development", tenants.names)
        with one_run_each(workers):
            extra.start()
            run_id = start_fleet("development", project, canary=1, wave_size=2, max_in_flight=2, per_server=2)
            wait_until(lambda: migrations("development", quick), 300, f"{quick} migrated", 0.5)
            assert tenants.revision(slow) != "r3", "the slow member is still migrating"
            [lane] = [run for run in batch_runs(run_id) if run.name == "development-fleet-lane-1"]
            worker = lane_worker([*workers, extra], str(lane.id))
            # Its presence dropped by the server (as a restart would): the lane opens it again well
            # within the 10 s after which the fleet would take it for lost.
            [before] = presences(pg_cluster, str(lane.id))
            with pg_cluster.admin() as conn:
                conn.execute("SELECT pg_terminate_backend(%s)", (before,))
            wait_until(lambda: presences(pg_cluster, str(lane.id)) not in ([], [before]), 7, "its presence again", 0.2)
            worker.kill_all()  # a lost machine, while its lane waits for the next wave
            wait_until(lambda: tenants.revision(slow) == "r3", 60, f"{slow} at r3", 0.5)
            since = time.monotonic()
            run = final(run_id, 60)
            took = time.monotonic() - since
        assert run.state.is_failed(), run.state
        assert "lane 1 was lost between members" in run.state.message, run.state.message
        assert took < 30, f"the fleet took {took:.0f} s after the last wave started"
        [lost] = [run for run in batch_runs(run_id) if run.name == "development-fleet-lane-1"]
        assert lost.state.is_crashed(), lost.state
        assert lost.state.message == ("Run lost between members (its process and worker are gone): "
                                      f"not started: '{last}'."), lost.state.message
        assert tenants.at("r3") == [canary, quick, slow] and tenants.revision(last) == "r1"
        home = Path(workers[0].environ["DBMIGRATE_HOME"])
        rows = {row["member"]: row for row in fleet_report(home)["members"]}
        assert rows[last]["status"] == "not started", rows[last]
        assert "its run was lost before it started" in rows[last]["message"], rows[last]
        assert all(rows[name]["status"] == "migrated" for name in (canary, quick, slow)), rows
    finally:
        extra.kill_all()
        tenants.drop()


def test_a_lane_lost_waiting_for_its_first_members_slot_is_found_and_stops_the_fleet(server, workers, pg_cluster,
                                                                                     cli, project):
    """2 members on one server whose cap is 1, no canary, one wave, two lanes; three workers taking one
    run each. Both members' r2 take 20 s: one lane migrates its member while the other waits for the
    server's slot, its presence already held on the server's maintenance database (not on a tenant
    database, which the caps count). The waiting lane's worker is SIGKILLed with its process: the fleet
    finds its presence gone, sets it Crashed saying it was lost before its first member, classes that
    member `not started` (at r1, untouched) and ends Failed, instead of waiting for it for ever."""
    from flows.fleet_state import RUNNING, read_records

    tenants = Tenants(pg_cluster, cli, project, 2, "first")
    extra = Worker(server, workers[0].environ, workers[0].log.with_name("worker-3.log"), limit=1)
    try:
        tenants.slow(20)
        save_fleet(pg_cluster, "development", tenants.names)
        with one_run_each(workers):
            extra.start()
            run_id = start_fleet("development", project, canary=0, wave_size=2, max_in_flight=2, per_server=1)

            def lanes_present() -> dict | None:
                lanes = {str(run.id): run for run in batch_runs(run_id)}
                running = {name: row for name, row in read_records("development", tenants.names).items()
                           if row["status"] == RUNNING}
                if len(lanes) == 2 and len(running) == 1 and all(presences(pg_cluster, lane) for lane in lanes):
                    return {"lanes": lanes, "running": running}
                return None

            seen = wait_until(lanes_present, 120, "one lane migrating, the other waiting for the slot", 0.5)
            [(migrating, row)] = seen["running"].items()
            [waiting] = [name for name in tenants.names if name != migrating]
            [lane] = [run for run_id_, run in seen["lanes"].items() if run_id_ != row["child_run"]]
            with pg_cluster.admin() as conn:
                databases = {datname for (datname,) in conn.execute(
                    "SELECT datname FROM pg_stat_activity WHERE application_name = ANY(%s)",
                    ([f"dbmigrate run {run_id_}" for run_id_ in seen["lanes"]],))}
            assert databases == {"postgres"}, databases
            worker = lane_worker([*workers, extra], str(lane.id))
            number = lane.name.rsplit("-", 1)[1]
            wait_until(lambda: f"lane {number} took its first member" in run_log(run_id), 30,
                       "the fleet's word that it saw the waiting lane's presence", 0.5)
            since = time.monotonic()
            worker.kill_all()  # a lost machine, while its lane waits for the server's slot
            run = final(run_id, 90)
            took = time.monotonic() - since
        assert run.state.is_failed(), run.state
        assert f"lane {number} was lost before its first member" in run.state.message, run.state.message
        assert took < 40, f"the fleet took {took:.0f} s after the kill"
        [lost] = [r for r in batch_runs(run_id) if r.id == lane.id]
        assert lost.state.is_crashed(), lost.state
        assert lost.state.message == ("Run lost before its first member (its process and worker are gone): "
                                      f"not started: '{waiting}'."), lost.state.message
        assert tenants.revision(migrating) == "r3" and tenants.revision(waiting) == "r1"
        home = Path(workers[0].environ["DBMIGRATE_HOME"])
        rows = {row["member"]: row for row in fleet_report(home)["members"]}
        assert rows[migrating]["status"] == "migrated", rows[migrating]
        assert rows[waiting]["status"] == "not started", rows[waiting]
        assert "its run was lost before it started" in rows[waiting]["message"], rows[waiting]
    finally:
        extra.kill_all()
        tenants.drop()
