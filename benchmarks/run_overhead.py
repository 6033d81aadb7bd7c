"""The fixed cost of one deployment run on the local stack: a no-op `db-migrate/development` (the
database already at head) against an empty flow deployed to the same work pool with the same
pull step, on the same worker; and the empty flow on a pool as Prefect creates one (no command: a
workspace supervisor process starts the engine) on a worker of its own; interleaved, medians.

Each run's states, as the Prefect server recorded them, split its time from creation to its final
state into: pick-up (created -> Pending: the worker's polling), start (Pending -> Running: the
worker starts `python -m prefect.engine`, which imports Prefect, runs the pull step and imports
the flow's module), and the flow itself (Running -> final: its API calls, tasks and artifacts, and
the work). The local stack starts under a scratch home on free ports and stops at the end.

    python benchmarks/run_overhead.py [--runs N]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
TARGET_S = 4.0
DEFAULT_POOL = "supervised"  # (a name starting with "prefect" is reserved)
FINAL = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")


def deploy_empty_flow(client, pool: str, name: str = "empty") -> str:
    flow_id = client.create_flow_from_name("benchmark-empty")
    client.create_deployment(flow_id, name, work_pool_name=pool, work_queue_name="default",
                             entrypoint="benchmarks/empty_flow.py:empty",
                             pull_steps=[{"flows.pull.set_checkout_directory": {"variable": "DBMIGRATE_CHECKOUT"}}])
    return f"benchmark-empty/{name}"


def prefects_default_pool(client, home: Path, api: str) -> subprocess.Popen:
    """A second pool as Prefect creates one (no command: each run starts a workspace supervisor,
    which starts the engine), the empty flow deployed to it, and a worker of it like the stack's."""
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.workers.process import ProcessWorker

    from stack import provision

    client.create_work_pool(WorkPoolCreate(name=DEFAULT_POOL, type="process",
                                           base_job_template=ProcessWorker.get_default_base_job_template()))
    deploy_empty_flow(client, DEFAULT_POOL, "empty-supervised")
    return subprocess.Popen([str(Path(sys.executable).parent / "prefect"), "worker", "start", "--pool", DEFAULT_POOL],
                            env=provision.worker_environ(home, REPO, api), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def one_run(client, deployment: str) -> dict[str, float]:
    """Create a run of ``deployment``, wait for its end; the seconds of each part."""
    from uuid import UUID

    found = client.read_deployment_by_name(deployment)
    run = client.create_flow_run_from_deployment(found.id)
    while True:
        time.sleep(0.1)
        state = client.read_flow_run(run.id).state
        if state is not None and state.type.value in FINAL:
            break
    states = sorted(client.read_flow_run_states(UUID(str(run.id))), key=lambda s: s.timestamp)
    at = {}
    for state in states:
        at.setdefault(state.type.value, state.timestamp)
    if state.type.value != "COMPLETED":
        raise SystemExit(f"{deployment}: run {run.id} ended {state.type.value}: {state.message}")
    created = run.created
    return {"pick-up": (at["PENDING"] - created).total_seconds(),
            "start": (at["RUNNING"] - at["PENDING"]).total_seconds(),
            "flow": (at["COMPLETED"] - at["RUNNING"]).total_seconds(),
            "created -> final": (at["COMPLETED"] - created).total_seconds()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    from dbmigrate import local
    from stack import processes, provision

    home = Path(tempfile.mkdtemp(prefix="dbmigrate-run-bench-"))
    prefect_port = local.free_port()
    # This process's Prefect client reads its settings once, at its first import (stack.up's): set them first.
    os.environ.update(processes.client_environ(home, f"http://{local.HOST}:{prefect_port}/api"))
    provision.up(home, REPO, local.free_port(), prefect_port, say=lambda line: None)
    try:
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            supervised = prefects_default_pool(client, home, os.environ["PREFECT_API_URL"])
            deployments = {"empty flow": deploy_empty_flow(client, processes.POOL),
                           "empty, supervisor": "benchmark-empty/empty-supervised",
                           "db-migrate (no-op)": "db-migrate/development"}
            for deployment in deployments.values():  # the first db-migrate run migrates; then none has work
                one_run(client, deployment)
            samples: dict[str, list[dict[str, float]]] = {name: [] for name in deployments}
            load_before = os.getloadavg()
            for _ in range(args.runs):
                for name, deployment in deployments.items():
                    samples[name].append(one_run(client, deployment))
            load_after = os.getloadavg()
    finally:
        if "supervised" in locals():
            supervised.kill()
        processes.down(home, say=lambda line: None)
    query = os.environ.get("PREFECT_WORKER_QUERY_SECONDS", "the stack's default")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; load average "
          f"(1, 5, 15 min) before {' '.join(f'{x:.1f}' for x in load_before)}, "
          f"after {' '.join(f'{x:.1f}' for x in load_after)}; worker query seconds: {query}")
    print(f"{args.runs} runs each, interleaved; medians in seconds, from the server's state timestamps")
    parts = ("pick-up", "start", "flow", "created -> final")
    print(f"  {'':20}" + "".join(f"{part:>18}" for part in parts))
    medians = {name: {part: statistics.median(s[part] for s in runs) for part in parts}
               for name, runs in samples.items()}
    for name, median in medians.items():
        print(f"  {name:20}" + "".join(f"{median[part]:18.2f}" for part in parts))
    total, floor = medians["db-migrate (no-op)"]["created -> final"], medians["empty flow"]["created -> final"]
    print(f"Prefect's default start (a workspace supervisor, then the engine) / the stack's pool (the engine "
          f"directly): {medians['empty, supervisor']['created -> final'] / floor:.2f}x")
    print(f"db-migrate no-op / empty flow: {total / floor:.2f}x; the flow's own part: "
          f"{medians['db-migrate (no-op)']['flow'] - medians['empty flow']['flow']:.2f} s more")
    print(f"target: a no-op run's creation -> final state at most {TARGET_S:g} s (quiet machine) -> "
          f"{'met' if total <= TARGET_S else 'NOT met'} here")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
