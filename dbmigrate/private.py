"""Owner-only files: what dbmigrate writes holds data (dumps, manifests, reports) or secrets (the
embedded database's password and files, Prefect's database with the key that decrypts the blocks).

One mechanism: the entry points (the command line, every flow) set the umask, so everything the
process creates, and every process it starts (pg_dump, the Prefect server, the worker and its flow
runs), is its owner's alone. The home, which an older version made 0755, is tightened on start."""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

OWNER_ONLY_UMASK = 0o077


def owner_only() -> None:
    """From here on, what this process and its children create has no group or other bits."""
    os.umask(OWNER_ONLY_UMASK)


def private_home(home: Path, passable: bool = False) -> None:
    """The home, created or tightened to 0700; 0711 when another user (the embedded PostgreSQL's,
    when we run as root) must pass through it to its own directory: it still lists and reads nothing."""
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    home.chmod(stat.S_IRWXU | (stat.S_IXGRP | stat.S_IXOTH if passable else 0))


def generated_secret(path: Path) -> str:
    """The secret in ``path``, generated on first use into a file only its owner can read."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        path.chmod(0o600)
    else:
        with os.fdopen(fd, "w") as out:
            out.write(secrets.token_urlsafe(24) + "\n")
    return path.read_text().strip()
