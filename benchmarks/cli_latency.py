"""Whole-process wall time of `dbmigrate status|health` against `alembic current`.

Runs each command N times, interleaved, on the same database (the embedded local
PostgreSQL at the sample schema's head unless DATABASE_URL is set) and prints the
medians and the ratios. Target (issue 2): each ratio at most 1.5.

    python benchmarks/cli_latency.py [--runs N]
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
BIN = Path(sys.executable).parent
TARGET_RATIO = 1.5


def database_url(home: Path) -> str:
    if url := os.environ.get("DATABASE_URL"):
        return url
    from dbmigrate import local

    url = local.target(home).sqlalchemy_url()
    subprocess.run([str(BIN / "alembic"), "upgrade", "head"], cwd=REPO, env={**os.environ, "DATABASE_URL": url},
                   check=True, capture_output=True)
    return url


def wall_time(command: list[str], env: dict) -> float:
    started = time.perf_counter()
    subprocess.run(command, cwd=REPO, env=env, check=True, capture_output=True)
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="dbmigrate-bench-"))
    url = database_url(home)
    env = {**os.environ, "DATABASE_URL": url, "DBMIGRATE_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    commands = {
        "alembic current": [str(BIN / "alembic"), "current"],
        "dbmigrate status": [str(BIN / "dbmigrate"), "status", "--url", url],
        "dbmigrate health": [str(BIN / "dbmigrate"), "health", "--url", url],
    }
    times: dict[str, list[float]] = {name: [] for name in commands}
    for name, command in commands.items():  # warm the page cache once
        wall_time(command, env)
    for _ in range(args.runs):
        for name, command in commands.items():
            times[name].append(wall_time(command, env))
    baseline = statistics.median(times["alembic current"])
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    print(f"runs: {args.runs} each, interleaved; median wall time per process")
    worst = 0.0
    for name, samples in times.items():
        median = statistics.median(samples)
        ratio = median / baseline
        worst = max(worst, ratio)
        print(f"  {name:18} {median * 1000:7.0f} ms   {ratio:4.2f}x alembic current")
    print(f"target: at most {TARGET_RATIO}x -> {'met' if worst <= TARGET_RATIO else 'NOT met'}")
    if "DATABASE_URL" not in os.environ:
        from dbmigrate import local

        local.stop(home)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
