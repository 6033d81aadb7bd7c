"""`dbmigrate run`: a run of the db-migrate deployment started from a terminal and followed there.

Prefect 3.8's `prefect deployment run --watch` prints the run's events and, at the end, only
`Flow run finished in state 'Failed'.`; Ctrl-C leaves the run going. This prints what an
operator needs instead: each state the run enters with its message (a failed run's is the
one-line reason, a paused run's says what it waits for), the link to approve it in the UI while
it waits, and on Ctrl-C (or SIGTERM) it cancels the run it started and waits for it to end (the
flow's cancellation hook says where the database is)."""

from __future__ import annotations

import getpass
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from uuid import UUID

from dbmigrate.errors import ConfigError
from dbmigrate.phases import Phase

POLL_S = 1.0
CANCEL_WAIT_S = 90.0  # for the worker to stop the run and its hook to say where the database is

Say = Callable[[str], None]


def start(environment: str, revision: str, dry_run: bool):
    """The flow run of db-migrate/<environment>, requested by this terminal's user."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound, PrefectHTTPStatusError

    from blocks import require_api

    api = require_api()
    name = f"db-migrate/{environment}"
    with get_client(sync_client=True) as client:
        try:
            deployment = client.read_deployment_by_name(name)
        except ObjectNotFound:
            raise ConfigError(f"no deployment {name} on {api}: `prefect deploy --all` from the checkout") from None
        parameters = {"target_revision": revision, "dry_run": dry_run,
                      "requested_by": f"{getpass.getuser()} (dbmigrate run)"}
        try:
            return client.create_flow_run_from_deployment(deployment.id, parameters=parameters, tags=["terminal"])
        except PrefectHTTPStatusError as exc:  # the server checks the parameters against the flow's
            raise ConfigError(f"Prefect refused the run: {exc.response.json().get('detail', exc)}") from None


def link(run) -> str:
    from prefect.utilities.urls import url_for

    return url_for(run) or f"flow run {run.id} (no UI address known: set PREFECT_UI_URL)"


def follow(run_id: UUID, say: Say, poll_s: float = POLL_S, timeout_s: float | None = None,
           interrupted: list[int] | None = None):
    """Print each state the run enters, with its message, until it ends (or ``timeout_s``
    passed, or a signal is in ``interrupted``); while it waits for approval, where to give it.
    The run as last read."""
    from prefect.client.orchestration import get_client

    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    seen = None
    while not interrupted:
        with get_client(sync_client=True) as client:
            run = client.read_flow_run(run_id)
        if (run.state.name, run.state.message) != seen:
            seen = (run.state.name, run.state.message)
            say(run.state.name + (f": {run.state.message}" if run.state.message else ""))
            if run.state.is_paused():
                say(f"approve or reject it at {link(run)}")
        if run.state.is_final() or (deadline is not None and time.monotonic() >= deadline):
            return run
        time.sleep(poll_s)
    return None


@contextmanager
def signals_noted() -> Iterator[list[int]]:
    """SIGINT and SIGTERM noted while a run is followed, then delivered again on the way out.
    Raised where they land, inside Prefect's client (a request, its event loop's thread), they
    could leave the command hanging after Ctrl-C; ``follow`` looks at the list between polls."""
    noted: list[int] = []
    if threading.current_thread() is not threading.main_thread():  # only there can a handler be installed
        yield noted
        return
    previous = {sig: signal.signal(sig, lambda signum, frame: noted.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield noted
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def cancel(run_id: UUID, why: str, say: Say):
    """Ask Prefect to cancel the run (the worker stops it), then follow it to its end."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType
    from prefect.states import State

    with get_client(sync_client=True) as client:
        if client.read_flow_run(run_id).state.is_paused():
            # Suspended for approval: no process runs it, so no cancellation hook will say where the
            # database is; it was not changed (nothing migrates before the approval).
            client.set_flow_run_state(run_id, State(type=StateType.CANCELLED, message=(
                f"Run cancelled during {Phase.PLANNED.words}: the database was not changed ({why})")),
                force=True)
        else:
            client.set_flow_run_state(run_id, State(type=StateType.CANCELLING, message=why))
    say(f"{why}: cancelling flow run {run_id}")
    return follow(run_id, say, timeout_s=CANCEL_WAIT_S)


def run(environment: str, revision: str, dry_run: bool, watch: bool, say: Say) -> int:
    """Start the run; with ``watch``, follow it: 0 when it completed, 1 otherwise. Interrupted
    (Ctrl-C, SIGTERM), the run is cancelled before the interruption goes on."""
    flow_run = start(environment, revision, dry_run)
    say(f"flow run {flow_run.name} ({flow_run.id}) of db-migrate/{environment}: {link(flow_run)}")
    if not watch:
        say(f"cancel it with: prefect flow-run cancel {flow_run.id}")
        return 0
    say("Ctrl-C cancels it")
    with signals_noted() as interrupted:
        finished = follow(flow_run.id, say, interrupted=interrupted)
    if interrupted:
        try:
            signal.raise_signal(interrupted[0])  # the command's own handling: KeyboardInterrupt, or SIGTERM's
        except KeyboardInterrupt:
            cancel(flow_run.id, "interrupted from the terminal that started it", say)
            raise
        finished = follow(flow_run.id, say)  # the signal is ignored where this runs: follow on
    return 0 if finished.state.is_completed() else 1
