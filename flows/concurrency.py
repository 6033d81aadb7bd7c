"""One schema-changing run per environment at a time: a Prefect global concurrency limit
per environment, shared by db-migrate and db-rollback (the database's own guard holds too)."""

from __future__ import annotations

import time
from contextlib import ExitStack, contextmanager
from typing import Iterator

from httpx import HTTPStatusError
from prefect import runtime
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.client.schemas.filters import (
    FlowFilter,
    FlowFilterName,
    FlowRunFilter,
    FlowRunFilterState,
    FlowRunFilterStateType,
    FlowRunFilterTags,
)
from prefect.client.schemas.objects import StateType
from prefect.concurrency.asyncio import ConcurrencySlotAcquisitionError
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectNotFound
from prefect.utilities.urls import url_for

from dbmigrate.errors import MigrationFailed
from flows import recovery
from flows.artifacts import artifact_key

SCHEMA_CHANGING_FLOWS = ("db-migrate", "db-rollback")


def ensure_concurrency_limit(environment: str) -> str:
    """A global concurrency limit of 1 per environment, created on first use."""
    name = artifact_key(environment)
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
    return name


@contextmanager
def one_run_per_environment(environment: str, wait_s: float) -> Iterator[None]:
    """Hold the environment's concurrency limit (db-migrate and db-rollback share it);
    after ``wait_s`` fail with a message that names the runs holding it.

    Each attempt is one request (``max_retries=0``, no timeout): Prefect's own timed wait
    abandons a request the server may still grant, which leaves a slot that nobody holds
    occupied until its lease lapses (5 minutes), and its Retry-After grows with how long
    slots were held, which overshoots any short wait."""
    limit = ensure_concurrency_limit(environment)
    deadline = time.monotonic() + wait_s
    with ExitStack() as held:
        while True:
            try:
                held.enter_context(concurrency(limit, occupy=1, max_retries=0, strict=True,
                                               raise_on_lease_renewal_failure=False))
                break
            except ConcurrencySlotAcquisitionError as exc:
                denied = isinstance(exc.__cause__, HTTPStatusError) and exc.__cause__.response.status_code == 423
                if not denied:
                    raise MigrationFailed(f"concurrency failed: {exc}") from None
                if recovery.reclaim(environment):
                    continue
                if time.monotonic() >= deadline:
                    raise MigrationFailed(
                        f"concurrency failed: another run for {environment} holds {limit}: {holders(environment)}"
                    ) from None
                time.sleep(1)
        yield


def holders(environment: str) -> str:
    """The other runs of this environment that change its schema and are running or paused: each
    by name, state and link (runs of one revision share a name: the link tells them apart)."""
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=list(SCHEMA_CHANGING_FLOWS))),
            flow_run_filter=FlowRunFilter(
                tags=FlowRunFilterTags(all_=[environment]),
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING, StateType.PAUSED])),
            ),
        )
    mine = runtime.flow_run.id
    others = [f"'{r.name}' ({r.state_name}): {url_for(r) or f'flow run {r.id}'}" for r in runs if str(r.id) != mine]
    return ", ".join(others) or "a run that has not been identified"
