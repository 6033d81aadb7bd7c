"""The flows run in this process against the session's Prefect API (the `prefect_api` fixture's
test harness), and what a run left in that API: its flow run, logs, artifacts, task runs, the
approval form it paused on."""

from __future__ import annotations

from tests.support.helpers import wait_until


def run_flow(**parameters):
    return run_named("db-migrate", **parameters)


def run_named(flow_name: str, **parameters):
    from flows.db_rollback import db_rollback
    from flows.maintenance import db_backup, db_health
    from flows.migrate import db_migrate

    flow = {"db-migrate": db_migrate, "db-rollback": db_rollback, "db-health": db_health, "db-backup": db_backup}
    return flow[flow_name](return_state=True, **parameters)


def wait_for_approval_form(seen: dict) -> None:
    """Wait for a run paused for approval whose form is there; keep the run and the
    description the approver reads in ``seen``."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType
    from prefect.input.actions import read_flow_run_input
    from prefect.input.run_input import keyset_from_paused_state

    def paused_with_its_form():
        with get_client(sync_client=True) as client:
            paused = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PAUSED]))))
        description = paused and read_flow_run_input(keyset_from_paused_state(paused[0].state)["description"],
                                                     flow_run_id=paused[0].id)
        return description and {"run": paused[0], "description": description}

    seen.update(wait_until(paused_with_its_form, 120, "a run paused for approval with its form", 0.5))


def resume_when_paused(answer: dict, seen: dict):
    """Answer the approval form as an operator in the UI would."""
    from prefect.flow_runs import resume_flow_run

    wait_for_approval_form(seen)
    resume_flow_run(seen["run"].id, run_input=answer)


def run_logs(state) -> str:
    """Everything the flow run logged to the Prefect API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogWorker

    def read() -> str:
        with get_client(sync_client=True) as client:
            logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[state.state_details.flow_run_id])))
        return "\n".join(log.message for log in logs)

    # Logs reach the API in batches; under the suite's load a drain can end (timeout) before the last
    # batch is sent (seen once in make check: none of a run's logs there yet). Every run logs something.
    APILogWorker.drain_all(timeout=10)
    return wait_until(read, 30, "the run's logs to reach the API")


def artifact(key: str) -> str:
    """The newest version of the artifact with this key."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    with get_client(sync_client=True) as client:
        [latest] = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])),
                                         sort=ArtifactSort.CREATED_DESC, limit=1)
    return latest.data


def flow_run_of(state):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(state.state_details.flow_run_id)


def artifacts_of(state) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        return client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])))


def task_runs_of(state) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        return client.read_task_runs(flow_run_filter=FlowRunFilter(
            id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
