"""Whole-process wall time of `dbmigrate fleet status --env development` over 100 tenants.

Starts the local stack on free ports under a fresh home with `dbmigrate local up --fleet N`
(the embedded PostgreSQL, N tenant databases per environment at revision 0004, a Prefect server
behind its auth string, the fleet blocks), then runs the command N times as an operator would:
a new process each time, Prefect's import, the fleet block and the credentials read from the API,
the members' query, every member's revision read (16 at once). Target (issue 17): at most 4 s
for 100 members. The stack is stopped and its home removed at the end (--keep keeps both).

    python benchmarks/fleet_status.py [--members 100] [--runs 5] [--jobs 16] [--keep] [--home DIR]

--home DIR reuses a stack kept by an earlier --keep (its `local up` then finds everything there).
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DBMIGRATE = [sys.executable, "-m", "dbmigrate"]
TARGET_S = 4.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run(args: list[str], env: dict) -> subprocess.CompletedProcess:
    done = subprocess.run(DBMIGRATE + args, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise SystemExit(f"dbmigrate {' '.join(args)} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    return done


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--members", type=int, default=100)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--jobs", type=int, default=16)
    parser.add_argument("--keep", action="store_true", help="leave the stack running and its home in place")
    parser.add_argument("--home", type=Path, help="the home of a stack an earlier --keep left running")
    args = parser.parse_args()
    home = args.home or Path(tempfile.mkdtemp(prefix="dbmigrate-fleet-bench-"))
    env = {**os.environ, "DBMIGRATE_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("DATABASE_URL", None)
    try:
        started = time.perf_counter()
        ports = [] if args.home else ["--pg-port", str(free_port()), "--prefect-port", str(free_port())]
        run(["local", "up", "--fleet", str(args.members), *ports], env)
        print(f"local up --fleet {args.members}: {time.perf_counter() - started:.1f} s (servers, "
              f"{3 * args.members} tenant databases, blocks, deployments, worker)")
        exports = run(["local", "env"], env).stdout
        api = exports.split("PREFECT_API_URL=", 1)[1].split()[0]
        client = {**env, "PREFECT_API_URL": api, "PREFECT_API_AUTH_STRING": (home / "prefect-auth").read_text().strip()}
        status = ["fleet", "status", "--env", "development", "--jobs", str(args.jobs)]
        run(status, client)  # warm the page cache once
        times, cpu, summary = [], [], ""
        for _ in range(args.runs):
            begun, used = time.perf_counter(), _children_cpu()
            summary = run(status, client).stdout.strip().splitlines()[-1]
            times.append(time.perf_counter() - begun)
            cpu.append(_children_cpu() - used)
        median = statistics.median(times)
        print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
              f"load average {os.getloadavg()[0]:.1f} at the end")
        print(f"fleet status, {args.members} members, {args.jobs} at once: median {median:.2f} s, "
              f"min {min(times):.2f} s, max {max(times):.2f} s over {args.runs} runs (whole process)")
        print(f"  its own CPU (user + system): median {statistics.median(cpu):.2f} s; on a loaded machine the wall "
              "time is mostly waiting for a core")
        print(f"  {summary}")
        print(f"target: at most {TARGET_S:g} s -> {'met' if median <= TARGET_S else 'NOT met'}")
    finally:
        if not args.keep:
            subprocess.run(DBMIGRATE + ["local", "down"], cwd=REPO, env=env, capture_output=True, timeout=300)
            shutil.rmtree(home, ignore_errors=True)
        else:
            print(f"stack left running under {home}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
