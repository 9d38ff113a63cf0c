"""The worker loop: hold the partition's consumer lock, read events in commit-safe order, apply.

One active worker per partition, by a session advisory lock held on the connection that writes:
if the worker dies, its connection closes, the lock goes, and a standby takes over within its
standby interval. The checkpoint row lock (processor.batch) fences anything the advisory lock
cannot see.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass

import psycopg
import tenacity

from processor import store
from processor.batch import BatchResult, FencedError, apply_batch
from processor.database import DatabaseUrl, connect, redact
from processor.errors import ConfigurationError, ConsumerBusyError
from processor.migrate import check_ready
from processor.settings import Settings
from processor.store import Connection

log = logging.getLogger(__name__)


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
    ) -> None:
        self.settings = settings
        self.db = db
        self.on_batch = on_batch
        self.before_commit = before_commit
        self.stats = WorkerStats()
        self._stopping = threading.Event()
        self.active = threading.Event()  # set while this worker holds the consumer lock

    def stop(self) -> None:
        """Ask the loop to finish the batch in hand and return."""
        self._stopping.set()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def run(self, *, until_idle: bool = False) -> WorkerStats:
        """Process until stopped (or, with ``until_idle``, until nothing more can be processed now).

        A lost or refused connection is retried with capped exponential backoff and jitter; any
        other error (bad settings, unmigrated schema) stops the worker.
        """
        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(psycopg.OperationalError),
            wait=tenacity.wait_exponential(multiplier=0.2, max=10) + tenacity.wait_random(0, 0.5),
            stop=lambda _state: self._stopping.is_set(),
            sleep=self._stopping.wait,
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

    def _log_retry(self, state: tenacity.RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        wait = state.next_action.sleep if state.next_action else 0
        message = redact(str(exc).strip().splitlines()[0] if exc else "?", self.db)
        log.warning("database unavailable (%s); reconnecting in %.1f s", message, wait)

    def _session(self, until_idle: bool) -> None:
        """One connection's life: check, become the active consumer, then process."""
        with connect(self.db, application_name=application_name()) as conn:
            check_ready(conn)
            self._check_pipeline(conn)
            if not self._acquire(conn, until_idle):
                return
            try:
                self._process(conn, until_idle)
            finally:
                self.active.clear()

    def _check_pipeline(self, conn: Connection) -> None:
        unknown = store.variant_states_unknown_steps(conn, self.settings.pipeline_steps)
        if unknown:
            raise ConfigurationError(
                f"variants are at step(s) {', '.join(unknown)}, which OUTBOX_PIPELINE_STEPS "
                f"({','.join(self.settings.pipeline_steps)}) does not list; add them where they belong"
            )

    def _acquire(self, conn: Connection, until_idle: bool) -> bool:
        partition = self.settings.partition
        announced = False
        while not self._stopping.is_set():
            if store.consumer_lock_try(conn, partition):
                log.info("active consumer of partition %s (pid %s)", partition, os.getpid())
                self.active.set()
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

    def _process(self, conn: Connection, until_idle: bool) -> None:
        settings = self.settings
        partition = settings.partition
        pipeline = settings.pipeline
        position = store.checkpoint_get(conn, partition).position
        interval = settings.poll_interval_min
        while not self._stopping.is_set():
            # Read outside the batch transaction: events below the snapshot's xmin never change,
            # and apply_batch re-checks the checkpoint under its row lock before writing.
            events = store.events_fetch(conn, partition, position, settings.batch_size)
            if not events:
                if until_idle:
                    return
                interval = min(interval * 2, settings.poll_interval_max)
                self._stopping.wait(interval)
                continue
            try:
                result = apply_batch(
                    conn,
                    partition=partition,
                    expected=position,
                    events=events,
                    pipeline=pipeline,
                    policy=settings.failure_policy,
                    before_commit=self.before_commit,
                )
            except FencedError as exc:
                log.warning("%s; reloading the checkpoint", exc)
                position = store.checkpoint_get(conn, partition).position
                continue
            position = result.position
            self._record(result)
            interval = settings.poll_interval_min
            if len(events) < settings.batch_size:
                self._stopping.wait(interval)

    def _record(self, result: BatchResult) -> None:
        self.stats.events += result.events
        self.stats.batches += 1
        self.stats.jobs_changed += result.jobs_changed
        self.stats.dead_letters += result.dead_letters
        log.debug("applied %s events, %s jobs changed", result.events, result.jobs_changed)
        if self.on_batch is not None:
            self.on_batch(result)
