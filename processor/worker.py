"""The worker loop: hold the partition's consumer lock, read events in commit-safe order, apply.

One active worker per partition, by a session advisory lock held on the connection that writes:
if the worker dies, its connection closes, the lock goes, and a standby takes over within its
standby interval. The checkpoint row lock (processor.batch) fences anything the advisory lock
cannot see.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

import psycopg
import tenacity

from processor import rebase, store
from processor.batch import BatchResult, FencedError, FoldContext, apply_batch, refold_dirty_jobs
from processor.database import DatabaseUrl, check_direct_session, connect, redact
from processor.errors import ConsumerBusyError
from processor.metrics import WorkerMetrics
from processor.migrate import check_ready
from processor.settings import Settings
from processor.snapshot import Cursor, Position
from processor.store import Connection
from processor.watchdog import CallWatchdog

log = logging.getLogger(__name__)


class _Outcome(Enum):
    IDLE = "nothing to apply right now"
    CAUGHT_UP = "applied everything that was committed"
    MORE = "more work may be waiting"


@dataclass
class _LoopState:
    cursor: Cursor
    dirty: bool = False  # jobs wait in outbox_dirty_jobs to be folded


@dataclass
class WorkerStats:
    events: int = 0
    batches: int = 0
    jobs_changed: int = 0
    dead_letters: int = 0


def application_name(role: str = "worker") -> str:
    """How the worker shows in pg_stat_activity: role, host and pid, for `backlog` and operators."""
    return f"outbox-{role}:{socket.gethostname()[:30]}:{os.getpid()}"


class Worker:
    def __init__(
        self,
        settings: Settings,
        db: DatabaseUrl,
        *,
        on_batch: Callable[[BatchResult], None] | None = None,
        before_commit: Callable[[], None] | None = None,
        metrics: WorkerMetrics | None = None,
    ) -> None:
        self.settings = settings
        self.db = db
        self.on_batch = on_batch
        self.before_commit = before_commit
        self.stats = WorkerStats()
        self._stopping = threading.Event()
        self._failures = 0  # connection failures in a row, for the reconnect backoff
        self.active = threading.Event()  # set while this worker holds the consumer lock
        self.connected = threading.Event()  # set while a session is up (the health endpoint)
        self.metrics = metrics

    def stop(self) -> None:
        """Ask the loop to finish the batch in hand and return."""
        self._stopping.set()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def run(self, *, until_idle: bool = False) -> WorkerStats:
        """Process until stopped (or, with ``until_idle``, until nothing more can be processed now).

        A lost or refused connection is retried with capped exponential backoff and jitter (not
        with ``until_idle``: a one-shot run reports it and fails); any other error (bad settings,
        unmigrated schema) stops the worker.
        """
        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(psycopg.OperationalError),
            wait=self._backoff,
            stop=lambda _state: until_idle or self._stopping.is_set(),
            sleep=self._sleep,
            before_sleep=self._log_retry,
            reraise=True,
        )
        try:
            for attempt in retrying:
                with attempt:
                    self._session(until_idle)
        except tenacity.RetryError:
            pass  # stopped while waiting to reconnect
        return self.stats

    def _backoff(self, _state: tenacity.RetryCallState) -> float:
        """Capped exponential backoff with jitter, counted from the start of the current outage."""
        self._failures += 1
        return float(min(0.2 * 2.0 ** (self._failures - 1), 10.0) + random.uniform(0, 0.5))

    def _sleep(self, seconds: float) -> None:
        self._stopping.wait(seconds)  # a stop request cuts the backoff short

    def _log_retry(self, state: tenacity.RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        wait = state.next_action.sleep if state.next_action else 0
        message = redact(str(exc).strip().splitlines()[0] if exc else "?", self.db)
        log.warning("database unavailable (%s); reconnecting in %.1f s", message, wait)

    def _session(self, until_idle: bool) -> None:
        """One connection's life: check, become the active consumer, then process."""
        settings = self.settings
        # A call that gets no answer for this long is on a dead (half-open) connection.
        watchdog = CallWatchdog(settings.statement_timeout + 5)
        try:
            with connect(self.db, application_name=application_name()) as conn:
                with watchdog.guard(conn):
                    if not settings.allow_session_proxy:
                        check_direct_session(conn)  # a transaction pooler would break the consumer lock
                    store.session_configure(
                        conn, statement_timeout=settings.statement_timeout, session_timeout=settings.session_timeout
                    )
                    check_ready(conn)
                    store.checkpoint_get(conn, settings.partition)  # the partition exists
                self.connected.set()
                if not self._acquire(conn, until_idle, watchdog):
                    return
                try:
                    self._process(conn, until_idle, watchdog)
                    # Released here rather than left to the server when the connection closes: a
                    # worker started right after this one must not find the lock still held.
                    with watchdog.guard(conn):
                        store.consumer_lock_release(conn, settings.partition)
                finally:
                    self.active.clear()
                    if self.metrics is not None:
                        self.metrics.set_active(False)
        finally:
            self.connected.clear()
            watchdog.stop()

    def _acquire(self, conn: Connection, until_idle: bool, watchdog: CallWatchdog) -> bool:
        partition = self.settings.partition
        announced = False
        while not self._stopping.is_set():
            with watchdog.guard(conn):
                if store.consumer_lock_try(conn, partition):
                    log.info("active consumer of partition %s (pid %s)", partition, os.getpid())
                    self._failures = 0
                    self.active.set()
                    if self.metrics is not None:
                        self.metrics.set_active(True)
                    return True
                holder = store.consumer_lock_holder(conn, partition)
            who = f"pid {holder.pid} ({holder.application_name})" if holder else "another session"
            if until_idle:
                raise ConsumerBusyError(f"partition {partition} is being processed by {who}; not waiting")
            if not announced:
                log.info("standby: partition %s is held by %s", partition, who)
                announced = True
            self._stopping.wait(self.settings.standby_interval)
        return False

    def _process(self, conn: Connection, until_idle: bool, watchdog: CallWatchdog) -> None:
        """The loop: one step at a time (each watched for a dead connection), waiting between them."""
        settings = self.settings
        partition = settings.partition
        ctx = FoldContext(partition, settings.pipeline, settings.failure_policy)
        with watchdog.guard(conn):
            cursor = store.checkpoint_get(conn, partition).cursor
            from_elsewhere, rebuild_pending = rebase.check(conn, partition, cursor)
        # Not under the watchdog: rebuilding every job may take longer than one call's deadline
        # (each statement still has its statement_timeout).
        if from_elsewhere:
            rebase.rebase(conn, ctx)  # restored into another cluster: transaction ids started over
        elif rebuild_pending:
            rebase.rebuild(conn, ctx)  # an interrupted rebase
        with watchdog.guard(conn):
            state = _LoopState(store.checkpoint_get(conn, partition).cursor)
            # Flagged jobs are folded again at start-up (the pipeline setting may have been fixed).
            store.dirty_jobs_add_flagged(conn, partition)
            state.dirty = store.dirty_jobs_exist(conn, partition)
        interval = settings.poll_interval_min
        while not self._stopping.is_set():
            try:
                with watchdog.guard(conn):
                    outcome = self._step(conn, ctx, state)
            except FencedError as exc:
                # Another consumer got past the advisory lock (a pooler?): back off, then resume
                # from where it left the checkpoint.
                log.warning("%s; reloading it", exc)
                self._stopping.wait(settings.poll_interval_max)
                with watchdog.guard(conn):
                    state = _LoopState(store.checkpoint_get(conn, partition).cursor)
                    state.dirty = store.dirty_jobs_exist(conn, partition)
                continue
            if outcome is _Outcome.IDLE:
                if until_idle:
                    return
                interval = min(interval * 2, settings.poll_interval_max)
                self._stopping.wait(interval)
            elif outcome is _Outcome.CAUGHT_UP:
                interval = settings.poll_interval_min
                self._stopping.wait(interval)
            else:  # more work may be waiting: go on at once
                interval = settings.poll_interval_min

    def _step(self, conn: Connection, ctx: FoldContext, state: _LoopState) -> _Outcome:
        """Fold dirty jobs when caught up, else fetch and apply the next batch."""
        batch_size = self.settings.batch_size
        cursor = state.cursor
        if state.dirty and cursor.target is None:
            taken, changed = refold_dirty_jobs(conn, ctx, cursor=cursor, limit=batch_size)
            self.stats.jobs_changed += changed
            state.dirty = taken == batch_size
            return _Outcome.MORE
        # Read outside the batch transaction: what a committed transaction wrote never changes,
        # and apply_batch re-checks the checkpoint under its row lock.
        started = time.monotonic()
        events, target = store.events_fetch(conn, ctx.partition, cursor, batch_size)
        if not events:
            if cursor.target is None:
                return _Outcome.IDLE
            # A multi-batch catch-up ended exactly at a batch boundary: close it.
            new = cursor.caught_up_to(cursor.target)
            apply_batch(conn, ctx, expected=cursor, new=new, events=[], defer=True)
            state.cursor = new
            state.dirty = state.dirty or store.dirty_jobs_exist(conn, ctx.partition)
            return _Outcome.MORE
        assert target is not None
        complete = len(events) < batch_size
        if complete and cursor.target is not None and not state.dirty:
            # Closing a multi-batch catch-up: replay or retry may have queued jobs meanwhile.
            state.dirty = store.dirty_jobs_exist(conn, ctx.partition)
        new = cursor.caught_up_to(target) if complete else cursor.partway_to(target, Position.of(events[-1]))
        # Jobs are folded at once only when this batch is a whole catch-up; otherwise once it is
        # complete, so that no job shows a state between two committed snapshots.
        defer = state.dirty or not complete
        result = apply_batch(
            conn, ctx, expected=cursor, new=new, events=events, defer=defer, before_commit=self.before_commit
        )
        state.cursor = result.cursor
        state.dirty = defer
        self._record(result, time.monotonic() - started)
        return _Outcome.CAUGHT_UP if complete and not defer else _Outcome.MORE

    def _record(self, result: BatchResult, seconds: float) -> None:
        self.stats.events += result.events
        self.stats.batches += 1
        self.stats.jobs_changed += result.jobs_changed
        self.stats.dead_letters += result.dead_letters
        log.debug("applied %s events, %s jobs changed", result.events, result.jobs_changed)
        if self.metrics is not None:
            self.metrics.on_batch(result, seconds)
        if self.on_batch is not None:
            self.on_batch(result)
