"""What every flow shares: opening the environment a run may change (:func:`open_environment`,
its first call), the pipeline's phases as Prefect tasks (:func:`phase_runner`), approval in the
Prefect UI (:func:`approval_in_ui`), and expected failures ending the run Failed with their one-line
message (:func:`ends_failed_on_error`)."""

from __future__ import annotations

import functools
import hashlib
import logging
import time
from dataclasses import dataclass
from typing import Literal
from uuid import UUID

from httpx import HTTPStatusError
from prefect import get_run_logger, runtime, task
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import VariableCreate, VariableUpdate
from prefect.client.schemas.responses import SetStateStatus
from prefect.exceptions import FailedRun, FlowPauseTimeout, Pause
from prefect.input import RunInput, keyset_from_paused_state
from prefect.states import Failed, Paused, Running, Suspended
from pydantic import Field

from blocks import load_policy, load_scratch_server, load_target
from dbmigrate import phases, pipeline, private, revisions
from dbmigrate.errors import (ConfigError, ConfirmationRefused, ConnectionFailed, DbMigrateError, RevisionError,
                              StorageFailed)
from dbmigrate.phases import Phase
from dbmigrate.policy import Policy
from dbmigrate.report import Approval
from dbmigrate.run import Confirm
from dbmigrate.settings import Settings
from dbmigrate.target import DatabaseTarget
from flows import alerts
from flows.artifacts import approval_page, lock_policy_section, rehearsal_section

# Steps done before the approval that a run suspended for it (see approval_in_ui) does not do again
# when, answered, it starts again from the beginning: Prefect keeps their results, keyed by the
# run, its attempt and what each depends on (the backup id and the plan, for the rehearsal).
RESUMED_PHASES = {
    Phase.BACKUP: lambda parameters: "",
    Phase.REHEARSAL: lambda parameters: (f"{parameters['manifest'].id} {parameters['plan'].current} "
                                         f"{parameters['plan'].target}"),
}


@dataclass(frozen=True)
class Environment:
    """The environment a run changes, as :func:`open_environment` checked it: its name, the
    credentials block and the database it names, the policy, and the settings under that policy."""

    name: str
    credentials_block: str
    target: DatabaseTarget
    policy: Policy
    settings: Settings


def open_environment(environment: str, credentials_block: str | None = None, alembic_config: str | None = None,
                     backup_storage: str | None = None) -> Environment:
    """Every flow's first call: the database this deployment may change (another environment's
    is refused before anything is touched), the run tagged with its environment, the policy,
    and the settings under it. From here on, what the run writes (its backup, report, journal)
    is readable by the worker's user alone."""
    private.owner_only()
    block = credentials_block or environment
    target = _database_for(environment, block)
    tag_run(environment)
    policy = load_policy(target.environment)
    return Environment(environment, block, target, policy, settings_for(policy, alembic_config, backup_storage))


def _database_for(environment: str, block: str) -> DatabaseTarget:
    """The database a run of this environment's deployment changes. The policy, tags, artifacts
    and concurrency limit follow the environment the credentials block records, so a block
    of another environment is refused before anything is touched."""
    target = load_target(block)
    for claimed in (deployed_environment() or environment, environment):
        if target.environment != claimed:
            raise ConfigError(f"deployment for {claimed} refuses the {target.environment} database (block '{block}')")
    return target


def deployed_environment() -> str | None:
    """The environment of the deployment this run comes from: a run may override the
    parameter, not the deployment it belongs to."""
    deployment_id = runtime.deployment.id
    if not deployment_id:
        return None
    with get_client(sync_client=True) as client:
        return client.read_deployment(UUID(deployment_id)).parameters.get("environment")


def tag_run(environment: str) -> None:
    flow_run_id = runtime.flow_run.id
    if not flow_run_id:
        return
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(UUID(flow_run_id))
        if environment not in run.tags:  # a deployment's runs have its tags already: no write
            client.update_flow_run(run.id, tags=sorted({*run.tags, environment}))


def put_variable(name: str, value) -> None:
    """``Variable.set(name, value, overwrite=True)`` in one request where the variable exists (Prefect's
    reads it before and after: three). Fewer requests, fewer collisions: a Prefect server on SQLite
    answers a write that collided with another 503, and its client waits 2 s before trying again."""
    with get_client(sync_client=True) as client:
        try:
            client.update_variable(VariableUpdate(name=name, value=value))
        except HTTPStatusError as exc:
            if exc.response.status_code != 404:
                raise
            client.create_variable(VariableCreate(name=name, value=value))


def who_asked(requested_by: str) -> str | None:
    """Who asked for this run: the ``requested_by`` parameter (the GitHub workflow passes its actor),
    else the creator Prefect recorded for the run (an automation; a user, on Prefect Cloud), else
    the deployment's schedule. None: nobody said (a run started with ``prefect deployment run``
    and no ``requested_by``); the report then says ``unknown``, not the worker's user."""
    if requested_by.strip():
        return requested_by.strip()
    if not runtime.flow_run.id:
        return None
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(UUID(runtime.flow_run.id))
    if run.created_by and run.created_by.display_value:
        return f"{run.created_by.display_value} ({(run.created_by.type or 'prefect').lower()})"
    return "the deployment's schedule" if run.auto_scheduled else None


def settings_for(policy: Policy, alembic_config: str | None, backup_storage: str | None) -> Settings:
    return Settings.under_policy(
        policy,
        alembic_config=alembic_config,
        scratch_server=load_scratch_server(policy),
        storage_spec=backup_storage,
        project_logging=False,  # the flow-run log is the audit trail: env.py must not shut it down
    )


def _expected_failures_in_one_line(record: logging.LogRecord) -> bool:
    """A log filter: an expected failure (a DbMigrateError) is logged as its one line, without
    a traceback (Prefect logs a failed task's exception with one). Where a worker runs a flow
    (``python -m prefect.engine``) the engine raises the run's final Failed state again as
    FailedRun and logs it as an "unexpected exception": that only repeats the state and message
    already recorded, so it is dropped. An exception a flow or task raised that is not a
    DbMigrateError, a bug, keeps its traceback."""
    exc = record.exc_info[1] if record.exc_info else None
    if isinstance(exc, FailedRun):
        return False
    if isinstance(exc, DbMigrateError):
        record.exc_info = record.exc_text = None
    return True


def ends_failed_on_error(body):
    """Expected failures end the flow run Failed with exactly their one-line message:
    what an operator reads in the run history, without a traceback to dig through."""
    for logger in ("prefect.flow_runs", "prefect.task_runs"):
        logging.getLogger(logger).addFilter(_expected_failures_in_one_line)  # once: a logger's filters are a set

    @functools.wraps(body)
    def run(*args, **kwargs):
        try:
            return body(*args, **kwargs)
        except DbMigrateError as exc:
            get_run_logger().error(str(exc))
            alerts.failed_without_report(str(exc))
            return Failed(message=str(exc))

    return run


def alert_failure(outcome: pipeline.Outcome, environment: str) -> str:
    """The flows' epilogue of a failed run: its alert, and the line its final state says (the phase,
    why, and what the automatic rollback did)."""
    report = outcome.report
    rolled = f"; rollback: {report.rollback.detail}" if report.rollback else ""
    failure = f"{report.error.phase} failed: {report.error.message}{rolled}"
    alerts.run_failed(environment, report, failure)
    return failure


def _transient(task_, task_run, state) -> bool:
    return isinstance(state.result(raise_on_failure=False), (ConnectionFailed, StorageFailed))


def phase_runner(policy: Policy):
    """Run each pipeline phase as a Prefect task named after it (but those the flow runs itself,
    :attr:`Phase.in_flow`), retried where it only connects or uploads (:attr:`Phase.retried`)."""

    def run_phase(phase: Phase, fn, *args):
        if phase.in_flow:
            return fn(*args)
        name = phase.value
        options = {"name": name, "cache_policy": NO_CACHE, "persist_result": False}
        if phase in RESUMED_PHASES and runtime.deployment.id:  # only a deployment's run is suspended
            depends_on = RESUMED_PHASES[phase]
            options = {"name": name, "persist_result": True,
                       "cache_key_fn": lambda context, parameters: attempt_key(name, depends_on(parameters))}
        if phase.retried:
            options.update(retries=policy.transient_retries, retry_delay_seconds=policy.retry_delay_s,
                           retry_condition_fn=_transient)
        return task(fn, **options)(*args)

    return run_phase


class ApprovalForm(RunInput):
    """What the approver fills in when the run pauses; :meth:`approval` reads it as the
    pipeline's :class:`~dbmigrate.Approval` (the report's ``approval``). The decision and the
    name have no default: the UI marks them required and the server refuses an answer without them."""

    decision: Literal["approve", "reject"] = Field(
        description="approve: make the change described above, now. reject: change nothing.")
    approver: str = Field(min_length=1, description="Your name. It is recorded in the audit report.")
    comment: str = Field(default="", description="A ticket, the reason, the change window.")

    def approval(self) -> Approval:
        """A name of blanks is no name: that answer is a refusal."""
        approver = self.approver.strip()
        if not approver:
            return Approval(False, "unknown", "prefect-ui", "answered without a name: refused")
        return Approval(self.decision == "approve", approver, "prefect-ui", self.comment.strip())


def attempt_key(*parts: str) -> str:
    """A key of this run's attempt (a run retried from the UI has its own) and ``parts``."""
    run_id = UUID(runtime.flow_run.id)
    with get_client(sync_client=True) as client:
        attempt = client.read_flow_run(run_id).run_count  # the run context's copy predates this attempt
    digest = hashlib.sha256(" ".join(parts).encode()).hexdigest()[:12]
    return f"{run_id}-{attempt}-{digest}"


class SuspendedForApproval(Pause, pipeline.Suspended):
    """The run waits for approval with no process of its own (Prefect's suspend): the engine ends
    the process, and the pipeline writes no report (the run is not over)."""


def approval_in_ui(env: Environment, requested_by: str | None, describe=None) -> Confirm:
    """The pipeline's confirm hook: where the policy asks for it, stop the run until someone approves
    or rejects in the Prefect UI. ``describe(plan)`` (called only then; default :func:`migration_change`,
    the revisions the run goes through, the one it reaches and their SQL) gives what changes
    (``0004 → 0006 in production``: the paused state's message and the log say it waits for its
    approval) and the markdown the approver reads in the form. The log records the answer.

    A deployment's run is suspended (:func:`suspended_until_answered`): it waits holding no
    process, so a worker restarted or lost meanwhile loses nothing, and once answered it starts
    again on any worker; a run without a deployment (a flow called in-process) pauses in place.
    Where the policy wants the approver to differ from ``requested_by``, their approval is refused."""
    describe = describe or functools.partial(migration_change, env)
    return lambda plan: ask_approval(env.policy, requested_by, lambda: describe(plan))


def ask_approval(policy: Policy, requested_by: str | None, describe) -> Approval:
    if not policy.approval_required:
        return Approval(True, requested_by or "unknown", "policy")
    change, text = describe()
    form = ApprovalForm.with_initial_data(description=text)
    waiting = (f"waiting for approval of {change}: click Resume on this run in the Prefect UI, "
               "choose approve or reject, give your name")
    logger = get_run_logger()

    def announce() -> None:
        logger.info(waiting)
        alerts.approval_waiting(change, waiting)

    try:
        if runtime.deployment.id:
            answered = suspended_until_answered(form, waiting, policy.approval_timeout_s, change, announce)
        else:
            announce()
            answered = paused_until_answered(form, waiting, policy.approval_timeout_s, policy.approval_poll_s)
        answer = answered.approval()
    except FlowPauseTimeout:
        take_back_expired_pause()
        raise ConfirmationRefused(f"nobody approved within {policy.approval_timeout_s:g}s: nothing was changed") from None
    logger.info("%s by %s%s", "approved" if answer.approved else "rejected", answer.approver,
                f": {answer.comment}" if answer.comment else "")
    if answer.approved:
        policy.check_approver(requested_by, answer.approver)
    return answer


def suspended_until_answered(form: type[ApprovalForm], message: str, timeout_s: float, change: str,
                             announce) -> ApprovalForm:
    """Prefect's ``suspend_flow_run(wait_for_input=form)``, with ``message`` on the Suspended state.
    The first time, the run is suspended (``announce()`` says so) and its process ends; answered,
    the run starts again from the beginning, and here the server refuses the same suspension
    again (its key already fired): the answer is returned. The key is the attempt's and the
    change's: a retried run, or one whose database moved meanwhile, asks again."""
    run_id = UUID(runtime.flow_run.id)
    suspended = Suspended(timeout_seconds=int(timeout_s), pause_key=attempt_key("approval", change),
                          message=message)
    keyset = keyset_from_paused_state(suspended)
    suspended.state_details.run_input_keyset = keyset
    with get_client(sync_client=True) as client:
        result = client.set_flow_run_state(run_id, suspended)
        if result.status != SetStateStatus.ACCEPT:
            if result.state is not None and result.state.is_running():  # answered: this is the run resumed
                try:
                    return form.load(keyset, flow_run_id=run_id)
                except Exception:
                    raise ConfirmationRefused("the run was resumed without an answer: nothing was changed") from None
            raise ConfirmationRefused(f"the run could not wait for approval ({result.details.reason}): "
                                      "nothing was changed")
        form.save(keyset, flow_run_id=run_id)
    announce()
    raise SuspendedForApproval(state=result.state)


def paused_until_answered(form: type[ApprovalForm], message: str, timeout_s: float, poll_s: float) -> ApprovalForm:
    """Prefect's ``pause_flow_run(wait_for_input=form)``, but the Paused state carries ``message``:
    Prefect's own leaves it empty, so the run page never said what the run waits for."""
    run_id = UUID(runtime.flow_run.id)
    # A key per attempt: a run retried from the UI asks again, and its form does not collide
    # with the answered one of the attempt before.
    paused = Paused(timeout_seconds=int(timeout_s), pause_key=attempt_key("approval"), message=message)
    keyset = keyset_from_paused_state(paused)
    paused.state_details.run_input_keyset = keyset
    with get_client(sync_client=True) as client:
        result = client.set_flow_run_state(run_id, paused)
        if result.status != SetStateStatus.ACCEPT:
            raise ConfirmationRefused(f"the run could not pause for approval ({result.details.reason}): "
                                      "nothing was changed")
        form.save(keyset, flow_run_id=run_id)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            time.sleep(poll_s)
            if client.read_flow_run(run_id).state.is_running():  # resumed: the server accepted the answer
                return form.load(keyset, flow_run_id=run_id)
    raise FlowPauseTimeout("the run was paused and never resumed")


def migration_change(env: Environment, plan: phases.Plan) -> tuple[str, str]:
    """What a migration's approver is asked: the revisions the run goes through, the one it
    reaches, their SQL, the rehearsal and the lock policy."""
    project = env.settings.project(env.target)
    reached = revisions.shown(plan.expected)
    try:
        sql = phases.render_sql(env.target, project, plan)
    except RevisionError as exc:  # the approver still sees the revisions and the rehearsal
        sql = f"-- {exc}"
    return (f"{revisions.shown(plan.revision_before)} → {reached} in {env.target.environment}",
            approval_page(env.target, plan, reached, sql, rehearsal_section(plan.rehearsal),
                          lock_policy_section(env.settings)))


def take_back_expired_pause() -> None:
    """Prefect's server fails a run whose pause expired with a message of its own ("The flow
    was failed and never resumed"); set it running again so it ends with ours, which says why.
    A run cancelled meanwhile stays cancelled."""
    try:
        with get_client(sync_client=True) as client:
            run = client.read_flow_run(UUID(runtime.flow_run.id))
            if run.state and (run.state.is_paused() or (run.state.is_failed() and "never resumed" in
                                                        (run.state.message or ""))):
                client.set_flow_run_state(run.id, Running(), force=True)
    except Exception as exc:  # the run then ends with Prefect's message; ours is still in the log and report
        get_run_logger().warning("could not record why the approval ended: %s", exc)
