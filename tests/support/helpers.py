"""Plain helpers the tests share (the fixtures are in conftest.py): running dbmigrate as a
user would, reading what it left behind, and checking that no output carries the password."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psycopg

from dbmigrate import db, fingerprint
from dbmigrate.target import DatabaseTarget
from tests.support.pgcluster import CANARY_PASSWORD, PgCluster, environ_without_db

REPO = Path(__file__).resolve().parents[2]
SAMPLE_CONFIG = REPO / "alembic.ini"
SAMPLE_HEAD = "0006"


def documented_commands(page: str, heading: str) -> list[str]:
    """The commands of the first bash block under ``heading`` of ``page`` (a path from the repository's
    root: README.md, docs/OPERATORS.md), as written there, so a test runs what users are shown."""
    text = (REPO / page).read_text()
    section = text[text.index(f"\n{heading}\n"):]
    block = section[section.index("```bash\n") + len("```bash\n"):]
    return [line for line in block[:block.index("```")].splitlines() if line.strip()]


def assert_no_canary(text: str, where: str) -> None:
    for form in (CANARY_PASSWORD, quote(CANARY_PASSWORD, safe="")):
        assert form not in text, f"the password leaked into {where}"


def libpq_url(target: DatabaseTarget) -> str:
    """``target`` as the postgresql:// URL a user puts in DATABASE_URL (password included)."""
    return target.url.set(drivername="postgresql").render_as_string(hide_password=False)


# --- SQL -------------------------------------------------------------------------------

@contextmanager
def session(where: DatabaseTarget | str) -> Iterator[psycopg.Connection]:
    """An autocommit session on a target's database (or a postgresql:// URL), as its owner: for
    a test that keeps it open while dbmigrate runs (a lock held, a transaction left open)."""
    with psycopg.connect(where if isinstance(where, str) else libpq_url(where), autocommit=True) as conn:
        yield conn


def sql(where: DatabaseTarget | str, statement: str, *params: Any) -> list[tuple]:
    """Run ``statement`` (several, separated by ';', when there are no params) in a session of
    its own, committed; the rows it returned, if any. ``%s`` placeholders take ``params``."""
    with session(where) as conn:
        cursor = conn.execute(statement, params or None)
        return cursor.fetchall() if cursor.description else []


def scalar(where: DatabaseTarget | str, statement: str, *params: Any) -> Any:
    """The one value ``statement`` returns."""
    [(value,)] = sql(where, statement, *params)
    return value


def fill(target: DatabaseTarget, rows: int) -> None:
    """A table ``payload`` of random text, which compresses to about half, not to nothing."""
    sql(target, "CREATE TABLE payload (id bigint PRIMARY KEY, body text, doc jsonb)")
    sql(target, "INSERT INTO payload SELECT g, md5(random()::text) || md5(random()::text) || md5(random()::text), "
                "jsonb_build_object('n', random(), 'tag', md5(g::text)) FROM generate_series(1, %s) g", rows)


def wait_until(condition, timeout: float, what: str, interval: float = 0.3):
    """``condition()``'s first true value, asked every ``interval`` seconds for up to ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


# --- running dbmigrate -----------------------------------------------------------------

def stderr_lines(stderr: str) -> list[str]:
    """What a command printed to stderr, Alembic's own INFO lines aside."""
    return [line for line in stderr.splitlines() if not line.startswith("INFO  [alembic")]


def one_line_error(stderr: str) -> str:
    """The one line a failed command prints (Alembic's own INFO lines aside)."""
    lines = stderr_lines(stderr)
    assert len(lines) == 1 and lines[0].startswith("dbmigrate: error: "), stderr
    return lines[0]


def run_cli(home: Path, *args: str, env: dict | None = None, input: str | None = None,
            cwd: Path = REPO, stdout: int = subprocess.PIPE, process: bool = False) -> subprocess.CompletedProcess:
    """`dbmigrate ARGS` with ``home`` as DBMIGRATE_HOME, as a user would run it: no traceback, and
    no password in what it printed or in any report it wrote. In this process (`cli.main(argv)`,
    its file descriptors 0-2 redirected), unless ``process`` asks for `python -m dbmigrate` (a test
    about the process itself: signals, terminals, exit, import cost, inheritance) or the call needs
    one (``stdout`` a file descriptor, ``env`` naming another Prefect API). ``stdout``: a file
    descriptor to print to instead of a pipe the test reads (``result.stdout`` is then "")."""
    environ = {**environ_without_db(), "DBMIGRATE_HOME": str(home), **(env or {})}
    if process or stdout != subprocess.PIPE or not _prefect_settings_in_force(env or {}):
        result = subprocess.run(
            [sys.executable, "-m", "dbmigrate", *args],
            cwd=cwd, env=environ, input=input or "", stdout=stdout, stderr=subprocess.PIPE, text=True, timeout=240,
        )
        result.stdout = result.stdout or ""
    else:
        result = _run_in_process(list(args), environ, input or "", cwd)
    assert "Traceback" not in result.stderr, result.stderr
    assert_no_canary(result.stdout + result.stderr, f"the output of dbmigrate {' '.join(args[:1])}")
    for report in reports_in(home):
        assert_no_canary(report.read_text(), str(report))
    return result


def _prefect_settings_in_force(env: dict) -> bool:
    """Whether this process's Prefect settings are those ``env`` asks for: Prefect reads its settings
    once per process (the harness's context wins over the environment), so a call that names another
    API, or any other Prefect setting, runs as a process."""
    prefect_variables = {name for name in env if name.startswith("PREFECT_")}
    if not prefect_variables:
        return True
    if prefect_variables != {"PREFECT_API_URL"}:
        return False
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value() == env["PREFECT_API_URL"]


def _run_in_process(argv: list[str], environ: dict, input: str, cwd: Path) -> subprocess.CompletedProcess:
    """`dbmigrate.cli.main(argv)` as the process would run it: ``environ`` as os.environ, ``cwd``, ``input``
    on stdin, stdout and stderr captured at the file descriptors (a subprocess of env.py writes there
    too); and afterwards what main() changes for the rest of a process put back: the umask, signal
    handlers, logging (Alembic's fileConfig), sys.path, the environment, the working directory. As in a
    new process, boto3's default session (and the credentials it found) starts afresh."""
    import io
    import signal
    import tempfile

    from dbmigrate.cli import main

    saved_environ, saved_cwd, saved_path = dict(os.environ), os.getcwd(), list(sys.path)
    saved_umask = os.umask(0o022)
    os.umask(saved_umask)
    saved_signals = {number: signal.getsignal(number) for number in (signal.SIGTERM, signal.SIGINT)}
    saved_logging = _logging_state()
    saved_streams = sys.stdin, sys.stdout, sys.stderr
    if "boto3" in sys.modules:  # a process starts without boto3's default session, which caches credentials
        sys.modules["boto3"].DEFAULT_SESSION = None
    for stream in saved_streams[1:]:
        stream.flush()
    saved_fds = {fd: os.dup(fd) for fd in (0, 1, 2)}
    with tempfile.TemporaryFile("w+") as stdin, tempfile.TemporaryFile("w+") as out, \
            tempfile.TemporaryFile("w+") as err:
        stdin.write(input)
        stdin.flush()
        stdin.seek(0)
        for fd, file in ((0, stdin), (1, out), (2, err)):
            os.dup2(file.fileno(), fd)
        sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False))
        sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), line_buffering=True)
        sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), line_buffering=True)
        os.environ.clear()
        os.environ.update(environ)
        os.chdir(cwd)
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse: usage errors (2), --help (0)
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            sys.stdin, sys.stdout, sys.stderr = saved_streams
            for fd, saved in saved_fds.items():
                os.dup2(saved, fd)
                os.close(saved)
            os.chdir(saved_cwd)
            os.environ.clear()
            os.environ.update(saved_environ)
            sys.path[:] = saved_path
            os.umask(saved_umask)
            for number, handler in saved_signals.items():
                signal.signal(number, handler)
            _restore_logging(saved_logging)
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(["dbmigrate", *argv], code, out.read(), err.read())


def _logging_state() -> dict:
    import logging

    loggers = [logging.root, *(logger for logger in logging.root.manager.loggerDict.values()
                               if isinstance(logger, logging.Logger))]
    return {logger: (logger.level, list(logger.handlers), logger.disabled, logger.propagate) for logger in loggers}


def _restore_logging(state: dict) -> None:
    import logging

    for logger in [logging.root, *logging.root.manager.loggerDict.values()]:
        if not isinstance(logger, logging.Logger):
            continue
        level, handlers, disabled, propagate = state.get(logger, (logging.NOTSET, [], False, True))
        for handler in logger.handlers:
            if handler not in handlers:
                handler.close()
        logger.setLevel(level)
        logger.handlers[:] = handlers
        logger.disabled, logger.propagate = disabled, propagate


def assert_takes(pid: int, number: int) -> None:
    """The process ``pid`` neither blocks nor ignores signal ``number`` (it inherits both from
    whoever started it): a test about to play a terminal's Ctrl-C or a runner's signal checks first,
    so a child that cannot receive it fails here, saying so, not as a run that never reacted (as when
    the suite was started in a shell's background, before tests/conftest.py put SIGINT back)."""

    def masks(of: int | str) -> dict[str, int]:
        lines = Path(f"/proc/{of}/status").read_text().splitlines()
        return {k: int(v, 16) for k, _, v in (line.partition(":\t") for line in lines) if k in ("SigBlk", "SigIgn")}

    child, ours = masks(pid), masks("self")
    bit = 1 << (number - 1)
    assert not (child["SigBlk"] | child["SigIgn"]) & bit, \
        f"process {pid} cannot receive signal {number}: {child} (the test process: {ours}; one bit per signal)"


def start_cli(home: Path, *args: str, env: dict) -> subprocess.Popen:
    """`python -m dbmigrate ARGS` in the background, for tests that act while it runs."""
    return subprocess.Popen(
        [sys.executable, "-m", "dbmigrate", *args], cwd=REPO, text=True,
        env={**environ_without_db(), "DBMIGRATE_HOME": str(home), **env},
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )


def finish(proc: subprocess.Popen, timeout: float = 120) -> subprocess.CompletedProcess:
    """Wait for a `start_cli` process: no traceback, no password in what it printed."""
    out, err = proc.communicate(timeout=timeout)
    assert "Traceback" not in err, err
    assert_no_canary(out + err, "the output of dbmigrate")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def run_on_a_terminal(args: list[str], answers: dict[bytes, str], env: dict) -> tuple[int, str]:
    """dbmigrate on a real pseudo-terminal, answering each prompt once as it appears."""
    import pty

    pid, fd = pty.fork()
    if pid == 0:
        os.chdir(REPO)
        os.execve(sys.executable, [sys.executable, "-m", "dbmigrate", *args], env)
    output, pending = b"", dict(answers)
    while True:
        try:
            chunk = os.read(fd, 1024)
        except OSError:
            break
        if not chunk:
            break
        output += chunk
        for prompt in [p for p in pending if p in output]:
            os.write(fd, pending.pop(prompt).encode() + b"\n")
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), output.decode()


def recording_pg_dump(target: DatabaseTarget, directory: Path) -> tuple[Path, Path]:
    """A pass-through pg_dump in ``directory``/bin (for PG_BIN_DIR) that logs its argv, and
    whether it got a password through its environment, to the returned log file."""
    from dbmigrate import pgtools

    with db.connect(target) as conn:
        real = pgtools.find("pg_dump", db.server_version(conn)[0])
    shim_dir, log = directory / "bin", directory / "pg_dump.log"
    shim_dir.mkdir()
    (shim_dir / "pg_dump").write_text(
        "#!/bin/sh\n"
        f'printf "argv: %s\\n" "$*" >> {log}\n'
        f'[ -n "$PGPASSWORD" ] && echo "password: from environment" >> {log}\n'
        f'exec {real} "$@"\n'
    )
    (shim_dir / "pg_dump").chmod(0o755)
    return shim_dir, log


# --- what a run left behind ------------------------------------------------------------

def fingerprint_of(target: DatabaseTarget) -> fingerprint.Fingerprint:
    with db.connect(target) as conn:
        return fingerprint.take(conn)


def open_to_others(root: Path) -> list[str]:
    """Every file, directory and socket under ``root`` (itself excluded) whose group or others have
    any permission, as "path mode"; symlinks are not followed."""
    found = []
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(directory, name)
            mode = stat.S_IMODE(path.lstat().st_mode)
            if not path.is_symlink() and mode & 0o077:
                found.append(f"{path.relative_to(root)} {mode:o}")
    return found


def scratch_databases(server) -> list[str]:
    """The scratch databases dbmigrate made (db.SCRATCH_PREFIX) on ``server``: a PgCluster, or a
    DatabaseTarget on it."""
    where = server.target("postgres") if isinstance(server, PgCluster) else server
    return [name for (name,) in sql(where, "SELECT datname FROM pg_database WHERE starts_with(datname, %s)",
                                    db.SCRATCH_PREFIX)]


# A COPY that lasts: a restore or a replay of LONG_COPY_ROWS rows (fill) is still in IN_COPY (over
# pg_stat_activity) when a test acts.
LONG_COPY_ROWS = 300_000
IN_COPY = "state = 'active' AND query LIKE 'COPY %%FROM stdin%%'"


def backend(pg_cluster, database: str, condition: str) -> int | None:
    """A backend of ``database`` matching ``condition`` (SQL over pg_stat_activity), once there is one."""
    rows = sql(pg_cluster.target("postgres"), "SELECT pid FROM pg_stat_activity WHERE datname = %s "
               f"AND pid <> pg_backend_pid() AND {condition}", database)
    return rows[0][0] if rows else None


def sleeping_backend(pg_cluster, database: str) -> int | None:
    """The backend running a slow revision's pg_sleep, once it is running."""
    return backend(pg_cluster, database, "query LIKE '%%pg_sleep%%'")


def reports_in(home: Path) -> list[Path]:
    return sorted((home / "reports").glob("*.json"))


def last_report(home: Path) -> dict:
    return json.loads(reports_in(home)[-1].read_text())


_sample_templates: dict[tuple[int, str], str] = {}  # (cluster port, revision): its template database


def sample_at(pg_cluster, revision: str, database: str | None = None) -> str:
    """A database of ``pg_cluster`` with the sample project at ``revision`` (``database``: that one,
    dropped and made again), copied from a template database that `dbmigrate upgrade` brought to
    the revision once per session: a copy takes a fraction of a migration."""
    key = (pg_cluster.port, revision)
    if key not in _sample_templates:
        template = pg_cluster.create_database()
        home = pg_cluster.data_dir.parent / f"template-{revision}"
        home.mkdir()
        result = run_cli(home, "upgrade", "-r", revision, "--yes",
                         env={"DATABASE_URL": libpq_url(pg_cluster.target(template))})
        assert result.returncode == 0, result.stderr
        _sample_templates[key] = template
    if database:
        pg_cluster.drop_database(database)
    return pg_cluster.create_database(template=_sample_templates[key], name=database)


class Untouched:
    """A database at a revision, shared by a module's cases that must each leave it as it was:
    every ``refuse`` checks the exit code and the fingerprint, so no case can affect the next."""

    def __init__(self, target: DatabaseTarget, home: Path):
        self.target, self.home = target, home
        self.fingerprint, self.reports = fingerprint_of(target), reports_in(home)

    @classmethod
    @contextmanager
    def at(cls, revision: str, pg_cluster, home: Path) -> Iterator[Untouched]:
        """A new database of ``pg_cluster`` with the sample project at ``revision``, dropped afterwards."""
        target = pg_cluster.target(sample_at(pg_cluster, revision))
        try:
            yield cls(target, home)
        finally:
            pg_cluster.drop_database(target.database)

    @property
    def url(self) -> str:
        return libpq_url(self.target)

    def run(self, *args: str, url: str | None = None) -> subprocess.CompletedProcess:
        return run_cli(self.home, *args, env={"DATABASE_URL": url or self.url})

    def refuse(self, *args: str, url: str | None = None, code: int = 2) -> str:
        """Run ``args`` (against ``url`` if given): it must fail with ``code`` and change nothing. Its error line."""
        result = self.run(*args, url=url)
        assert result.returncode == code, (result.stdout, result.stderr)
        assert fingerprint_of(self.target) == self.fingerprint
        return one_line_error(result.stderr)


# --- Prefect blocks --------------------------------------------------------------------

def s3_bucket_block(endpoint: str, bucket: str, folder: str = "", client_config: dict | None = None):
    """A prefect-aws S3Bucket block for the moto endpoint (not saved to any API)."""
    from prefect_aws import AwsCredentials, S3Bucket
    from prefect_aws.client_parameters import AwsClientParameters

    credentials = AwsCredentials(
        aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1",
        aws_client_parameters=AwsClientParameters(endpoint_url=endpoint, config=client_config),
    )
    return S3Bucket(bucket_name=bucket, credentials=credentials, bucket_folder=folder)


def save_environment(target: DatabaseTarget, name: str, database_of: str | None = None, port: int | None = None,
                     **policy) -> str:
    """Save blocks for the environment ``name`` to the current Prefect API: credentials of the
    test's database and a quick policy. ``database_of`` saves the database under that block
    name instead, recorded as belonging to the environment ``database_of`` (no policy block
    then); ``port`` points the block at another port."""
    from blocks import DatabaseCredentials, EnvironmentPolicy

    DatabaseCredentials(
        host="127.0.0.1", port=port or target.port, database=target.database, username="postgres",
        password=CANARY_PASSWORD, sslmode="disable", connect_timeout=5,
        **({"environment": database_of} if database_of else {}),
    ).save(name, overwrite=True)
    if database_of:
        return name
    # A test whose approver never comes fails in two minutes, not the default hour.
    quick = {"retry_delay_s": 0.2, "approval_poll_s": 1, "approval_timeout_s": 120}
    EnvironmentPolicy(**{**quick, **policy}).save(name, overwrite=True)
    return name


# --- Locks held by "the application" ------------------------------------------------

class Holder:
    """A session of "the application" that holds ``mode`` on t1 in an open transaction, and lets
    go ``hold_s`` seconds after a migration of ours first waits for it (or when the test ends)."""

    def __init__(self, target, mode: str, hold_s: float):
        self.conn = psycopg.connect(libpq_url(target), application_name="the-holder")
        self.conn.execute(f"LOCK TABLE t1 IN {mode} MODE")
        self.pid = self.conn.info.backend_pid
        self.target, self.hold_s, self.released = target, hold_s, threading.Event()
        self.thread = threading.Thread(target=self._release_later, daemon=True)
        self.thread.start()

    def _release_later(self) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not scalar(
                self.target, "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'dbmigrate%%' "
                             "AND wait_event_type = 'Lock'"):
            time.sleep(0.02)
        self.released.wait(self.hold_s)
        self.release()

    def release(self) -> None:
        self.released.set()
        if not self.conn.closed:
            self.conn.rollback()
            self.conn.close()


@contextmanager
def held(target, mode: str = "ACCESS EXCLUSIVE", hold_s: float = 3600):
    holder = Holder(target, mode, hold_s)
    try:
        yield holder
    finally:
        holder.released.set()
        holder.thread.join()


@contextmanager
def application(target):
    """The application's own queries on t1, one after another, each timed: the longest wait is what it felt."""
    durations: list[float] = []
    stop = threading.Event()

    def loop() -> None:
        with psycopg.connect(libpq_url(target), autocommit=True, application_name="the-application") as conn:
            while not stop.is_set():
                started = time.monotonic()
                conn.execute("SELECT count(*) FROM t1").fetchone()
                durations.append(time.monotonic() - started)
                time.sleep(0.01)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield durations
    finally:
        stop.set()
        thread.join()
