"""A fleet of tenant databases migrated by db-migrate-fleet against a shell loop of
`dbmigrate upgrade --backup` over the same databases (issue 17's naive alternative).

The tenants: copies (CREATE DATABASE ... TEMPLATE) of one database at the sample schema's 0004
with some rows (stack.tenants'), on a fresh embedded PostgreSQL; each run migrates them to
the head (0005 converts the rows, 0006), and they are copied afresh before the next. The fleet: a
real `prefect server start`, prefect.yaml's development fleet deployments, process workers (the
development policy: automatic rollback; backups on), canary 1, waves of --wave-size, C = 8, H = 8
(one server). Target on this 2-core machine: the fleet with two workers at most 0.5x the loop.

    python benchmarks/fleet.py [--tenants 100] [--workers 1,2,3] [--wave-size 25] [--members-per-run 0]
                               [--query-seconds 2] [--skip-loop]

Printed: the loop's wall time and per member; per worker count, the fleet's wall time (its run's
creation to its final state), the ratio to the loop, the members' own time (the pipeline's, summed
from their reports), the orchestration cost per member (the batch runs' time beyond their members',
per member), the parent run's time, and its API requests per minute (its polls: two requests each,
plus three per batch run created and two per wave; the poll count from its own log line).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from stack.tenants import ROWS, TENANT_REVISION  # noqa: E402
from tests.helpers import libpq_url  # noqa: E402
from tests.pgcluster import CANARY_PASSWORD, running  # noqa: E402
from tests.prefect_server import PrefectServer, Worker, prefect, wait_until  # noqa: E402

BIN = Path(sys.executable).parent
TEMPLATE = "bench_template"
TARGET_RATIO = 0.5


def tenants(cluster, count: int) -> list[str]:
    """``count`` fresh copies of the template (made once, at 0004 with rows)."""
    names = [f"tenant_{n:03d}" for n in range(1, count + 1)]
    with cluster.admin() as conn:
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (TEMPLATE,)).fetchall():
            conn.execute(f'CREATE DATABASE "{TEMPLATE}"')
            url = libpq_url(cluster.target(TEMPLATE))
            subprocess.run([str(BIN / "dbmigrate"), "upgrade", "-r", TENANT_REVISION, "--yes"], cwd=REPO, check=True,
                           capture_output=True, env={**os.environ, "DATABASE_URL": url,
                                                     "DBMIGRATE_HOME": tempfile.mkdtemp()})
            with cluster.admin(TEMPLATE) as template:
                for statement in ROWS:
                    template.execute(statement)
        for name in names:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{TEMPLATE}" STRATEGY FILE_COPY')
    return names


def shell_loop(cluster, names: list[str], home: Path) -> float:
    """for db in ...; do DATABASE_URL=... dbmigrate upgrade --backup --yes; done"""
    started = time.perf_counter()
    for name in names:
        subprocess.run([str(BIN / "dbmigrate"), "upgrade", "--backup", "--yes"], cwd=REPO, check=True,
                       capture_output=True, env={**os.environ, "DATABASE_URL": libpq_url(cluster.target(name)),
                                                 "DBMIGRATE_HOME": str(home)})
    return time.perf_counter() - started


def save_blocks(cluster, names: list[str]) -> None:
    from blocks import DatabaseCredentials
    from blocks.fleet import DatabaseFleet

    DatabaseCredentials(host="127.0.0.1", port=cluster.port, database="postgres", username="postgres",
                        password=CANARY_PASSWORD, sslmode="disable", environment="development",
                        ).save("development-fleet-server", overwrite=True)
    DatabaseFleet(environment="development", credentials="development-fleet-server",
                  databases=names).save("development-fleet", overwrite=True)


def fleet_run(server: PrefectServer, wave_size: int, members_per_run: int) -> dict:
    """One db-migrate-fleet/development run to its end: its figures."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags, LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import LogSort

    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("db-migrate-fleet/development")
        run = client.create_flow_run_from_deployment(deployment.id, parameters={
            "environment": "development", "wave_size": wave_size, "max_in_flight": 8, "per_server": 8,
            "members_per_run": members_per_run})
        run = wait_until(lambda: (r := client.read_flow_run(run.id)).state.is_final() and r, 3600, "the fleet", 1)
        assert run.state.is_completed(), f"{run.state.name}: {run.state.message}"
        wall = (run.state.timestamp - run.created).total_seconds()
        batches = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            tags=FlowRunFilterTags(all_=[f"fleet-run:{run.id}"])))
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])), limit=20,
                                sort=LogSort.TIMESTAMP_DESC)
    polls = next((int(m.group(1)) for log in logs if (m := re.search(r"(\d+) polls of the batch runs", log.message))),
                 0)
    waves = 1 + -(-99 // wave_size)
    requests = 2 * polls + 3 * len(batches) + 2 * waves
    parent_s = run.total_run_time.total_seconds()
    batch_s = sum(b.total_run_time.total_seconds() for b in batches)
    return {"wall_s": wall, "batches": len(batches), "parent_run_s": parent_s, "batch_run_s": batch_s,
            "requests_per_min": requests / (parent_s / 60) if parent_s else 0.0}


def member_seconds(home: Path) -> float:
    """The members' own pipeline time, from the single-database reports the batches wrote."""
    total = 0.0
    for path in (home / "reports").glob("2*.json"):
        total += json.loads(path.read_text()).get("duration_s") or 0.0
    return total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tenants", type=int, default=100)
    parser.add_argument("--workers", default="1,2,3", help="worker counts to run the fleet with, e.g. 2 or 1,2,3")
    parser.add_argument("--wave-size", type=int, default=25)
    parser.add_argument("--query-seconds", default="2", help="the workers' PREFECT_WORKER_QUERY_SECONDS (Prefect: 10)")
    parser.add_argument("--members-per-run", type=int, default=0, help="members per batch run (0: a wave over C runs)")
    parser.add_argument("--skip-loop", action="store_true")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="dbmigrate-bench-fleet-"))
    print(f"# {platform.node()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}; {args.tenants} tenants, "
          f"waves of {args.wave_size}, C=8, H=8, {args.members_per_run or 'auto'} members per batch run, "
          f"worker query interval {args.query_seconds} s")
    with ExitStack() as stack:
        (base / "pg").mkdir()
        cluster = stack.enter_context(running(base / "pg"))
        loop_s = None
        if not args.skip_loop:
            names = tenants(cluster, args.tenants)
            loop_s = shell_loop(cluster, names, base / "loop-home")
            print(f"shell loop of dbmigrate upgrade --backup: {loop_s:.1f} s ({loop_s / len(names):.2f} s per member)")
        server = PrefectServer(base / "prefect-home")
        (base / "prefect-home").mkdir()
        server.start()
        stack.callback(server.stop)
        from prefect.settings import PREFECT_API_URL, temporary_settings

        stack.enter_context(temporary_settings(updates={PREFECT_API_URL: server.api_url}))
        prefect(server, "work-pool", "create", "dbmigrate", "--type", "process", "--overwrite", cwd=REPO)
        prefect(server, "deploy", "--name=db-migrate-fleet/development", "--name=db-migrate-fleet-batch/development",
                cwd=REPO)
        for count in (int(n) for n in args.workers.split(",")):
            names = tenants(cluster, args.tenants)
            save_blocks(cluster, names)
            home = base / f"fleet-home-{count}"
            home.mkdir()
            environ = server.environ(DBMIGRATE_CHECKOUT=str(REPO), PYTHONPATH=str(REPO), DBMIGRATE_HOME=str(home),
                                     PREFECT_WORKER_QUERY_SECONDS=args.query_seconds)
            workers = [Worker(server, environ, home / f"worker-{n}.log") for n in range(count)]
            for worker in workers:
                worker.start()
            try:
                figures = fleet_run(server, args.wave_size, args.members_per_run)
            finally:
                for worker in workers:
                    worker.kill_all()
            own = member_seconds(home)
            cost = (figures["batch_run_s"] - own) / len(names)
            ratio = f", {figures['wall_s'] / loop_s:.2f}x the loop (target <= {TARGET_RATIO})" if loop_s else ""
            print(f"fleet, {count} worker(s): {figures['wall_s']:.1f} s{ratio}; {figures['batches']} batch runs; "
                  f"members' own time {own:.1f} s; batch runs' time beyond their members' {cost:.2f} s per member; "
                  f"parent run {figures['parent_run_s']:.0f} s, ~{figures['requests_per_min']:.0f} API requests/min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
