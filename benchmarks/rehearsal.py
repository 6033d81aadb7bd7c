"""What the rehearsal costs, on the sample schema at 0004 with generated cost records, in one run.

  1. `dbmigrate rehearse` (backup, restore into a scratch database, 0005 + 0006 there, drop) vs the
     same by hand: `pg_dump -Fc -f`, `CREATE DATABASE`, `pg_restore --single-transaction -d`,
     `alembic upgrade head` on the copy, `DROP DATABASE`
  2. `dbmigrate upgrade --rehearse --yes` vs `dbmigrate upgrade --backup --yes` on two identical
     databases (the same run without the rehearsal)

    python benchmarks/rehearsal.py [--rows 1000000]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import psycopg

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.backup_restore import timed  # noqa: E402
from dbmigrate import local, pgtools  # noqa: E402

BIN = Path(sys.executable).parent


def fill(url: str, rows: int) -> int:
    """Accounts, resources and ``rows`` cost records (in dollars: 0005 converts them to cents)."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("INSERT INTO accounts (id, name, provider, external_id) "
                     "SELECT g, 'account ' || g, 'aws', md5(g::text) FROM generate_series(1, 100) g")
        conn.execute("INSERT INTO cloud_resources (id, account_id, resource_type, region, name) "
                     "SELECT g, 1 + g % 100, 'ec2', 'eu-west-1', 'vm-' || g FROM generate_series(1, 10000) g")
        conn.execute("INSERT INTO cost_records (id, resource_id, usage_date, cost_usd) "
                     "SELECT g, 1 + g %% 10000, date '2026-01-01' + (g %% 300), round((random() * 100)::numeric, 2) "
                     "FROM generate_series(1, %s) g", (rows,))
        conn.execute("VACUUM ANALYZE")
        return int(conn.execute("SELECT pg_database_size(current_database())").fetchone()[0])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000, help="cost records (default 1000000)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="dbmigrate-bench-rehearsal-"))
    try:
        return measure(args.rows, work)
    finally:
        local.stop(work / "home")
        shutil.rmtree(work)


def measure(rows: int, work: Path) -> int:
    home = work / "home"
    target = local.target(home)
    base_url = target.sqlalchemy_url().replace("+psycopg", "")
    env = {**os.environ, **target.libpq_env(), "DBMIGRATE_HOME": str(home), "ALEMBIC_CONFIG": str(REPO / "alembic.ini"),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    cli = [sys.executable, "-m", "dbmigrate"]
    with psycopg.connect(base_url, autocommit=True) as conn:
        major = conn.info.server_version // 10000
        for name in ("bench_a", "bench_b", "bench_copy"):
            conn.execute(f"DROP DATABASE IF EXISTS {name}")
        conn.execute("CREATE DATABASE bench_a")
    url_of = {name: target.with_database(name).sqlalchemy_url().replace("+psycopg", "")
              for name in ("bench_a", "bench_b", "bench_copy")}
    pg_dump, pg_restore = pgtools.find("pg_dump", major), pgtools.find("pg_restore", major)

    timed([*cli, "upgrade", "-r", "0004", "--yes"], {**env, "DATABASE_URL": url_of["bench_a"]})
    size = fill(url_of["bench_a"], rows)
    with psycopg.connect(base_url, autocommit=True) as conn:
        conn.execute("CREATE DATABASE bench_b TEMPLATE bench_a")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"PostgreSQL {major}; sample schema at 0004, {rows} cost records, {size / 2**20:.0f} MiB", flush=True)

    a = {**env, "DATABASE_URL": url_of["bench_a"]}
    ours, result = timed([*cli, "rehearse", "--json"], a)
    rehearsal = json.loads(result.stdout)

    started = time.perf_counter()
    timed([str(pg_dump), "-Fc", "-f", str(work / "raw.dump"), "-d", "bench_a"], env)
    with psycopg.connect(base_url, autocommit=True) as conn:
        conn.execute("CREATE DATABASE bench_copy")
    raw_restore, _ = timed([str(pg_restore), "--single-transaction", "-d", "bench_copy", str(work / "raw.dump")], env)
    raw_upgrade, _ = timed([str(BIN / "alembic"), "-c", str(REPO / "alembic.ini"), "upgrade", "head"],
                           {**env, "DATABASE_URL": url_of["bench_copy"]}, cwd=REPO)
    with psycopg.connect(base_url, autocommit=True) as conn:
        conn.execute("DROP DATABASE bench_copy")
    by_hand = time.perf_counter() - started

    with_backup, _ = timed([*cli, "upgrade", "--backup", "--yes"], a)
    with_rehearsal, _ = timed([*cli, "upgrade", "--rehearse", "--yes"], {**env, "DATABASE_URL": url_of["bench_b"]})
    report = json.loads(sorted((home / "reports").glob("*.json"))[-1].read_text())
    on_copy = sum(s["duration_s"] for s in report["rehearsal"]["steps"])
    for_real = sum(m["duration_s"] for m in report["migrations_applied"])
    print(f"upgrade --rehearse: backup {report['backup']['duration_s']:.1f} s, restore "
          f"{report['rehearsal']['restore_s']:.1f} s, revisions on the copy {on_copy:.1f} s, for real {for_real:.1f} s")

    steps = ", ".join(f"{s['revision']} {s['duration_s']:.2f} s" for s in rehearsal["steps"])
    print(f"\nrehearsal: restore {rehearsal['restore_s']:.2f} s (by hand {raw_restore:.2f} s), "
          f"revisions {steps} (by hand, alembic upgrade head: {raw_upgrade:.2f} s)")
    print("\n| operation | dbmigrate | compared with | its time | ratio |\n|---|---|---|---|---|")
    print(f"| `dbmigrate rehearse` | {ours:.1f} s | pg_dump + createdb + pg_restore + alembic upgrade + dropdb "
          f"| {by_hand:.1f} s | {ours / by_hand:.2f}x |")
    print(f"| `upgrade --rehearse --yes` | {with_rehearsal:.1f} s | `upgrade --backup --yes` | {with_backup:.1f} s "
          f"| {with_rehearsal / with_backup:.2f}x |")
    with psycopg.connect(base_url, autocommit=True) as conn:
        for name in ("bench_a", "bench_b"):
            conn.execute(f"DROP DATABASE {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
