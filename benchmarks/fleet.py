"""A fleet of tenant databases migrated by db-migrate-fleet against a shell loop of
`dbmigrate upgrade --backup` over the same databases (issue 17's naive alternative).

The stack is the project's own (``stack.provision.up``, what ``dbmigrate local up --fleet N`` runs), under
a fresh home on free ports: the embedded PostgreSQL with N tenant databases per environment
(stack.tenants: copies of one database at the sample schema's 0004 with some rows), a real
`prefect server start`, the blocks (the development fleet selects tenant_001...), prefect.yaml's
deployments. Its own worker is stopped; each fleet run gets --workers process workers of the pool
(`--limit 4`, started as the stack starts its worker: ``stack.provision.start_worker``) and as many
lanes unless --lanes says otherwise. The loop
runs first, before the Prefect server starts; each run migrates the tenants to the head (0005
converts the rows, 0006), and they are dropped and copied afresh from the template before the next.
The fleet: the development policy (automatic rollback; backups on), canary 1, waves of --wave-size,
C = 8, H = 8 (one server). Target on this 2-core machine: the fleet with two workers at most 0.5x the loop.

    python benchmarks/fleet.py [--tenants 100] [--workers 1,2,3] [--wave-size 25] [--lanes 0]
                               [--query-seconds 2] [--skip-loop] [--keep]

Printed: the loop's wall time and per member; per worker count, the fleet's wall time (its run's
creation to its final state), the ratio to the loop, the members' own time (the pipeline's, summed
from their reports), the lanes (db-migrate-fleet-batch runs) and the orchestration cost per member (the
lanes' time beyond their members', per member), the parent run's time, and its API requests per minute
(its polls: two requests each, plus three per lane started, one per lane and wave, and two per wave; the
poll count from its own log line), and how many of the Prefect server's writes SQLite refused
meanwhile ("database is locked", in the server's log): each is a 503 after which Prefect's client
waits 2 s, then 4, 8, 16 and 32 should the same request be refused again.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from sqlalchemy import URL  # noqa: E402

from dbmigrate import db, local  # noqa: E402
from dbmigrate.target import DatabaseTarget  # noqa: E402
from stack import processes, provision, tenants  # noqa: E402

BIN = Path(sys.executable).parent
ENVIRONMENT = tenants.DEMO_ENVIRONMENT  # whose tenants are tenant_001...: the development fleet
WORKER_LIMIT = 4  # each worker's --limit (flow runs at once)
TARGET_RATIO = 0.5


def fresh_tenants(pg: local.LocalServer, count: int) -> list[str]:
    """The development fleet's ``count`` tenants, dropped and copied afresh from stack.tenants' template."""
    names = tenants.tenant_names(ENVIRONMENT, count)
    with db.connect(DatabaseTarget(pg.url("postgres"), "local"), isolation_level="AUTOCOMMIT") as conn:
        for name in names:
            db.execute_literal(conn, f"DROP DATABASE IF EXISTS {db.identifier(name)} WITH (FORCE)")
    tenants.ensure_tenants(pg, REPO, (ENVIRONMENT,), count)
    return names


def tcp_url(home: Path, pg: local.LocalServer, name: str) -> str:
    """The tenant over loopback TCP with the password, as the fleet's blocks reach it."""
    return URL.create("postgresql", username=local.USER, password=local.password(home), host=local.HOST,
                      port=pg.port, database=name, query={"sslmode": "disable"}).render_as_string(hide_password=False)


def shell_loop(home: Path, pg: local.LocalServer, names: list[str], loop_home: Path) -> float:
    """for db in ...; do DATABASE_URL=... dbmigrate upgrade --backup --yes; done"""
    started = time.perf_counter()
    for name in names:
        subprocess.run([str(BIN / "dbmigrate"), "upgrade", "--backup", "--yes"], cwd=REPO, check=True,
                       capture_output=True, env={**os.environ, "DATABASE_URL": tcp_url(home, pg, name),
                                                 "DBMIGRATE_HOME": str(loop_home)})
    return time.perf_counter() - started


def fleet_run(wave_size: int, lanes: int, members: int) -> dict:
    """One db-migrate-fleet/development run to its end: its figures."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags, LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import LogSort

    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("db-migrate-fleet/development")
        run = client.create_flow_run_from_deployment(deployment.id, parameters={
            "environment": ENVIRONMENT, "wave_size": wave_size, "max_in_flight": 8, "per_server": 8,
            "lanes": lanes})
        deadline = time.monotonic() + 3600
        while not (run := client.read_flow_run(run.id)).state.is_final():
            if time.monotonic() > deadline:
                raise SystemExit(f"the fleet run {run.id} is not over after an hour: {run.state.name}")
            time.sleep(1)
        assert run.state.is_completed(), f"{run.state.name}: {run.state.message}"
        wall = (run.state.timestamp - run.created).total_seconds()
        lane_runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            tags=FlowRunFilterTags(all_=[f"fleet-run:{run.id}"])))
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])), limit=20,
                                sort=LogSort.TIMESTAMP_DESC)
    polls = next((int(m.group(1)) for log in logs if (m := re.search(r"(\d+) polls of the lanes", log.message))),
                 0)
    waves = 1 + -(-(members - 1) // wave_size)  # the canary's, then the rest's
    requests = 2 * polls + 3 * len(lane_runs) + (len(lane_runs) + 2) * waves
    parent_s = run.total_run_time.total_seconds()
    lanes_s = sum(lane.total_run_time.total_seconds() for lane in lane_runs)
    return {"wall_s": wall, "lanes": len(lane_runs), "parent_run_s": parent_s, "lanes_run_s": lanes_s,
            "requests_per_min": requests / (parent_s / 60) if parent_s else 0.0}


def sqlite_refusals(server_log: Path, offset: int) -> int:
    """The Prefect server's writes that failed "database is locked" since ``offset`` (the ones its log
    shows: a worker's heartbeat, a service's write). A transaction that read before another write
    committed fails at once (SQLITE_BUSY_SNAPSHOT, PrefectHQ/prefect#8950); it does not wait."""
    with open(server_log, "rb") as log:
        log.seek(offset)
        return sum(line.startswith(b"sqlalchemy.exc.OperationalError: (sqlite3.OperationalError) database is locked")
                   for line in log)


def reports(home: Path) -> set[Path]:
    """The single-database reports the lanes wrote (the workers' DBMIGRATE_HOME is the stack's)."""
    return set((home / "reports").glob("2*.json"))


def member_seconds(paths: set[Path]) -> float:
    """The members' own pipeline time, from their reports."""
    return sum(json.loads(path.read_text()).get("duration_s") or 0.0 for path in paths)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tenants", type=int, default=100)
    parser.add_argument("--workers", default="1,2,3", help="worker counts to run the fleet with, e.g. 2 or 1,2,3")
    parser.add_argument("--wave-size", type=int, default=25)
    parser.add_argument("--query-seconds", default="2", help="the workers' PREFECT_WORKER_QUERY_SECONDS (Prefect: 10)")
    parser.add_argument("--lanes", type=int, default=0,
                        help="the fleet's lanes (default: one per worker started for the run; the fleet's own default, "
                             "one per worker heard from within 45 s, would count those of the run before)")
    parser.add_argument("--skip-loop", action="store_true")
    parser.add_argument("--keep", action="store_true", help="leave the stack running and its home in place")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="dbmigrate-bench-fleet-"))
    home = base / "stack"
    os.environ.pop("DATABASE_URL", None)
    os.environ["PREFECT_WORKER_QUERY_SECONDS"] = args.query_seconds  # the workers' environment starts from ours
    print(f"# {platform.node()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}; {args.tenants} tenants, "
          f"waves of {args.wave_size}, C=8, H=8, {args.lanes or 'one per worker started'} lanes, "
          f"worker query interval {args.query_seconds} s")
    pg_port, prefect_port = local.free_port(), local.free_port()
    with ExitStack() as stack, open(base / "local-up.log", "w") as up_log:
        if args.keep:
            stack.callback(print, f"stack left running under {home} (stop it: DBMIGRATE_HOME={home} dbmigrate local down)")
        else:
            stack.callback(processes.down, home, lambda line: None)
        loop_s = None
        if not args.skip_loop:
            pg = local.start(home, pg_port)
            names = fresh_tenants(pg, args.tenants)
            loop_s = shell_loop(home, pg, names, base / "loop-home")
            print(f"shell loop of dbmigrate upgrade --backup: {loop_s:.1f} s ({loop_s / len(names):.2f} s per member)")
        api = provision.up(home, REPO, pg_port, prefect_port, say=lambda line: print(line, file=up_log, flush=True),
                           fleet=args.tenants)
        processes.worker(home).stop()  # the fleet runs get --workers workers of their own, each with --limit
        pg = local.running(home)
        from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

        client = processes.client_environ(home, api)
        stack.enter_context(temporary_settings(updates={PREFECT_API_URL: api,
                                                        PREFECT_API_AUTH_STRING: client["PREFECT_API_AUTH_STRING"]}))
        for count in (int(n) for n in args.workers.split(",")):
            names = fresh_tenants(pg, args.tenants)
            before = reports(home)
            workers = [processes.Detached(f"bench-worker-{count}-{n}", processes.prefect_home(home))
                       for n in range(1, count + 1)]
            server_log = processes.prefect_home(home) / "server.log"
            logged = server_log.stat().st_size
            try:
                for part in workers:
                    provision.start_worker(part, home, REPO, api, name=part.name, limit=WORKER_LIMIT)
                figures = fleet_run(args.wave_size, args.lanes or count, len(names))
            finally:
                for part in workers:
                    part.stop(timeout=10)
            own = member_seconds(reports(home) - before)
            cost = (figures["lanes_run_s"] - own) / len(names)
            ratio = f", {figures['wall_s'] / loop_s:.2f}x the loop (target <= {TARGET_RATIO})" if loop_s else ""
            print(f"fleet, {count} worker(s): {figures['wall_s']:.1f} s{ratio}; {figures['lanes']} lanes; "
                  f"members' own time {own:.1f} s; lanes' time beyond their members' {cost:.2f} s per member; "
                  f"parent run {figures['parent_run_s']:.0f} s, ~{figures['requests_per_min']:.0f} API requests/min; "
                  f"Prefect server writes refused by SQLite (logged): "
                  f"{sqlite_refusals(server_log, logged)}")
    if not args.keep:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
