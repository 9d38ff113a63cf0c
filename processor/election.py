"""Cluster-wide periodic work, done by one elected worker.

Some work is for the whole cluster, not for one partition: the scans behind the pending-work gauges
(processor/metrics.py), dropping old throughput counts. Every worker tries, on a session of its own
(the metrics refresh connection, or its main session), a session advisory lock whose key names the duty
(store.ClusterDuty, in store.ELECTION_LOCK_CLASS). The one that holds it does the duty; the others try
again at their next turn and take over within one turn when the holder's session ends (it dies, it
stops, its connection is cut). No table, no heartbeat: the server ends the lock with the session.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from processor import store, testsignal
from processor.store import ClusterDuty, Connection
from processor.testsignal import Signal

log = logging.getLogger(__name__)


class Election:
    """Whether this process does ``duty`` on a given session: it holds the duty's lock on it."""

    def __init__(self, duty: ClusterDuty) -> None:
        self.duty = duty
        self._conn: Connection | None = None  # the session last tried on
        self.elected = False

    def holds(self, conn: Connection) -> bool:
        """Whether ``conn``'s session holds the duty, trying to take it if not (once per try: a session lock stacks)."""
        if conn is not self._conn:  # a new session: the old one's lock went with it
            self._conn, self.elected = conn, False
        if not self.elected:
            self.elected = store.election_lock_try(conn, self.duty)
            if self.elected:
                log.debug("elected for %s", self.duty.name.lower())
        return self.elected

    def forget(self) -> None:
        """The session is gone (its lock with it)."""
        self._conn, self.elected = None, False


class PeriodicDuty:
    """``work`` every ``every`` seconds, by whichever worker holds the duty's election."""

    def __init__(self, duty: ClusterDuty, every: float, work: Callable[[Connection], object]) -> None:
        self.election = Election(duty)
        self.every = every
        self._work = work
        self._due = 0.0  # monotonic time of the next run (at once, once elected)

    def run_if_due(self, conn: Connection) -> bool:
        """Do the work on ``conn`` if it is due and this session is elected for it; whether it ran."""
        if time.monotonic() < self._due or not self.election.holds(conn):
            return False
        self._work(conn)
        self._due = time.monotonic() + self.every
        testsignal.emit(Signal.CLUSTER_DUTY_DONE, duty=self.election.duty, session=conn.info.backend_pid)
        return True


# How often the elected worker drops the throughput counts older than a day (`outbox backlog` reads the
# last minute's): often enough that the table stays a day's size, rarely enough to cost nothing.
THROUGHPUT_PRUNE_EVERY = 600.0


def throughput_pruning() -> PeriodicDuty:
    return PeriodicDuty(ClusterDuty.THROUGHPUT_PRUNE, THROUGHPUT_PRUNE_EVERY, store.throughput_prune)
