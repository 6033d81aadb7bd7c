"""The db-migrate-fleet parent's lanes: a few long-lived db-migrate-fleet-batch runs
(:mod:`flows.fleet_batch`) that it feeds wave after wave.

Why lanes: a deployment run pays a fixed cost (the worker's pick-up, a new Python process importing
Prefect, the pull step, loading the blocks, the policy and the fleet) that a member migrated inside
a run does not: measured about 13 s per run on 2 cores against 0.46 s per member (docs/BENCHMARKS.md),
so a run per wave and lane cost more than the members. A lane pays it once per fleet run (and once
more after a pause): at most L lanes, one per worker online in the batch deployment's work pool by
default, never more than C.

A lane is created with ``run_deployment`` and an idempotency key (the fleet run, the revision, the
lane's number), so a resumed parent gets its lanes back; one already over is passed by. Its work reaches
it through a Prefect variable (:func:`flows.fleet_state.assign`). Per wave the parent splits the members
over its lanes, then polls (one request for the lanes' states, one for the wave's member records) until
every member has its final record or its lane ended; a lane lost with its worker, at work, waiting for a
slot or idle, is found by its presence connection (:mod:`flows.fleet_recovery`). Before a pause that may
last and at the end, the lanes are told they are done and waited for: none holds a worker through an
approval.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

from prefect import get_run_logger, runtime
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (FlowFilter, FlowFilterName, FlowRunFilter, FlowRunFilterId,
                                            FlowRunFilterState, FlowRunFilterStateType, FlowRunFilterTags)
from prefect.client.schemas.objects import StateType, Worker, WorkerStatus
from prefect.deployments import run_deployment

from dbmigrate import phases, revisions
from dbmigrate.errors import DbMigrateError
from dbmigrate.fleet import Member
from dbmigrate.interruption import Undo
from dbmigrate.settings import Settings
from flows import fleet_recovery
from flows.fleet_state import (FAILED, LANE_IDLE_S, NOT_STARTED, RUNNING, assign, assigned, fleet_run_tag, fleet_tag,
                               forget_lane, read_records, release, stop, stopped)
from flows.fleet_report import FleetReport

POLL_S = 1.0  # how often the parent reads its lanes' states and the wave's records (a request each)
BATCH_FLOW = "db-migrate-fleet-batch"
HEARTBEAT_S = 30  # a worker's heartbeat when it does not say (Prefect's PREFECT_WORKER_HEARTBEAT_SECONDS)
ACTIVE = [StateType.SCHEDULED, StateType.PENDING, StateType.RUNNING, StateType.CANCELLING]


def lane_count(environment: str, lanes: int, max_in_flight: int) -> int:
    """L: ``lanes``, or 0 for one per worker online in the batch deployment's work pool; 1 to C."""
    if not lanes:
        with get_client(sync_client=True) as client:
            pool = client.read_deployment_by_name(f"{BATCH_FLOW}/{environment}").work_pool_name
            now = datetime.now(timezone.utc)
            lanes = sum(alive(worker, now) for worker in client.read_workers_for_work_pool(pool))
    return max(1, min(lanes, max_in_flight))


def alive(worker: Worker, now: datetime) -> bool:
    """Online and heard from within one and a half heartbeats. Prefect lists a worker that died as
    online until the server's foreman notices three missed heartbeats (90 s by default): a fleet
    started meanwhile made lanes for workers gone, and they waited for a worker to run them."""
    if worker.status != WorkerStatus.ONLINE or worker.last_heartbeat_time is None:
        return False
    interval = worker.heartbeat_interval_seconds or HEARTBEAT_S
    return (now - worker.last_heartbeat_time).total_seconds() <= 1.5 * interval


@dataclass
class Lane:
    run_id: str
    number: int
    fleet_run: str  # this parent's, or a previous one's it waits for
    seq: int = 0  # of its latest assignment
    pending: list[str] = field(default_factory=list)  # assigned members without their final record yet
    ended: bool = False
    presence: str | None = None  # the member on whose server its presence was last said or seen to be
    lease: str | None = None  # of the slots its records last said it holds
    absent_since: float | None = None  # since when its presence has been gone at every look
    assigned_at: float = 0.0  # when it was given its latest assignment (time.monotonic())
    running_at: float | None = None  # when this parent first read its run Running (time.monotonic())
    recorded: bool = False  # a record of one of its members was read: it had taken a member


class Lanes:
    """This fleet run's lanes (and a previous run's still going), and the members they migrate."""

    def __init__(self, environment: str, parameters: dict, most: int, report: FleetReport, members: list[Member],
                 settings: Settings, undo: Undo | None = None):
        self.environment, self.parameters, self.most, self.report = environment, parameters, most, report
        self.by_name = {member.name: member for member in members}
        self.settings = settings
        self.undo = undo  # the policy rolls back automatically: a member a lost lane left between revisions is put back
        self.fleet_run = runtime.flow_run.id
        self.lanes: dict[str, Lane] = {}  # by flow run id
        self.numbered = 0
        self.queue: list[str] = []  # members to give the next lane with nothing pending
        self.polls = 0  # one request for the lanes' states and one for the records each

    def live(self) -> list[Lane]:
        return [lane for lane in self.lanes.values() if lane.fleet_run == self.fleet_run and not lane.ended]

    def start(self, wanted: int) -> None:
        """Lanes of this run started up to ``wanted`` (at most L) live ones."""
        while len(self.live()) < min(wanted, self.most):
            self.numbered += 1
            number = self.numbered
            run = run_deployment(
                f"{BATCH_FLOW}/{self.environment}", timeout=0, flow_run_name=f"{self.environment}-fleet-lane-{number}",
                parameters={**self.parameters, "lane": number},
                tags=[fleet_tag(self.environment), fleet_run_tag(self.fleet_run), self.environment],
                idempotency_key=f"{self.fleet_run}-{self.parameters['target_revision']}-lane-{number}")
            work = assigned(self.fleet_run, number)
            if (run.state is not None and run.state.is_final()) or work.get("done"):
                continue  # this run's lane from before it was suspended: over, or told to end
            self.lanes[str(run.id)] = Lane(str(run.id), number, self.fleet_run, seq=work.get("seq", 0))

    def adopt_running(self) -> list[str]:
        """A previous fleet run's lanes still going (its parent killed, say): their members are
        waited for, not started again. Those members."""
        with get_client(sync_client=True) as client:
            runs = client.read_flow_runs(
                flow_filter=FlowFilter(name=FlowFilterName(any_=[BATCH_FLOW])),
                flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[fleet_tag(self.environment)]),
                                              state=FlowRunFilterState(type=FlowRunFilterStateType(any_=ACTIVE))))
        held = []
        for run in runs:
            fleet_run, number = run.parameters.get("fleet_run"), run.parameters.get("lane")
            if fleet_run and number and fleet_run != self.fleet_run:
                work = assigned(fleet_run, number)
                lane = Lane(str(run.id), number, fleet_run, pending=list(work.get("members", [])))
                self.lanes[lane.run_id] = lane
                held += lane.pending
        return held

    def run(self, names: list[str]) -> None:
        """Migrate ``names`` over the lanes (started as needed); return when every one has its final
        record or its lane ended, the first failure having stopped the rest."""
        self.queue = list(names)
        self.wait()

    def _dispatch(self) -> None:
        """The queued members split over the lanes with nothing pending (started up to L)."""
        busy = [lane for lane in self.live() if lane.pending]
        self.start(len(busy) + len(self.queue))
        idle = [lane for lane in self.live() if not lane.pending]
        for index, lane in enumerate(idle):
            if share := self.queue[index::len(idle)]:
                lane.seq += 1
                lane.pending, lane.assigned_at = list(share), time.monotonic()
                assign(self.fleet_run, lane.number, lane.seq, share)
        if idle:
            self.queue = []

    def wait(self) -> None:
        """Poll until no member is queued or pending on a lane."""
        while self.queue or any(lane.pending for lane in self.lanes.values()):
            if self.queue:
                self._dispatch()
            busy = [lane for lane in self.lanes.values() if lane.pending]
            states = self._states([*busy, *self.live()])
            records = read_records(self.environment, [name for lane in busy for name in lane.pending])
            self.polls += 1
            for lane in busy:
                for name in list(lane.pending):
                    row = records.get(name)
                    if not row or row.get("child_run") != lane.run_id:
                        continue
                    # a record written as the fleet stopped says neither: the lane kept both
                    lane.presence, lane.lease = row.get("presence") or lane.presence, row.get("lease") or lane.lease
                    lane.recorded = True
                    if row["status"] != RUNNING:
                        self.report.set(name, row)
                        lane.pending.remove(name)
                state = states.get(lane.run_id)
                if state is not None and state.is_final():
                    self.queue += self._ended(lane, state, records)
            for lane in self.live():  # idle lanes end too (their idle timeout): given no more work
                if (state := states.get(lane.run_id)) is not None and state.is_final():
                    lane.ended = True
            if self.queue and (why := stopped(self.fleet_run)):
                for name in self.queue:
                    self.report.set(name, {"status": NOT_STARTED, "message": f"the fleet stopped: {why}"})
                self.queue = []
            if lost := self._lost(busy, states):
                self.recover(lost)
            elif not self.queue and any(lane.pending for lane in self.lanes.values()):
                time.sleep(POLL_S)

    def _states(self, lanes: list[Lane]) -> dict:
        with get_client(sync_client=True) as client:
            runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                id=FlowRunFilterId(any_=list({lane.run_id for lane in lanes}))))
        return {str(run.id): run.state for run in runs}

    def _lost(self, lanes: list[Lane], states: dict) -> list[str]:
        """Of ``lanes`` (looked at each poll), those whose presence has been gone at every look for
        LOST_AFTER_S, their run not over (:mod:`flows.fleet_recovery`). A lane is looked for where its
        presence was last said or seen to be and on its next member's server (where it moves it next);
        one of this fleet run from the moment its run is read Running, and, never seen yet, lost only
        once it has had FIRST_PRESENCE_S to open it; one a previous fleet run started (an older
        version's may hold none) once its records say where."""
        now = time.monotonic()
        for lane in lanes:
            if lane.running_at is None and (state := states.get(lane.run_id)) is not None and state.is_running():
                lane.running_at = now
        watched = {lane.run_id: where for lane in lanes if not lane.ended
                   and (lane.presence or (lane.running_at is not None and lane.fleet_run == self.fleet_run))
                   and (where := [name for name in (lane.presence, *lane.pending[:1]) if name in self.by_name])}
        seen, unknown = fleet_recovery.look(watched, self.by_name) if watched else (set(), set())
        lost = []
        for lane in self.lanes.values():
            if lane.run_id in seen and lane.presence is None:  # at its first member's server: it has started
                lane.presence = lane.pending[0]
                get_run_logger().info("lane %d took its first member: its presence is on %s", lane.number,
                                      self.by_name[lane.presence].server)
            state = states.get(lane.run_id)
            if lane.run_id not in watched or lane.run_id in seen | unknown:
                lane.absent_since = None
            elif lane.absent_since is None:
                lane.absent_since = now
            elif now - lane.absent_since >= fleet_recovery.LOST_AFTER_S and state is not None \
                    and not state.is_final() and (lane.presence or fleet_recovery.first_look_over(lane.assigned_at,
                                                                                                  lane.running_at)):
                lost.append(lane.run_id)
        return lost

    def _ended(self, lane: Lane, state, records: dict) -> list[str]:
        """A lane over with members pending, from their records: a member cut short while it ran is
        failed, with where its database is. Those it never started are returned to run elsewhere when
        the lane ended Completed (its idle timeout crossed their assignment); otherwise the lane
        crashed or was cancelled: not started, and the fleet stops."""
        lane.ended = True
        pending, lane.pending = lane.pending, []
        again = []
        for name in pending:
            row = records.get(name)
            if row and row.get("child_run") == lane.run_id:  # cut short while it ran
                where = self.where(name)
                self.report.set(name, {**row, "status": FAILED, "revision_after": where,
                                       "message": f"its run ended {state.name} while it ran: database at "
                                                  f"{where} (from {row.get('revision_before') or '?'} to "
                                                  f"{row.get('target') or '?'})"})
                stop(self.fleet_run, f"member '{name}': its run ended {state.name}")
            elif state.is_completed() and lane.fleet_run == self.fleet_run:
                again.append(name)
            else:
                self.report.set(name, {"status": NOT_STARTED, "message": f"its run ended {state.name} before it started"})
                stop(self.fleet_run, f"lane run ended {state.name}: {state.message}")
        return again

    def recover(self, lost: list[str]) -> None:
        """Lanes whose process is gone (:mod:`flows.fleet_recovery`): a member in flight recovered,
        the rest of the lane's assignment not started, the fleet stopped."""
        for run_id in lost:
            lane = self.lanes[run_id]
            rows = fleet_recovery.recover(self.environment, run_id, lane.pending, self.by_name, self.undo, lane.lease,
                                          first=not lane.recorded)
            if rows is None:  # it ended just now: the next poll reads how
                continue
            lane.ended, lane.pending = True, []
            for name, row in rows.items():
                self.report.set(name, {**row, "revision_after": self.where(name)} if row["status"] == FAILED else row)
            failed = [name for name, row in rows.items() if row["status"] == FAILED]
            stop(self.fleet_run, f"member{'s' if len(failed) > 1 else ''} {', '.join(repr(name) for name in failed)}: "
                                 f"its run was lost" if failed else
                                 f"lane {lane.number} was lost {fleet_recovery.when_lost(not lane.recorded)} "
                                 "(its process and worker are gone)")

    def finish(self) -> None:
        """Every live lane told it is done and waited for, while a lane's idle timeout lasts (a lane
        told done ends within a second or two). Then one whose presence is gone is set Crashed (lost
        after its last member: the fleet's outcome stands); one never picked up is left to its own end."""
        live = self.live()
        for lane in live:
            release(self.fleet_run, lane.number)
        deadline = time.monotonic() + LANE_IDLE_S
        while live and time.monotonic() < deadline:
            states = self._states(live)
            for lane in live:
                lane.ended = (state := states.get(lane.run_id)) is not None and state.is_final()
            if live := [lane for lane in live if not lane.ended]:
                time.sleep(POLL_S)
        watched = {lane.run_id: [lane.presence] for lane in live if lane.presence in self.by_name}
        seen, unknown = fleet_recovery.look(watched, self.by_name)
        gone = set(watched) - seen - unknown
        for lane in live:
            lane.ended = True
            if lane.run_id in gone:
                fleet_recovery.recover(self.environment, lane.run_id, [], self.by_name, None, lane.lease)
        if live := [lane for lane in live if lane.run_id not in gone]:
            get_run_logger().warning("lane(s) %s did not end when told to: left to their idle timeout",
                                     ", ".join(str(lane.number) for lane in live))

    def forget(self) -> None:
        """This run's lane variables, unset."""
        for number in range(1, self.numbered + 1):
            forget_lane(self.fleet_run, number)

    def where(self, name: str) -> str:
        member = self.by_name[name]
        try:
            return revisions.shown(phases.current_revision(member.target, self.settings))
        except DbMigrateError as exc:
            return f"unknown ({exc})"
