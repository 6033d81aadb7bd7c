"""prefect.yaml's pull step for a worker that runs the flows from a checkout of this repository
on its own disk (the local stack, a worker beside the checkout).

Prefect's own ``set_working_directory`` takes an unset variable for an empty path: it "completes
successfully" in the run's temporary directory and the run then crashes on a
``…/flows/migrate.py`` it cannot find. This step checks the directory first, and a missing or
wrong one ends the run Failed with a message naming the variable.
"""

from __future__ import annotations

import logging
import os
from datetime import UTC, datetime
from pathlib import Path

import yaml

from dbmigrate.errors import ConfigError

CHECKOUT_VARIABLE = "DBMIGRATE_CHECKOUT"
PROJECT = "dbmigrate"  # prefect.yaml's `name`


def set_checkout_directory(variable: str = CHECKOUT_VARIABLE) -> dict[str, str]:
    """Change to the checkout the worker's environment variable ``variable`` names."""
    try:
        directory = checkout(variable)
    except ConfigError as exc:
        _end_run_failed(str(exc))
        raise
    os.chdir(directory)
    return {"directory": str(directory)}


def checkout(variable: str = CHECKOUT_VARIABLE) -> Path:
    """The directory ``variable`` names, once it is known to hold this project's flows."""
    value = os.environ.get(variable, "").strip()
    if not value:
        raise ConfigError(f"{variable} is not set in the worker's environment: set it to the absolute path of "
                          f"the checkout of {PROJECT} the flows run from (see docs/PREFECT.md#deploying)")
    directory = Path(value).expanduser()
    if not directory.is_absolute():
        raise ConfigError(f"{variable}={value} is not an absolute path: set it to the absolute path of "
                          f"the checkout of {PROJECT} the flows run from")
    if not directory.is_dir():
        raise ConfigError(f"{variable}={value}: no such directory on this worker")
    if problem := _not_this_project(directory):
        raise ConfigError(f"{variable}={value} is not a checkout of {PROJECT}: {problem}")
    return directory


def _not_this_project(directory: Path) -> str | None:
    """Why ``directory`` cannot run this project's deployments, if it cannot: its prefect.yaml
    must be this project's, and every entrypoint it names must be there."""
    try:
        config = yaml.safe_load((directory / "prefect.yaml").read_text())
    except (OSError, UnicodeError, yaml.YAMLError):
        return "no readable prefect.yaml there"
    if not isinstance(config, dict) or config.get("name") != PROJECT:
        return f"its prefect.yaml is not {PROJECT}'s"
    files = {d["entrypoint"].split(":")[0] for d in config.get("deployments") or [] if "entrypoint" in d}
    missing = sorted(f for f in files if not (directory / f).is_file())
    return f"{', '.join(missing)} missing" if missing else None


def _end_run_failed(message: str) -> None:
    """End the flow run Failed with ``message``, and log it in the run's log: the UI and the API
    show both, where the worker would report only that the process exited with status 1 (the
    step's traceback goes to the worker's own output, not to the run's log)."""
    from prefect import runtime
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import LogCreate
    from prefect.states import Failed

    if not (run_id := runtime.flow_run.id):
        return
    with get_client(sync_client=True) as client:
        client.create_logs([LogCreate(name="prefect.flow_runs", level=logging.ERROR, message=message,
                                      timestamp=datetime.now(UTC), flow_run_id=run_id)])
        client.set_flow_run_state(run_id, Failed(message=message))
