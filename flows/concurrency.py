"""One schema-changing run per environment at a time: a Prefect global concurrency limit
per environment, shared by db-migrate and db-rollback (the database's own guard holds too);
its slot, the lease a run holds it by, and freeing it for a run that can no longer."""

from __future__ import annotations

import time
from contextlib import ExitStack, contextmanager
from typing import Callable, Iterator
from uuid import UUID

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
from prefect.concurrency.context import ConcurrencyContext
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectNotFound
from prefect.utilities.urls import url_for

from dbmigrate.errors import MigrationFailed
from flows.artifacts import name_part

SCHEMA_CHANGING_FLOWS = ("db-migrate", "db-rollback")
LEASE_S = 300  # the lease Prefect's concurrency() takes a slot by


def limit_name(environment: str) -> str:
    return f"db-migrate-{name_part(environment)}"


def ensure_concurrency_limit(environment: str) -> str:
    """A global concurrency limit of 1 per environment, created on first use."""
    name = limit_name(environment)
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
    return name


@contextmanager
def one_run_per_environment(environment: str, wait_s: float, reclaim: Callable[[str], bool]) -> Iterator[None]:
    """Hold the environment's concurrency limit (db-migrate and db-rollback share it);
    after ``wait_s`` fail with a message that names the runs holding it. ``reclaim(environment)``
    frees a slot its holder can no longer free (flows.recovery.reclaim): True, try again at once.

    Each attempt is one request (``max_retries=0``, no timeout): Prefect's own timed wait
    abandons a request the server may still grant, which leaves a slot that nobody holds
    occupied until its lease lapses (5 minutes), and its Retry-After grows with how long
    slots were held, which overshoots any short wait."""
    limit = ensure_concurrency_limit(environment)
    deadline = time.monotonic() + wait_s

    def denied() -> float:
        if reclaim(environment):
            return 0
        if time.monotonic() >= deadline:
            raise MigrationFailed(f"concurrency failed: another run for {environment} holds {limit}: "
                                  f"{holders(environment)}")
        return 1

    with slots(limit, denied):
        yield


@contextmanager
def slots(names: str | list[str], denied: Callable[[], float]) -> Iterator[None]:
    """Hold a slot of each global concurrency limit in ``names`` (all or none), asking one request at a
    time (see :func:`one_run_per_environment`); each time the server says no, ``denied()`` raises to
    give up or says how many seconds to wait before asking again."""
    with ExitStack() as held:
        while True:
            try:
                held.enter_context(concurrency(names, occupy=1, max_retries=0, strict=True,
                                               raise_on_lease_renewal_failure=False))
                break
            except ConcurrencySlotAcquisitionError as exc:
                if not (isinstance(exc.__cause__, HTTPStatusError) and exc.__cause__.response.status_code == 423):
                    raise MigrationFailed(f"concurrency failed: {exc}") from None
            time.sleep(denied())
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


def held_lease() -> str | None:
    """The lease of the slot just taken: Prefect records it on the flow run's
    ConcurrencyContext until it is released."""
    context = ConcurrencyContext.get()
    return str(context.cleanup_lease_ids[-1]) if context and context.cleanup_lease_ids else None


def release(environment: str, lease: str | None, since: float) -> None:
    """Free the slot a run took at ``since`` (time.time()) by ``lease``, for a run that cannot."""
    if lease and not free_if_forgotten(environment, lease, since):
        with get_client(sync_client=True) as client:
            client.release_concurrency_slots_with_lease(UUID(lease))


def free_if_forgotten(environment: str, lease: str | None, since: float) -> bool:
    """A Prefect server restarted with its default in-memory lease storage forgets every
    lease: releasing one then frees nothing, and with no lease left to lapse the slot stays
    taken for good. A lease younger than its duration cannot have lapsed, so one the server
    no longer knows was forgotten: free the slot by name instead. True if it did."""
    held_s = time.time() - since
    if not lease or held_s >= LEASE_S:
        return False
    with get_client(sync_client=True) as client:
        try:
            client.renew_concurrency_lease(UUID(lease), LEASE_S)
            return False
        except HTTPStatusError as exc:
            if exc.response.status_code != 410:
                raise
        client.release_concurrency_slots([limit_name(environment)], 1, held_s)
    return True
