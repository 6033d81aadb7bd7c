"""Find PostgreSQL client programs (pg_dump, pg_restore) new enough for the server."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

from dbmigrate import local
from dbmigrate.errors import ConfigError


def _candidates(name: str) -> list[Path]:
    found: list[Path] = []
    if bin_dir := os.environ.get("PG_BIN_DIR"):
        found.append(Path(bin_dir) / name)
    if on_path := shutil.which(name):
        found.append(Path(on_path))
    found.extend(d / name for d in local.bin_dirs())
    return [p for p in dict.fromkeys(found) if p.is_file() and os.access(p, os.X_OK)]


def major_version(program: Path) -> int | None:
    try:
        out = subprocess.run([str(program), "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r"\(PostgreSQL\)\s+(\d+)", out)
    return int(match.group(1)) if match else None


def find(name: str, server_major: int) -> Path:
    """The first ``name`` (PG_BIN_DIR, PATH, embedded server) at least as new as the server."""
    seen = []
    for program in _candidates(name):
        major = major_version(program)
        if major is not None and major >= server_major:
            return program
        seen.append(f"{program} ({major or '?'})")
    looked = ", ".join(seen) or "nothing on PG_BIN_DIR, PATH or the embedded server"
    raise ConfigError(
        f"no {name} of PostgreSQL {server_major} or newer found (found: {looked}); "
        f"install the PostgreSQL {server_major} client or set PG_BIN_DIR"
    )
