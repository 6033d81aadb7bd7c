"""When Prefect itself fails under a schema-changing run: the flow-run process or its
worker killed, the run cancelled from the UI, the server away for a while.

A run keeps an in-flight journal (a Prefect Variable per environment holding an
:class:`~dbmigrate.interruption.InFlight` record) from the moment it holds the environment's
concurrency slot (flows/concurrency.py): which run, which lease, the revision it started from and
the one it is going to, and the phase it is in. Whoever outlives the run reads it:

- the worker, which runs the flow's ``on_crashed`` / ``on_cancellation`` hooks after the
  flow-run process is gone (killed, or ended by a cancel): :func:`on_interrupted` frees the
  slot at once (not when its lease lapses) and ends the run with a message saying where
  the database is;
- the next run, when the worker died too and nobody reported: :func:`reclaim` finds the
  slot held by a run that has ended, frees it, and says what that run left behind.

Where the database is, and putting back one left between revisions, is plain code:
:func:`dbmigrate.interruption.where_left`.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import datetime, timezone
from uuid import UUID

from prefect import get_run_logger, runtime
from prefect.client.orchestration import get_client
from prefect.states import Cancelled, Crashed
from prefect.variables import Variable
from sqlalchemy import Connection, text
from sqlalchemy.exc import DBAPIError

from blocks import load_target
from dbmigrate import db, interruption
from dbmigrate.errors import ConnectionFailed, DbMigrateError, MigrationFailed
from dbmigrate.interruption import InFlight, Undo
from dbmigrate.phases import Phase, Plan
from dbmigrate.restore import RestorePlan
from dbmigrate.run import RunPhase, Suspended
from dbmigrate.settings import Settings
from dbmigrate.target import DatabaseTarget
from flows import concurrency
from flows.artifacts import name_part
from flows.common import Environment, put_variable


def journal_name(environment: str) -> str:
    return f"dbmigrate-in-flight-{name_part(environment)}"


def read(environment: str) -> InFlight | None:
    value = Variable.get(journal_name(environment), default=None)
    return InFlight.from_dict(value) if isinstance(value, dict) else None


@contextmanager
def holding(env: Environment, undo: Settings | None = None) -> Iterator[Journal]:
    """The environment's slot (:func:`flows.concurrency.one_run_per_environment`, freeing one a lost
    run left) and, inside it, the in-flight journal (:func:`in_flight`) while the body runs."""
    with (concurrency.one_run_per_environment(env.name, env.policy.guard_wait_s, reclaim),
          in_flight(env.name, env.target, env.credentials_block, undo) as journal):
        yield journal


@contextmanager
def in_flight(environment: str, target: DatabaseTarget, credentials_block: str,
              undo: Settings | None = None) -> Iterator[Journal]:
    """Keep the journal while the body runs (inside the environment's slot). A run that ends
    on its own, even failed, clears it; one cut short by a signal or a bug leaves it for
    :func:`on_interrupted` or the next run. ``undo``: the run's settings where the policy
    rolls back automatically, so a run killed between revisions is downgraded to its start."""
    left = read(environment)
    if left and left.flow_run != runtime.flow_run.id:
        if _waits_for_approval(left):
            raise MigrationFailed(f"concurrency failed: another run for {environment} waits for approval: "
                                  f"'{left.name}' (Suspended); approve, reject or cancel it first")
        get_run_logger().warning("run '%s' was interrupted during %s: %s.", left.name, left.phase.words,
                                 database_state(left))
    with presence(target) as present:
        journal = Journal(environment, credentials_block, present, undo)
        try:
            yield journal
        except DbMigrateError:
            journal.close()
            raise
        except Suspended:  # waits for approval with neither the slot nor a process: nothing to free, nobody to find
            journal.phase(Phase.PLANNED, lease=None, present=False)
            raise
        journal.close()


def _waits_for_approval(entry: InFlight) -> bool:
    """The journal's run is suspended for approval (it holds no slot and no process while it
    waits, see flows.common.approval_in_ui) and may still be answered: the environment is its."""
    with get_client(sync_client=True) as client:
        state = client.read_flow_run(UUID(entry.flow_run)).state
    if state is None or not state.is_paused():
        return False
    expires = state.state_details.pause_timeout
    return expires is None or expires > datetime.now(timezone.utc)


def presence_name(flow_run_id: str) -> str:
    return f"dbmigrate run {flow_run_id}"


# A presence whose machine vanished (no FIN, no RST: power or network gone) is dropped within about
# 25 s by the server's keepalives rather than the operating system's two hours, and the process's own
# checks of it (a fleet's lane) give up as soon on a server gone.
KEEPALIVES = {"keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 3,
              "tcp_user_timeout": 25000}
SERVER_KEEPALIVES = ("SET tcp_keepalives_idle = 10; SET tcp_keepalives_interval = 5; SET tcp_keepalives_count = 3; "
                     "SET tcp_user_timeout = 25000")


@contextmanager
def presence_connection(target: DatabaseTarget) -> Iterator[Connection]:
    """An idle connection named after the run: PostgreSQL drops it the moment the process dies,
    however it dies, so anyone can tell a run that is waiting (for approval, say) from one whose
    process is gone (:func:`present`). ConnectionFailed when the server cannot be reached."""
    named = {"application_name": presence_name(runtime.flow_run.id), **KEEPALIVES}
    with db.connect(target, connect_args=named) as conn:
        try:
            conn.exec_driver_sql(SERVER_KEEPALIVES)
            conn.commit()
        except DBAPIError:  # a server without them (before PostgreSQL 12): its operating system's keepalives
            conn.rollback()
        yield conn


@contextmanager
def presence(target: DatabaseTarget) -> Iterator[bool]:
    """The run's presence connection (:func:`presence_connection`) held while the run holds the
    slot; False, said in the log, when the server cannot be reached."""
    with ExitStack() as held:
        try:
            held.enter_context(presence_connection(target))
        except ConnectionFailed as exc:  # the health checks say so (and retry); this run just cannot be vouched for
            get_run_logger().warning("no presence connection (%s): should this run die, its slot frees only when "
                                     "its lease lapses", exc)
            yield False
            return
        yield True


class Journal:
    """The in-flight record of the run holding ``environment``'s slot (see the module doc)."""

    def __init__(self, environment: str, credentials_block: str, present: bool, undo: Settings | None):
        self.environment = environment
        self.entry = InFlight(runtime.flow_run.id, runtime.flow_run.name, environment, credentials_block,
                              concurrency.held_lease(), time.time(), present, undo=undo and Undo.of(undo))
        self._save()

    def _save(self) -> None:
        try:
            put_variable(journal_name(self.environment), self.entry.as_dict())
        except Exception as exc:  # the API away for a moment must not stop a migration; the journal is a record
            get_run_logger().warning("could not record this run's phase (%s) in Prefect: %s", self.entry.phase, exc)

    def phase(self, phase: Phase, **fields) -> None:
        for name, value in {"phase": phase, **fields}.items():
            setattr(self.entry, name, value)
        self._save()

    def interrupted(self, phase: Phase, exc: BaseException) -> str | None:
        """The pipeline's ``interrupted`` hook: the report of a run cut short (cancelled from the
        UI, its worker gone) says so in the words its final state will have."""
        try:
            with get_client(sync_client=True) as client:
                state = client.read_flow_run(UUID(self.entry.flow_run)).state
            cancelled = state is not None and (state.is_cancelling() or state.is_cancelled())
            return interrupted_message(self.entry, "cancelled" if cancelled else f"interrupted ({type(exc).__name__})")
        except Exception as error:  # the report is still written, with the exception's own words
            get_run_logger().warning("could not tell where the interrupted run left the database: %s", error)
            return None

    def close(self) -> None:
        """The run ended on its own: nothing for anyone to recover."""
        if concurrency.free_if_forgotten(self.environment, self.entry.lease, self.entry.since):
            get_run_logger().warning("the Prefect server forgot this run's concurrency lease (restarted with "
                                     "in-memory lease storage: see docs/PREFECT.md#deploying); freed the %s slot by name",
                                     self.environment)
        clear(self.environment, self.entry.flow_run)

    def tracking(self, run_phase: RunPhase) -> RunPhase:
        """``run_phase`` that keeps the journal's phase and plan current."""
        planned: list[RestorePlan] = []  # a restore's plan, for its step RESTORE

        def run(phase: Phase, fn, *args):
            if phase == Phase.RESTORE and planned:
                self.restoring(planned[-1])
            elif phase.words:
                self.phase(phase)
            result = run_phase(phase, fn, *args)
            if phase == Phase.PLAN and isinstance(result, Plan):
                if result.steps:  # else nothing will change: the journal stays as it is
                    self.phase(Phase.PLANNED, revision_before=result.revision_before,
                               target=",".join(result.expected) or None, upgrade=result.upgrade)
            elif phase == Phase.PLAN:
                planned.append(result)
            elif phase == Phase.REHEARSAL:  # the approval comes next, and the copy, not the database, was changed
                self.phase(Phase.PLANNED)
            return result

        return run

    def restoring(self, plan: RestorePlan) -> None:
        """The restore over the original is about to start: record what tells afterwards whether it committed."""
        manifest = plan.manifest
        self.phase(Phase.RESTORE, revision_before=",".join(plan.revisions_now) or None, target=manifest.revision,
                   backup=manifest.id, rows_before=interruption.digest(plan.row_counts_now),
                   rows_backup=interruption.digest(manifest.row_counts))


def clear(environment: str, flow_run_id: str) -> None:
    entry = read(environment)
    if entry and entry.flow_run == str(flow_run_id):
        Variable.unset(journal_name(environment))


def interrupted_message(entry: InFlight, how: str) -> str:
    """``Run cancelled during the migration: database at r1, ...``: the final state's message
    and the report's error of a run cut short."""
    return f"Run {how} during {entry.phase.words}: {database_state(entry)}"


def database_state(entry: InFlight) -> str:
    """Where the interrupted run left the database (:func:`dbmigrate.interruption.where_left`)."""
    try:
        target = load_target(entry.credentials_block)
    except DbMigrateError as exc:
        return f"the database could not be read to tell where it is ({exc}); check it before running again"
    return interruption.where_left(target, entry)


def on_interrupted(flow, flow_run, state) -> None:
    """``on_crashed`` / ``on_cancellation`` hook, run by the worker once the flow-run process
    is gone: free the environment's slot now and say in the run's final state where the
    database is."""
    environment = flow_run.parameters.get("environment", "")
    entry = read(environment)
    if not entry or entry.flow_run != str(flow_run.id):
        return  # the run never held the slot, or released it itself
    cancelled = state.is_cancelling() or state.is_cancelled()
    # Prefect's own crash message, first sentence: "Process exited with status code: -9".
    how = "cancelled" if cancelled else f"crashed ({(state.message or 'process died').split('. ')[0]})"
    final = (Cancelled if cancelled else Crashed)(message=f"{interrupted_message(entry, how)}.")
    with get_client(sync_client=True) as client:
        client.set_flow_run_state(flow_run.id, final, force=True)
    concurrency.release(environment, entry.lease, entry.since)
    clear(environment, str(flow_run.id))
    if cancelled:
        _say_again_once_overwritten(flow_run.id, final)


def _say_again_once_overwritten(flow_run_id, final) -> None:
    """A worker cancelling a run marks it Cancelled with its own message ("Flow run was
    cancelled successfully.") after the hooks ran. Prefect 3.8 runs the hooks in a
    short-lived process of their own, which a watching thread would die with, so a
    detached process (``python -m flows.recovery``) watches and, once the worker's message
    is in, sets ours again, which says where the database is."""
    subprocess.Popen([sys.executable, "-m", "flows.recovery", str(flow_run_id), final.message],
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                     start_new_session=True)


def say_again_once_overwritten(flow_run_id: UUID, message: str, within_s: float = 60.0) -> bool:
    """Poll the run until another final message replaces ``message``, then set ``message``
    again (Cancelled). True if it did."""
    deadline = time.monotonic() + within_s
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            time.sleep(0.5)
            state = client.read_flow_run(flow_run_id).state
            if state is not None and state.is_final() and state.message != message:
                client.set_flow_run_state(flow_run_id, Cancelled(message=message), force=True)
                return True
    return False


def reclaim(environment: str) -> bool:
    """The slot is taken: if the run the journal names has ended without releasing it
    (its worker died with it), release it, say what that run left, and return True."""
    entry = read(environment)
    if not entry or entry.flow_run == runtime.flow_run.id:
        return False
    with get_client(sync_client=True) as client:
        owner = client.read_flow_run(UUID(entry.flow_run))
        ended = owner.state is not None and owner.state.is_final()
        if not ended and not _gone(entry):
            return False
        where = database_state(entry)
        if not ended:  # nobody is left to say so: the run's worker died with it
            client.set_flow_run_state(owner.id, Crashed(message=f"Run lost during {entry.phase.words} (its process "
                                                                f"and worker are gone): {where}."), force=True)
    get_run_logger().warning("run '%s' ended without releasing the %s slot; released it. It was interrupted "
                             "during %s: %s.", entry.name, environment, entry.phase.words, where)
    concurrency.release(environment, entry.lease, entry.since)
    clear(environment, entry.flow_run)
    return True


def _gone(entry: InFlight) -> bool:
    """The run's presence connection is gone: its process died (see :func:`presence`)."""
    if not entry.present:
        return False
    try:
        return not present(load_target(entry.credentials_block), [entry.flow_run])
    except DbMigrateError:
        return False


def present(target: DatabaseTarget, flow_run_ids: list[str]) -> set[str]:
    """Those of the runs whose presence connection is on ``target``'s server (one query)."""
    names = {presence_name(run_id): run_id for run_id in flow_run_ids}
    with db.connect(target) as conn:
        found = conn.execute(text("SELECT DISTINCT application_name FROM pg_stat_activity "
                                  "WHERE application_name = ANY(:names)"), {"names": list(names)}).scalars()
        return {names[name] for name in found}


if __name__ == "__main__":  # the watcher _say_again_once_overwritten starts: RUN_ID MESSAGE
    say_again_once_overwritten(UUID(sys.argv[1]), sys.argv[2])
