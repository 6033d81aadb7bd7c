"""What dbmigrate adds to plain Alembic on a real chain: CKAN 2.12's 110 revisions, as shipped.

Whole-process wall time, and the CPU time of the process and its children, of

- ``dbmigrate upgrade --yes -r heads`` against ``alembic upgrade heads``, each on a fresh, empty
  database (the whole chain applied: 27 tables);
- ``dbmigrate status`` against ``alembic current``, on a database at head;

in one run, interleaved repetitions, medians, on the embedded PostgreSQL (a scratch home) unless
DATABASE_URL names a server whose role may CREATE DATABASE. The CKAN project is the stock
``alembic init`` env.py with CKAN's installed versions directory as its ``version_locations``,
as tests/test_drift.py runs it. Target (issue 17): each ratio at most 1.1. Under each upgrade, its lint's
share (the ``duration_s`` its report gives the lint: Alembic rendering every pending revision offline, then
squawk; it grows with the revisions linted, a fresh database's whole chain here) and the ratio without it.

    python benchmarks/alembic_overhead.py [--runs N] [--before DIR]

``--before DIR``: also time the dbmigrate whose source tree DIR holds (``git archive REF dbmigrate |
tar -x -C DIR``), in the same interleaved runs, as "(before)".
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

BIN = Path(sys.executable).parent
TARGET_RATIO = 1.1


def ckan_project(base: Path, url: str) -> Path:
    """``alembic init`` (the generic template) pointed at CKAN's installed revisions; plain Alembic reads the
    URL from the ini, as it would in a project that keeps it there (dbmigrate sets it in memory)."""
    import ckan.migration
    from alembic import command
    from alembic.config import Config

    ini = base / "alembic.ini"
    with contextlib.redirect_stdout(io.StringIO()):  # "Creating directory ..."
        command.init(Config(str(ini)), str(base / "migrations"), template="generic")
    versions = Path(ckan.migration.__file__).parent / "versions"
    text = ini.read_text().replace("[alembic]\n", f"[alembic]\nversion_locations = {versions}\n", 1)
    text = text.replace("sqlalchemy.url = driver://user:pass@localhost/dbname",
                        f"sqlalchemy.url = {url.replace('%', '%%')}")
    ini.write_text(text)
    return ini


def revision_count(ini: Path) -> int:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    return sum(1 for _ in ScriptDirectory.from_config(Config(str(ini))).walk_revisions())


def timed(command: list[str], env: dict, cwd: Path) -> tuple[float, float]:
    """Wall time and CPU time (user + system, the process and what it ran) of one command."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command[:3])} failed ({done.returncode}): {done.stderr[-2000:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


class Server:
    """Fresh databases on one server, through psycopg as its superuser (or the URL's role)."""

    def __init__(self, url):
        self.url = url

    def recreate(self, name: str) -> str:
        import psycopg
        from sqlalchemy.engine import make_url

        admin = self.url.set(drivername="postgresql", database="postgres").render_as_string(hide_password=False)
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{name}"')
        return make_url(self.url).set(database=name).render_as_string(hide_password=False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--before", type=Path, metavar="DIR", help="an older dbmigrate's source tree, timed too")
    args = parser.parse_args()
    from sqlalchemy.engine import make_url

    work = Path(tempfile.mkdtemp(prefix="dbmigrate-alembic-bench-"))
    home = work / "home"
    if os.environ.get("DATABASE_URL"):
        base_url, stop = make_url(os.environ["DATABASE_URL"]), None
    else:
        from dbmigrate import local

        base_url, stop = local.target(home).url, lambda: local.stop(home)
    server = Server(base_url)
    urls = {side: server.recreate(f"bench_ckan_{side}") for side in ("alembic", "dbmigrate", "before", "status")}
    projects = {side: ckan_project(work / side, url) for side, url in urls.items()}
    env = {**os.environ, "DBMIGRATE_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("DATABASE_URL", None)

    def upgrade_alembic() -> tuple[float, float]:
        server.recreate("bench_ckan_alembic")
        return timed([str(BIN / "alembic"), "-c", str(projects["alembic"]), "upgrade", "heads"], env, work)

    lint_s: dict[str, list[float]] = {}  # each upgrade's lint, from its report

    def upgrade_dbmigrate(side: str, source: dict) -> Callable[[], tuple[float, float]]:
        report = work / f"{side}-report.json"

        def run() -> tuple[float, float]:
            server.recreate(f"bench_ckan_{side}")
            measured = timed([str(BIN / "dbmigrate"), "upgrade", "--yes", "-r", "heads", "--alembic-config",
                              str(projects["dbmigrate"]), "--json-report", str(report)],
                             {**env, **source, "DATABASE_URL": urls[side]}, work)
            lint_s.setdefault(side, []).append((json.loads(report.read_text())["lint"] or {}).get("duration_s") or 0.0)
            return measured
        return run

    def status(source: dict) -> Callable[[], tuple[float, float]]:
        return lambda: timed([str(BIN / "dbmigrate"), "status", "--alembic-config", str(projects["status"])],
                             {**env, **source, "DATABASE_URL": urls["status"]}, work)

    timed([str(BIN / "alembic"), "-c", str(projects["status"]), "upgrade", "heads"], env, work)
    commands = {"alembic upgrade heads": upgrade_alembic, "dbmigrate upgrade": upgrade_dbmigrate("dbmigrate", {})}
    before = {"PYTHONPATH": str(args.before.resolve())} if args.before else None
    if before:
        commands["dbmigrate upgrade (before)"] = upgrade_dbmigrate("before", before)
    commands |= {"alembic current": lambda: timed([str(BIN / "alembic"), "-c", str(projects["status"]), "current"],
                                                  env, work),
                 "dbmigrate status": status({})}
    if before:
        commands["dbmigrate status (before)"] = status(before)
    baseline_of = {name: "alembic upgrade heads" if "upgrade" in name else "alembic current"
                   for name in commands if name.startswith("dbmigrate")}
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in commands}
    for run in commands.values():  # warm the page cache once
        run()
    load_before = os.getloadavg()
    for _ in range(args.runs):
        for name, run in commands.items():
            samples[name].append(run())
    load_after = os.getloadavg()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
          f"load average (1, 5, 15 min) before {load_before[0]:.1f} {load_before[1]:.1f} {load_before[2]:.1f}, "
          f"after {load_after[0]:.1f} {load_after[1]:.1f} {load_after[2]:.1f}")
    print(f"CKAN 2.12's chain ({revision_count(projects['alembic'])} revisions), {args.runs} runs each, interleaved; "
          "medians of whole processes (wall; CPU of the process and its children)")
    worst = worst_cpu = 0.0
    for name, pairs in samples.items():
        wall = statistics.median(p[0] for p in pairs)
        cpu = statistics.median(p[1] for p in pairs)
        line = f"  {name:28} wall {wall * 1000:6.0f} ms   cpu {cpu * 1000:6.0f} ms"
        if base := baseline_of.get(name):
            base_wall = statistics.median(p[0] for p in samples[base])
            base_cpu = statistics.median(p[1] for p in samples[base])
            ratio = wall / base_wall
            if "(before)" not in name:
                worst, worst_cpu = max(worst, ratio), max(worst_cpu, cpu / base_cpu)
            line += (f"   {ratio:4.2f}x {base} (+{(wall - base_wall) * 1000:.0f} ms wall), "
                     f"cpu {cpu / base_cpu:4.2f}x")
        print(line)
        if side := {"dbmigrate upgrade": "dbmigrate", "dbmigrate upgrade (before)": "before"}.get(name):
            lint = statistics.median(lint_s[side])
            base_wall = statistics.median(p[0] for p in samples["alembic upgrade heads"])
            print(f"  {'':28} of which the lint {lint * 1000:.0f} ms (its report's duration_s; 0: not recorded); "
                  f"without it {(wall - lint) / base_wall:4.2f}x (+{(wall - lint - base_wall) * 1000:.0f} ms)")
    print(f"target: at most {TARGET_RATIO}x (wall) -> {'met' if worst <= TARGET_RATIO else 'NOT met'}; "
          f"CPU: at most {worst_cpu:.2f}x")
    if max(load_before[0], load_after[0]) > (os.cpu_count() or 1):
        print("the load average exceeded the core count: wall times, and their ratios, measure the scheduler "
              "as much as the commands; the CPU ratios are the steadier figures")
    if stop:
        stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
