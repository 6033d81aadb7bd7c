"""A fleet lane's presence connection: how the fleet tells a lane lost with its process (its worker
SIGKILLed, its machine gone) from one at work, waiting for a slot, or idle (:mod:`flows.fleet_recovery`).

The lane holds it from the moment it takes its first member until it ends, on the server of the
member it migrates, waits for, or last migrated, and on that server's maintenance database
(``postgres``), not on the member's: a lane waiting for a slot of its server's cap is then not one
more session on a tenant database (what the caps count), and an idle lane keeps no tenant database
from being dropped. Where it cannot connect there (the member's role may not), it is on the
member's database.
"""

from __future__ import annotations

import contextvars
import threading
from contextlib import ExitStack

from prefect import get_run_logger
from sqlalchemy import Connection, text
from sqlalchemy.exc import SQLAlchemyError

from dbmigrate.errors import ConnectionFailed
from dbmigrate.fleet import Member
from flows import recovery
from flows.fleet_state import PRESENCE_CHECK_S

MAINTENANCE_DATABASE = "postgres"


class LanePresence:
    """The lane's presence connection (:func:`flows.recovery.presence_connection`). It moves
    make-before-break to the next member's server (the new one opened before the last one's is
    closed; kept where it was should the new one fail to open), and a thread of its own checks it
    every PRESENCE_CHECK_S and opens it again should its server have dropped it (a restart; every
    second while that fails): a lane alive is never long without one. The member records say where
    it is (``presence``: the member on whose server it is)."""

    def __init__(self):
        self.member: Member | None = None  # on whose server it is
        self._wanted: Member | None = None  # where it was last asked to be
        self._conn: Connection | None = None
        self._on_maintenance = False  # on the server's maintenance database, not the member's
        self._held = ExitStack()
        self._failing = False  # said once per outage, not at every attempt
        self._lock = threading.Lock()
        self._closed = threading.Event()
        # the run's context copied: the presence is named after the run, and its warnings go to its log
        self._checker = threading.Thread(target=contextvars.copy_context().run, args=(self._check,), daemon=True)
        self._checker.start()

    def move_to(self, member: Member) -> None:
        """Held on ``member``'s server, or where it was should that fail (with none yet, the checker
        tries ``member``'s again)."""
        with self._lock:
            self._wanted = member
            if self._conn is not None and self._on_maintenance and self.member.server == member.server:
                self.member = member  # the same server: the connection stays
            else:
                self._open(member)

    def where(self) -> str | None:
        """The member on whose server it is now, as a record says it."""
        member = self.member
        return member.name if member else None

    def _open(self, member: Member) -> bool:
        held = ExitStack()
        try:
            on_maintenance = self._connect(member, held)
        except ConnectionFailed as exc:
            if not self._failing:
                get_run_logger().warning("no presence connection on %s (%s): should this lane's process die now, "
                                         "the fleet cannot tell", member.server, exc)
            self._failing = True
            return False
        self._failing = False
        previous, self._held, self.member, self._on_maintenance = self._held, held, member, on_maintenance
        previous.close()
        return True

    def _connect(self, member: Member, held: ExitStack) -> bool:
        """Connected on the maintenance database (True), else on the member's (False)."""
        try:
            maintenance = member.target.with_database(MAINTENANCE_DATABASE)
            self._conn = held.enter_context(recovery.presence_connection(maintenance))
            return True
        except ConnectionFailed:
            self._conn = held.enter_context(recovery.presence_connection(member.target))
            return False

    def _check(self) -> None:
        wait = PRESENCE_CHECK_S
        while not self._closed.wait(wait):
            with self._lock:
                try:
                    wait = PRESENCE_CHECK_S if self._closed.is_set() or self._kept() else 1.0
                except Exception:  # the thread outlives any surprise: without it a live lane would look lost
                    get_run_logger().exception("checking the lane's presence connection failed")
                    wait = 1.0

    def _kept(self) -> bool:
        """Its connection answers, or was opened again (where it was, or where it was last asked to be)."""
        if self._conn is not None:
            try:
                self._conn.execute(text("SELECT 1"))
                self._conn.rollback()  # not left idle in a transaction
                return True
            except SQLAlchemyError:  # dropped by its server
                pass
        member = self.member or self._wanted
        return member is None or self._open(member)

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            self._held.close()
            self._conn = self.member = None
        self._checker.join()
