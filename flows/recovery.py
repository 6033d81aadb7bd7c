"""When Prefect itself fails under a schema-changing run: the flow-run process or its
worker killed, the run cancelled from the UI, the server away for a while.

A run keeps an in-flight journal (a Prefect Variable per environment) from the moment it
holds the environment's concurrency slot: which run, which lease, the revision it started
from and the one it is going to, and the phase it is in. Whoever outlives the run reads it:

- the worker, which runs the flow's ``on_crashed`` / ``on_cancellation`` hooks after the
  flow-run process is gone (killed, or ended by a cancel): :func:`on_interrupted` frees the
  slot at once (not when its lease lapses) and ends the run with a message saying where
  the database is;
- the next run, when the worker died too and nobody reported: :func:`reclaim` finds the
  slot held by a run that has ended, frees it, and says what that run left behind.

A run interrupted mid-migration leaves the database at its starting revision when env.py
runs all revisions in one transaction (PostgreSQL rolls back what the dead client never
committed); with a transaction per revision it may be left between, at the last revision
committed: the final message says so and names both ways out (db-rollback to the start, or
db-migrate again to finish), and the next run starts from there after saying what it found.

A db-rollback from a backup records the revision and row counts before it and the backup's:
its restore commits all or nothing, and comparing what is there with both tells which.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import datetime, timezone
from pathlib import Path
from uuid import UUID

from httpx import HTTPStatusError
from prefect import get_run_logger, runtime
from prefect.client.orchestration import get_client
from prefect.concurrency.context import ConcurrencyContext
from prefect.states import Cancelled, Crashed
from prefect.variables import Variable
from sqlalchemy import text

from blocks import load_target
from dbmigrate import db, fingerprint, guard, migrate, revisions
from dbmigrate.catalogue import Manifest
from dbmigrate.phases import Phase, Plan
from dbmigrate.restore import RestorePlan
from dbmigrate.errors import ConnectionFailed, DbMigrateError, MigrationFailed, first_line
from dbmigrate.migrate import SessionLimits
from dbmigrate.run import RunPhase, Suspended
from dbmigrate.settings import Settings
from dbmigrate.target import DatabaseTarget
from flows.artifacts import artifact_key  # the concurrency limit's name

LEASE_S = 300  # the lease Prefect's concurrency() takes, and concurrency.one_run_per_environment with it


def journal_name(environment: str) -> str:
    # Variable names allow letters, digits, dashes and underscores only.
    return "dbmigrate-in-flight-" + "".join(c if c.isalnum() else "-" for c in environment.lower())


def read(environment: str) -> dict | None:
    value = Variable.get(journal_name(environment), default=None)
    return value if isinstance(value, dict) else None


@contextmanager
def in_flight(environment: str, target: DatabaseTarget, credentials_block: str,
              undo: Settings | None = None) -> Iterator[Journal]:
    """Keep the journal while the body runs (inside the environment's slot). A run that ends
    on its own, even failed, clears it; one cut short by a signal or a bug leaves it for
    :func:`on_interrupted` or the next run. ``undo``: the run's settings where the policy
    rolls back automatically, so a run killed between revisions is downgraded to its start."""
    left = read(environment)
    if left and left.get("flow_run") != runtime.flow_run.id:
        if _waits_for_approval(left):
            raise MigrationFailed(f"concurrency failed: another run for {environment} waits for approval: "
                                  f"'{left.get('name')}' (Suspended); approve, reject or cancel it first")
        get_run_logger().warning("run '%s' was interrupted during %s: %s.", left.get("name"), _phase(left),
                                 database_state(left))
    with _presence(target) as present:
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


def _waits_for_approval(entry: dict) -> bool:
    """The journal's run is suspended for approval (it holds no slot and no process while it
    waits, see flows.common.ask_in_ui) and may still be answered: the environment is its."""
    with get_client(sync_client=True) as client:
        state = client.read_flow_run(UUID(entry["flow_run"])).state
    if state is None or not state.is_paused():
        return False
    expires = state.state_details.pause_timeout
    return expires is None or expires > datetime.now(timezone.utc)


def presence_name(flow_run_id: str) -> str:
    return f"dbmigrate run {flow_run_id}"


@contextmanager
def _presence(target: DatabaseTarget) -> Iterator[bool]:
    """An idle connection named after the run, held while the run holds the slot: PostgreSQL
    drops it the moment the process dies, however it dies, so anyone can tell a run that
    is waiting (for approval, say) from one whose process is gone."""
    with ExitStack() as held:
        try:
            held.enter_context(db.connect(target, connect_args={"application_name": presence_name(runtime.flow_run.id)}))
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
        self.entry = {"flow_run": runtime.flow_run.id, "name": runtime.flow_run.name, "environment": environment,
                      "lease": _held_lease(), "since": time.time(),
                      "credentials_block": credentials_block, "present": present, "phase": Phase.HOLDING.value,
                      "revision_before": None, "target": None, "undo": undo and _undo(undo)}
        self._save()

    def _save(self) -> None:
        try:
            Variable.set(journal_name(self.environment), self.entry, overwrite=True)
        except Exception as exc:  # the API away for a moment must not stop a migration; the journal is a record
            get_run_logger().warning("could not record this run's phase (%s) in Prefect: %s", self.entry["phase"], exc)

    def phase(self, name: Phase, **fields) -> None:
        self.entry.update(phase=name.value, **fields)
        self._save()

    def interrupted(self, phase: str, exc: BaseException) -> str | None:
        """The pipeline's ``interrupted`` hook: the report of a run cut short (cancelled from the
        UI, its worker gone) says so in the words its final state will have."""
        try:
            with get_client(sync_client=True) as client:
                state = client.read_flow_run(UUID(self.entry["flow_run"])).state
            cancelled = state is not None and (state.is_cancelling() or state.is_cancelled())
            return interruption(self.entry, "cancelled" if cancelled else f"interrupted ({type(exc).__name__})")
        except Exception as error:  # the report is still written, with the exception's own words
            get_run_logger().warning("could not tell where the interrupted run left the database: %s", error)
            return None

    def close(self) -> None:
        """The run ended on its own: nothing for anyone to recover."""
        if free_if_forgotten(self.entry):
            get_run_logger().warning("the Prefect server forgot this run's concurrency lease (restarted with "
                                     "in-memory lease storage: see README 'Deploying'); freed the %s slot by name",
                                     self.environment)
        clear(self.environment, self.entry["flow_run"])

    def tracking(self, run_phase: RunPhase) -> RunPhase:
        """``run_phase`` that keeps the journal's phase and plan current."""
        planned: list[RestorePlan] = []  # a restore's plan, for its step RESTORE

        def run(phase: Phase, fn, *args):
            if phase == Phase.RESTORE and planned:
                self.restoring(planned[-1].before, planned[-1].manifest)
            elif phase.words:
                self.phase(phase)
            result = run_phase(phase, fn, *args)
            if phase == Phase.PLAN and isinstance(result, Plan):
                self.phase(Phase.PLANNED, revision_before=result.revision_before,
                           target=",".join(result.expected) or None, upgrade=result.upgrade)
            elif phase == Phase.PLAN:
                planned.append(result)
            elif phase == Phase.REHEARSAL:  # the approval comes next, and the copy, not the database, was changed
                self.phase(Phase.PLANNED)
            return result

        return run

    def restoring(self, before: fingerprint.Fingerprint, manifest: Manifest) -> None:
        """The restore over the original is about to start: record what tells afterwards whether it committed."""
        self.phase(Phase.RESTORE, revision_before=",".join(before.revisions) or None, target=manifest.revision,
                   backup=manifest.id, rows_before=_digest(before.row_counts), rows_backup=_digest(manifest.row_counts))


def _digest(row_counts: dict[str, int]) -> str:
    # The journal keeps digests, not the counts: a Variable holds 5000 characters at most.
    return hashlib.sha256(json.dumps(row_counts, sort_keys=True).encode()).hexdigest()[:16]


def _undo(settings: Settings) -> dict:
    # Absolute: whoever reads the journal (the worker's hook, the next run) has its own working directory.
    config = settings.alembic_config or os.environ.get("ALEMBIC_CONFIG") or revisions.DEFAULT_CONFIG
    return {"alembic_config": str(Path(config).resolve()), "lock_timeout_s": settings.limits.lock_timeout_s,
            "statement_timeout_s": settings.limits.statement_timeout_s}


def _held_lease() -> str | None:
    """The lease of the slot just taken: Prefect records it on the flow run's
    ConcurrencyContext until it is released."""
    context = ConcurrencyContext.get()
    return str(context.cleanup_lease_ids[-1]) if context and context.cleanup_lease_ids else None


def _phase(entry: dict) -> str:
    return Phase(entry.get("phase")).words


def clear(environment: str, flow_run_id: str) -> None:
    entry = read(environment)
    if entry and entry.get("flow_run") == str(flow_run_id):
        Variable.unset(journal_name(environment))


def release(entry: dict) -> None:
    """Free the slot the journal's run holds."""
    if entry.get("lease") and not free_if_forgotten(entry):
        with get_client(sync_client=True) as client:
            client.release_concurrency_slots_with_lease(UUID(entry["lease"]))


def free_if_forgotten(entry: dict) -> bool:
    """A Prefect server restarted with its default in-memory lease storage forgets every
    lease: releasing one then frees nothing, and with no lease left to lapse the slot stays
    taken for good. A lease younger than its duration cannot have lapsed, so one the server
    no longer knows was forgotten: free the slot by name instead. True if it did."""
    held_s = time.time() - entry.get("since", 0)
    if not entry.get("lease") or held_s >= LEASE_S:
        return False
    with get_client(sync_client=True) as client:
        try:
            client.renew_concurrency_lease(UUID(entry["lease"]), LEASE_S)
            return False
        except HTTPStatusError as exc:
            if exc.response.status_code != 410:
                raise
        client.release_concurrency_slots([artifact_key(entry["environment"])], 1, held_s)
    return True


def interruption(entry: dict, how: str) -> str:
    """``Run cancelled during the migration: database at r1, ...``: the final state's message
    and the report's error of a run cut short."""
    return f"Run {how} during {_phase(entry)}: {database_state(entry)}"


def database_state(entry: dict) -> str:
    """Where the interrupted run left the database, in words an operator acts on."""
    start, goal = entry.get("revision_before"), entry.get("target")
    if entry.get("phase") in (Phase.HOLDING, Phase.PLANNED):
        return f"the database was not changed (interrupted before migrating, at {start or 'its starting revision'})"
    try:
        target = load_target(entry["credentials_block"])
        with guard.hold(target, "recovery", 0, db.DEFAULT_CONNECT_TIMEOUT):
            _end_orphans(target)
            with db.connect(target) as conn:
                if entry.get("phase") == Phase.RESTORE:
                    return _restore_state(entry, revisions.current_label(conn), fingerprint.row_counts(conn))
                now = revisions.current_label(conn)
            if now not in (start, goal) and entry.get("undo"):
                return _downgrade_to_start(target, entry, now)
    except DbMigrateError as exc:
        return f"the database could not be read to tell where it is ({exc}); check it before running again"
    if now == start:
        return f"database at {revisions.shown(now)}, its starting revision: nothing was applied"
    if now == goal:
        return f"database at {now}, the target revision: the migration had completed"
    back, forward = ("db-rollback", "db-migrate") if entry.get("upgrade", True) else ("db-migrate", "db-rollback")
    return (f"database left at {revisions.shown(now)}, between the starting revision {revisions.shown(start)} "
            f"and the target {goal}: run {back} to {revisions.shown(start)}, or {forward} again to finish")


def _restore_state(entry: dict, now: str | None, row_counts: dict[str, int]) -> str:
    """Whether the interrupted restore committed, told by the database's revision and row counts
    against those before it and the backup's (a backup often has the revision of the database now)."""
    seen = (now, _digest(row_counts))
    before, restored = (entry["revision_before"], entry["rows_before"]), (entry["target"], entry["rows_backup"])
    backup, at = entry["backup"], revisions.shown(now)
    if seen == before != restored:
        return f"the restore did not commit: database as it was (revision {at} and row counts as before the restore)"
    if seen == restored != before:
        return f"the restore had committed: database now matches backup {backup} (revision {at} and its row counts)"
    if seen == before:
        return (f"database at {at} with the row counts both before the restore and of backup {backup}: these cannot "
                f"tell whether the restore (all or nothing) committed; run it again if in doubt")
    return (f"database at {at}, matching by revision and row counts neither its state before the restore nor backup "
            f"{backup}: check it before running again")


def _downgrade_to_start(target: DatabaseTarget, entry: dict, now: str | None) -> str:
    """The policy rolls back automatically: take a database left between revisions back to
    where the run started (called holding the guard)."""
    start, undo = entry.get("revision_before"), entry["undo"]
    left = f"database left at {revisions.shown(now)}, between the starting revision {revisions.shown(start)} " \
           f"and the target {entry.get('target')}"
    try:
        project = revisions.load(undo["alembic_config"], target, project_logging=False)
        limits = SessionLimits(undo["lock_timeout_s"], undo["statement_timeout_s"])
        migrate.run(project, start or "base", upgrade=False, limits=limits, on_step=lambda step: None)
        with db.connect(target) as conn:
            after = revisions.current_label(conn)
    except Exception as exc:  # a downgrade runs the project's code: any failure is reported, not raised
        reason = target.redact(first_line(exc))
        return f"{left}; the automatic rollback failed ({reason}): run db-rollback to {revisions.shown(start)}"
    if after != start:
        return (f"{left}; the automatic rollback ended at {revisions.shown(after)}: "
                f"run db-rollback to {revisions.shown(start)}")
    return f"{left}; rolled back automatically to {revisions.shown(start)}, its starting revision"


def _end_orphans(target, wait_s: float = 10.0) -> None:
    """Terminate the dead run's statements (its restore's psql too), which PostgreSQL would otherwise
    go on running (holding their locks) until they next write to the vanished client. Called holding
    the guard: no live migration or restore is running, so every dbmigrate session without it is an orphan."""
    with db.connect(target) as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT")
        query = text("SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                     "AND application_name IN ('dbmigrate', 'dbmigrate restore') AND pid <> pg_backend_pid()")
        for pid in conn.execute(query).scalars():
            conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        deadline = time.monotonic() + wait_s
        while conn.execute(query).first() and time.monotonic() < deadline:
            time.sleep(0.2)


def on_interrupted(flow, flow_run, state) -> None:
    """``on_crashed`` / ``on_cancellation`` hook, run by the worker once the flow-run process
    is gone: free the environment's slot now and say in the run's final state where the
    database is."""
    environment = flow_run.parameters.get("environment", "")
    entry = read(environment)
    if not entry or entry.get("flow_run") != str(flow_run.id):
        return  # the run never held the slot, or released it itself
    cancelled = state.is_cancelling() or state.is_cancelled()
    # Prefect's own crash message, first sentence: "Process exited with status code: -9".
    how = "cancelled" if cancelled else f"crashed ({(state.message or 'process died').split('. ')[0]})"
    final = (Cancelled if cancelled else Crashed)(message=f"{interruption(entry, how)}.")
    with get_client(sync_client=True) as client:
        client.set_flow_run_state(flow_run.id, final, force=True)
    release(entry)
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
    if not entry or entry.get("flow_run") == runtime.flow_run.id:
        return False
    with get_client(sync_client=True) as client:
        owner = client.read_flow_run(UUID(entry["flow_run"]))
        ended = owner.state is not None and owner.state.is_final()
        if not ended and not _gone(entry):
            return False
        where = database_state(entry)
        if not ended:  # nobody is left to say so: the run's worker died with it
            client.set_flow_run_state(owner.id, Crashed(message=f"Run lost during {_phase(entry)} (its process "
                                                                f"and worker are gone): {where}."), force=True)
    get_run_logger().warning("run '%s' ended without releasing the %s slot; released it. It was interrupted "
                             "during %s: %s.", entry["name"], environment, _phase(entry), where)
    release(entry)
    clear(environment, entry["flow_run"])
    return True


def _gone(entry: dict) -> bool:
    """The run's presence connection is gone: its process died (see :func:`_presence`)."""
    if not entry.get("present"):
        return False
    try:
        with db.connect(load_target(entry["credentials_block"])) as conn:
            return conn.execute(text("SELECT count(*) FROM pg_stat_activity WHERE application_name = :name"),
                                {"name": presence_name(entry["flow_run"])}).scalar_one() == 0
    except DbMigrateError:
        return False


if __name__ == "__main__":  # the watcher _say_again_once_overwritten starts: RUN_ID MESSAGE
    say_again_once_overwritten(UUID(sys.argv[1]), sys.argv[2])
