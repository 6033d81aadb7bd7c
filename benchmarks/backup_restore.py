"""dbmigrate backup/restore against the raw tools, on one generated database, in one run.

  1. `dbmigrate backup` to local storage   vs  `pg_dump -Fc --compress=C -f FILE`
  2. `dbmigrate backup --storage s3://B`   vs  `pg_dump -Fc | boto3 upload_fileobj` to the same endpoint (moto);
     also through a prefect-aws S3Bucket block (what the flows use), which adds `import prefect_aws`
  3. `dbmigrate restore --target-db`       vs  `pg_restore --single-transaction -d` of the same file
  4. `dbmigrate backup --jobs 2` / `restore --jobs 2` (directory format) vs `pg_dump -Fd -j 2`, and
     what they gain over the single-stream backup and restore
  5. peak memory (VmHWM) of the dbmigrate process, at size N and at size 2N

The data is random text, numbers and jsonb (about 2:1 under gzip), not pgbench's blank
filler, spread over four tables so that the parallel format has something to share out. Targets (issue 3): ratios at most 1.10, peak memory at most 200 MB and not
growing with the database.

    python benchmarks/backup_restore.py [--gigabytes 1.0]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psycopg

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # the checkout's dbmigrate, installed or not

from dbmigrate import local, pgtools  # noqa: E402
from dbmigrate.backup import compression_for  # noqa: E402

BIN = Path(sys.executable).parent
ROWS_PER_GB = 3_300_000  # about 1 GiB on disk per this many rows of the table below


def generate(url: str, gigabytes: float, tables: int = 4) -> int:
    rows = int(ROWS_PER_GB * gigabytes / tables)
    with psycopg.connect(url, autocommit=True) as conn:
        for n in range(tables):
            conn.execute(f"DROP TABLE IF EXISTS bench_events_{n}")
            conn.execute(f"CREATE TABLE bench_events_{n} (id bigint PRIMARY KEY, amount numeric(12,2), "
                         "body text, doc jsonb, created_at timestamptz)")
            batch = 500_000
            for start in range(1, rows + 1, batch):
                conn.execute(
                    f"INSERT INTO bench_events_{n} SELECT g, round((random() * 10000)::numeric, 2), "
                    "md5(random()::text) || md5(random()::text) || md5(random()::text) || md5(random()::text), "
                    "jsonb_build_object('account', md5(random()::text), 'region', (random() * 20)::int, "
                    "'score', random()), now() - random() * interval '365 days' "
                    "FROM generate_series(%s::bigint, %s::bigint) g",
                    (start, min(start + batch - 1, rows)),
                )
        conn.execute("VACUUM ANALYZE")
        return int(conn.execute("SELECT pg_database_size(current_database())").fetchone()[0])


def timed(command: list[str], env: dict, **kwargs) -> tuple[float, subprocess.CompletedProcess]:
    started = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True, **kwargs)
    if result.returncode != 0:
        raise SystemExit(f"failed: {' '.join(command[:4])}: {result.stderr.strip()[-500:]}")
    return time.perf_counter() - started, result


# The peak RSS of the process itself: VmHWM, not getrusage's ru_maxrss, which on Linux
# carries over the forking parent's high-water mark across exec (and our parent holds
# moto's in-memory bucket).
PEAK_RSS = "print('VMHWM_KB', [l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0], file=sys.stderr)\n"

# Runs the CLI in-process and prints its own peak RSS: the memory of dbmigrate itself,
# without pg_dump's (a separate process that both sides run alike).
MEASURED = (
    "import sys\n"
    "from dbmigrate.cli import main\n"
    "code = main(sys.argv[1:])\n" + PEAK_RSS + "raise SystemExit(code)\n"
)


def peak_rss(stderr: str) -> int:
    return int(stderr.rsplit("VMHWM_KB", 1)[1].split()[0]) * 1024


def dbmigrate(args: list[str], env: dict) -> tuple[float, int]:
    seconds, result = timed([sys.executable, "-c", MEASURED, *args], env)
    return seconds, peak_rss(result.stderr)


RAW_S3 = (
    "import subprocess, sys, boto3\n"
    "from boto3.s3.transfer import TransferConfig\n"
    "endpoint, bucket, key, pg_dump, compress = sys.argv[1:6]\n"
    "client = boto3.client('s3', endpoint_url=endpoint, region_name='us-east-1',\n"
    "                      aws_access_key_id='bench', aws_secret_access_key='bench')\n"
    "dump = subprocess.Popen([pg_dump, '-Fc', '--compress=' + compress], stdout=subprocess.PIPE)\n"
    "client.upload_fileobj(dump.stdout, bucket, key, Config=TransferConfig(multipart_chunksize=16 << 20))\n"
    "raise SystemExit(dump.wait())\n"
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gigabytes", type=float, default=1.0, help="size of the generated data (default 1)")
    args = parser.parse_args()

    from moto.server import ThreadedMotoServer

    from dbmigrate.local import free_port

    work = Path(tempfile.mkdtemp(prefix="dbmigrate-bench-"))
    home = work / "home"
    target = local.target(home)
    url = target.sqlalchemy_url().replace("+psycopg", "")
    port = free_port()
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    moto.start()
    endpoint = f"http://127.0.0.1:{port}"
    import boto3

    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                      aws_access_key_id="bench", aws_secret_access_key="bench")
    s3.create_bucket(Bucket="bench")

    env = {**os.environ, **target.libpq_env(), "DATABASE_URL": url, "DBMIGRATE_HOME": str(home),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    s3_env = {**env, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
              "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint}
    with psycopg.connect(url) as conn:
        major = conn.info.server_version // 10000
    pg_dump, pg_restore = pgtools.find("pg_dump", major), pgtools.find("pg_restore", major)
    compression = compression_for(pg_dump, pgtools.major_version(pg_dump) or major, "auto")

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"PostgreSQL {major}, compression {compression}")
    rows: list[tuple[str, float, float, str]] = []
    memory: list[tuple[float, int, int, int]] = []
    for scale in (args.gigabytes, 2 * args.gigabytes):
        size = generate(url, scale)
        label = f"{size / 2**30:.1f} GiB"
        print(f"\ndatabase: {size / 2**30:.2f} GiB on disk", flush=True)
        store, parallel_store = work / "store", work / "parallel"

        raw_local, _ = timed([str(pg_dump), "-Fc", f"--compress={compression}", "-f", str(work / "raw.dump")], env)
        ours_local, rss_local = dbmigrate(["backup", "--storage", str(store)], env)
        dump_size = (work / "raw.dump").stat().st_size
        print(f"  dump: {dump_size / 2**20:.0f} MiB ({size / dump_size:.1f}:1 against the database size)")

        key = f"raw-{uuid.uuid4().hex[:6]}.dump"
        raw_s3, _ = timed([sys.executable, "-c", RAW_S3, endpoint, "bench", key, str(pg_dump), compression], env)
        ours_s3, rss_s3 = dbmigrate(["backup", "--storage", "s3://bench/ours"], s3_env)
        block_s3, _ = dbmigrate_s3_block(endpoint, env)

        raw_dir, _ = timed([str(pg_dump), "-Fd", "-j", "2", f"--compress={compression}",
                            "-f", str(work / "raw.dir")], env)
        ours_dir, _ = dbmigrate(["backup", "--jobs", "2", "--storage", str(parallel_store)], env)

        backup_id, dir_id = newest_backup(store), newest_backup(parallel_store)
        raw_db, ours_db, dir_db = (f"{side}_{uuid.uuid4().hex[:6]}" for side in ("raw", "ours", "dir"))
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{raw_db}"')
        raw_restore, _ = timed([str(pg_restore), "--single-transaction", "-d", raw_db, str(work / "raw.dump")], env)
        ours_restore, rss_restore = dbmigrate(
            ["restore", backup_id, "--target-db", ours_db, "--storage", str(store)], env)
        dir_restore, _ = dbmigrate(
            ["restore", dir_id, "--target-db", dir_db, "--jobs", "2", "--storage", str(parallel_store)], env)
        with psycopg.connect(url, autocommit=True) as conn:
            for name in (raw_db, ours_db, dir_db):
                conn.execute(f'DROP DATABASE "{name}"')
        (work / "raw.dump").unlink()
        shutil.rmtree(work / "raw.dir")

        print(f"  backup local {ours_local:.1f}s vs {raw_local:.1f}s, S3 {ours_s3:.1f}s vs {raw_s3:.1f}s "
              f"(block {block_s3:.1f}s), restore {ours_restore:.1f}s vs {raw_restore:.1f}s, "
              f"-j 2: backup {ours_dir:.1f}s, restore {dir_restore:.1f}s", flush=True)
        rows += [(f"backup to local disk ({label})", ours_local, raw_local, "`pg_dump -Fc -f`"),
                 (f"backup to S3, `--storage s3://` ({label})", ours_s3, raw_s3, "`pg_dump -Fc | upload_fileobj`"),
                 (f"backup to S3 through an S3Bucket block ({label})", block_s3, raw_s3,
                  "`pg_dump -Fc | upload_fileobj`"),
                 (f"restore ({label})", ours_restore, raw_restore, "`pg_restore --single-transaction -d`"),
                 (f"backup `--jobs 2` ({label})", ours_dir, raw_dir, "`pg_dump -Fd -j 2`"),
                 (f"backup `--jobs 2` ({label})", ours_dir, ours_local, "dbmigrate backup (one stream)"),
                 (f"restore `--jobs 2` ({label})", dir_restore, ours_restore, "dbmigrate restore (one stream)")]
        memory.append((size, rss_local, rss_s3, rss_restore))

    print("\n| operation | dbmigrate | compared with | its time | ratio |\n|---|---|---|---|---|")
    for name, ours, raw, against in rows:
        print(f"| {name} | {ours:.1f} s | {against} | {raw:.1f} s | {ours / raw:.2f}x |")
    print("\n| database | peak memory (VmHWM): backup to disk | backup to S3 | restore |\n|---|---|---|---|")
    for size, *peaks in memory:
        print(f"| {size / 2**30:.2f} GiB | " + " | ".join(f"{p / 2**20:.0f} MiB" for p in peaks) + " |")
    moto.stop()
    local.stop(home)
    shutil.rmtree(work)
    return 0


def newest_backup(store: Path) -> str:
    return sorted(store.rglob("*.json"))[-1].name.removesuffix(".json")


def dbmigrate_s3_block(endpoint: str, env: dict) -> tuple[float, int]:
    """A backup to S3 through a prefect-aws S3Bucket block built in-process (no Prefect API
    needed), as the flows take it: the same streaming code plus `import prefect_aws`."""
    script = (
        "import os\n"
        "from prefect_aws import AwsCredentials, S3Bucket\n"
        "from prefect_aws.client_parameters import AwsClientParameters\n"
        "from dbmigrate import backup, target\n"
        "from dbmigrate.storage import S3Storage\n"
        "credentials = AwsCredentials(aws_access_key_id='bench', aws_secret_access_key='bench', "
        f"region_name='us-east-1', aws_client_parameters=AwsClientParameters(endpoint_url={endpoint!r}))\n"
        "block = S3Bucket(bucket_name='bench', credentials=credentials, bucket_folder='block')\n"
        "storage = S3Storage.from_block(block)\n"
        "t = target.parse_url(os.environ['DATABASE_URL'], 'bench')\n"
        "backup.take(t, storage)\n" + PEAK_RSS
    )
    seconds, result = timed([sys.executable, "-c", script], env, cwd=REPO)
    return seconds, peak_rss(result.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
