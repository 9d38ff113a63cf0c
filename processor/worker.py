"""The worker loop: take a fair share of the partitions, read each one's events in commit-safe order, apply.

One active worker per partition, by a session advisory lock held on the connection that writes:
if the worker dies, its connection closes, its locks go, and the other workers take its partitions
within their standby interval. Any number of workers share the partitions (README: "Scaling out").
The checkpoint row lock (processor.batch) fences anything the advisory lock cannot see.
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

from processor import fold_config, rebase, schema_check, store
from processor.batch import (
    BatchResult,
    FencedError,
    FoldConfigChangedError,
    FoldContext,
    apply_batch,
    refold_dirty_jobs,
)
from processor.database import DatabaseUrl, check_direct_session, connect, redact, session_lost
from processor.errors import ConfigurationError, ConsumerBusyError, PartitionMissingError
from processor.fold_config import FoldConfig
from processor.metrics import WorkerMetrics
from processor.migrate import check_ready
from processor.settings import Settings, Wakeup
from processor.snapshot import Cursor
from processor.store import Connection
from processor.wakeup import Waiter
from processor.watchdog import CallWatchdog

log = logging.getLogger(__name__)


class PartitionCountError(ConfigurationError):
    """OUTBOX_PARTITIONS differs from the database's partition count."""


class _Outcome(Enum):
    IDLE = "nothing to apply right now"
    CAUGHT_UP = "applied everything that was committed"
    MORE = "more work may be waiting"


@dataclass
class _LoopState:
    cursor: Cursor
    dirty: bool = False  # jobs wait in outbox_dirty_jobs to be folded
    probe: bool = True  # check for events before opening a batch transaction
    retry_at: float | None = None  # monotonic time when a job whose row was locked is due again


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
        self.active = threading.Event()  # set while this worker holds at least one partition
        self.connected = threading.Event()  # set while a session is up (the health endpoint)
        self.metrics = metrics
        self.waiter = Waiter(self._stopping)  # the wait between polls (processor/wakeup.py)
        self._owned: dict[int, _LoopState] = {}  # the partitions this worker holds, and where each is
        self._claim_offset = random.randrange(1 << 16)
        self._announced = False  # the standby message was logged
        self._config: FoldConfig | None = None  # the database's, loaded with each session
        # The schema's problems found at the last check (processor/schema_check.py): /health
        # answers 503 while there is one.
        self.schema_problems: list[str] = []
        # For the health of a WorkerService (processor/service.py), read from other threads: each
        # is replaced whole, never changed in place.
        self.partitions: tuple[int, ...] = ()  # the partitions held (start-up checks done)
        self.ready = threading.Event()  # set from a session's first rebalance to its end: active or standby
        self.sessions = 0  # sessions that got as far as their first rebalance
        self.last_error: str | None = None  # why the last session failed (password removed)

    def stop(self) -> None:
        """Ask the loop to finish the batch in hand and return."""
        self._stopping.set()
        self.waiter.wake()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def run(self, *, until_idle: bool = False) -> WorkerStats:
        """Process until stopped (or, with ``until_idle``, until nothing more can be processed now).

        A lost or refused connection is retried with capped exponential backoff and jitter (not
        with ``until_idle``: a one-shot run reports it and fails), and ``stop()`` during that wait
        returns normally; any other error (bad settings, unmigrated schema) stops the worker.
        """

        def gave_up(state: tenacity.RetryCallState) -> None:
            # Stopped while the database was away: a stop, not a failure (exit 0, nothing to re-raise).
            # A one-shot run reports the error.
            if until_idle or not self._stopping.is_set():
                assert state.outcome is not None
                state.outcome.result()  # raises it

        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception(session_lost),
            wait=self._backoff,
            stop=lambda _state: until_idle or self._stopping.is_set(),
            sleep=self._sleep,
            before_sleep=self._log_retry,
            retry_error_callback=gave_up,
        )
        try:
            for attempt in retrying:
                with attempt:
                    self._session(until_idle)
        finally:
            self.waiter.close()
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
        self.last_error = message
        log.warning("database unavailable (%s); reconnecting in %.1f s", message, wait)

    def _session(self, until_idle: bool) -> None:
        """One connection's life: check, take a share of the partitions, process them."""
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
                    self._partition_count(conn)  # the settings match the database
                    self._load_config(conn)
                    store.members_join(conn)
                    if settings.wakeup is Wakeup.NOTIFY:
                        self.waiter.listen(conn)  # before the first batch: what commits after it notifies
                self.connected.set()
                try:
                    self._serve(conn, until_idle, watchdog)
                    # Released here rather than left to the server when the connection closes: a
                    # worker started right after this one must not find the locks still held.
                    with watchdog.guard(conn):
                        for partition in list(self._owned):
                            self._release(conn, partition)
                finally:
                    for partition in list(self._owned):
                        self._forget(partition)
        finally:
            self.connected.clear()
            self.ready.clear()
            watchdog.stop()

    def _load_config(self, conn: Connection) -> FoldConfig:
        """The database's fold configuration, checked against this process's own settings."""
        config = fold_config.load(conn)
        fold_config.check_setting(config, self.settings.pipeline_steps, self.settings.failure_policy)
        if self._config is not None and self._config.version != config.version:
            log.info("fold configuration changed: %s", config.describe())
        self._config = config
        return config

    def _partition_count(self, conn: Connection) -> int:
        """The database's partition count, checked against OUTBOX_PARTITIONS and OUTBOX_PARTITION."""
        count = store.partitions_get(conn)
        expected = self.settings.partitions
        if expected is not None and expected != count:
            raise PartitionCountError(
                f"the database has {count} partition{'s' if count != 1 else ''} but OUTBOX_PARTITIONS is {expected}: "
                f"run `outbox repartition {expected}` or set OUTBOX_PARTITIONS={count}"
            )
        pinned = self.settings.partition
        if pinned is not None and pinned >= count:
            raise PartitionMissingError(pinned)
        return count

    def _serve(self, conn: Connection, until_idle: bool, watchdog: CallWatchdog) -> None:
        """The loop: rebalance now and then, one step per owned partition, wait when idle."""
        settings = self.settings
        next_rebalance = 0.0
        interval = settings.poll_interval_min
        while not self._stopping.is_set():
            if time.monotonic() >= next_rebalance:
                self._rebalance(conn, until_idle, watchdog)
                next_rebalance = time.monotonic() + settings.standby_interval
                if not self.ready.is_set():
                    self.sessions += 1
                    self.ready.set()
            outcomes = {self._step_partition(conn, watchdog, p) for p in sorted(self._owned) if not self.stopping}
            if _Outcome.MORE in outcomes:
                interval = settings.poll_interval_min
                continue  # more work may be waiting: go on at once
            if outcomes == {_Outcome.IDLE}:
                if until_idle:
                    return
                interval = min(interval * 2, settings.poll_interval_max)
            elif outcomes:
                interval = settings.poll_interval_min
            # Owning nothing (a standby), it waits for the next rebalance.
            wait = interval if outcomes else settings.standby_interval
            self.waiter.wait(max(0.0, min(wait, next_rebalance - time.monotonic())))

    def _rebalance(self, conn: Connection, until_idle: bool, watchdog: CallWatchdog) -> None:
        """Claim this worker's fair share of the partitions, or release what is beyond it.

        The share is ceil(partitions / live workers), the workers being the sessions that hold the
        membership lock: a worker that joins makes the others release partitions, one that dies
        (its session ends) leaves its partitions to be claimed, each within a standby interval.
        With ``until_idle`` (a one-off run) it claims every partition free now.
        """
        settings = self.settings
        with watchdog.guard(conn):
            self._check_schema(conn)
            count = self._partition_count(conn)
            for partition in [p for p in self._owned if p >= count]:
                log.info("partition %s no longer exists (repartitioned); released", partition)
                self._release(conn, partition)
            if settings.partition is not None:
                candidates, share = [settings.partition], 1
            else:
                candidates = list(range(count))
                share = count if until_idle else -(-count // max(1, store.members_count(conn)))
            for partition in sorted(self._owned)[share:]:
                log.info("releasing partition %s to a worker that joined (share: %s)", partition, share)
                self._release(conn, partition)
            claimed: list[int] = []
            # Each worker tries the partitions from its own starting point, so that workers starting
            # together do not all race for the same ones.
            start = self._claim_offset % len(candidates)
            for partition in candidates[start:] + candidates[:start]:
                if len(self._owned) + len(claimed) >= share:
                    break
                if partition not in self._owned and store.consumer_lock_try(conn, partition):
                    claimed.append(partition)
            # Jobs queued by an operation (a replay during a catch-up, a job row it found locked).
            for partition, state in self._owned.items():
                if not state.dirty and state.retry_at is None and store.dirty_jobs_exist(conn, partition):
                    state.dirty = True
        for partition in claimed:
            try:
                self._owned[partition] = self._prepare(conn, partition, watchdog)
            except PartitionMissingError:  # removed by a repartition since the count was read
                with watchdog.guard(conn):
                    store.consumer_lock_release(conn, partition)
                continue
            self.partitions = tuple(sorted(self._owned))
            log.info("active consumer of partition %s (pid %s)", partition, os.getpid())
            self._failures = 0
            self.active.set()
            if self.metrics is not None:
                self.metrics.set_active(partition, True)
        if not self._owned:
            self._announce_standby(conn, until_idle, watchdog)

    def _check_schema(self, conn: Connection) -> None:
        """Log each problem of the schema once, when it appears and when it is gone (every standby interval)."""
        report = schema_check.report(conn)
        found = report.problems()
        for problem in found:
            if problem not in self.schema_problems:
                log.error("%s", problem)
        if self.schema_problems and not found:
            log.info("the schema's problems are gone: the product's triggers are in place, no legacy writer")
        self.schema_problems = found
        if self.metrics is not None:
            self.metrics.on_schema_check(report)

    def health_problems(self) -> list[str]:
        """What is wrong, for /health (empty: healthy): no connection, or the schema's problems."""
        return ([] if self.connected.is_set() else ["not connected to the database"]) + list(self.schema_problems)

    def _announce_standby(self, conn: Connection, until_idle: bool, watchdog: CallWatchdog) -> None:
        with watchdog.guard(conn):
            holders = store.consumer_lock_holders(conn)
        held = ", ".join(f"{p} by pid {h.pid} ({h.application_name})" for p, h in sorted(holders.items()))
        if until_idle:
            pinned = self.settings.partition
            if pinned is not None:
                holder = holders.get(pinned)
                who = f"pid {holder.pid} ({holder.application_name})" if holder else "another session"
                raise ConsumerBusyError(f"partition {pinned} is being processed by {who}; not waiting")
            raise ConsumerBusyError(f"every partition is being processed by other workers ({held}); not waiting")
        if not self._announced:
            log.info("standby: no partition free (held: %s)", held or "none")
            self._announced = True

    def _prepare(self, conn: Connection, partition: int, watchdog: CallWatchdog) -> _LoopState:
        """A partition just claimed: resume from its checkpoint (rebasing it after a restore)."""
        ctx = self._context(partition)
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
            # Flagged jobs are folded again when a partition is taken (the pipeline may have been fixed).
            store.dirty_jobs_add_flagged(conn, partition)
            return self._load_state(conn, partition)

    def _load_state(self, conn: Connection, partition: int) -> _LoopState:
        state = _LoopState(store.checkpoint_get(conn, partition).cursor)
        state.dirty = store.dirty_jobs_exist(conn, partition)
        return state

    def _release(self, conn: Connection, partition: int) -> None:
        store.consumer_lock_release(conn, partition)
        self._forget(partition)

    def _forget(self, partition: int) -> None:
        self._owned.pop(partition, None)
        self.partitions = tuple(sorted(self._owned))
        if self.metrics is not None:
            self.metrics.set_active(partition, False)
        if not self._owned:
            self.active.clear()
            self._announced = False

    def _context(self, partition: int) -> FoldContext:
        assert self._config is not None
        return FoldContext(partition, self._config)

    def _step_partition(self, conn: Connection, watchdog: CallWatchdog, partition: int) -> _Outcome:
        """One step for one partition, each watched for a dead connection."""
        try:
            with watchdog.guard(conn):
                return self._step(conn, self._context(partition), self._owned[partition])
        except FoldConfigChangedError as exc:
            # `outbox pipeline set`: fold with the new configuration (it queued every job to be
            # folded again), unless this process was told another one.
            log.info("%s; reloading it", exc)
            with watchdog.guard(conn):
                self._load_config(conn)
                self._owned[partition] = self._load_state(conn, partition)
            return _Outcome.MORE
        except FencedError as exc:
            # Another consumer got past the advisory lock (a pooler?), or `outbox repartition`
            # moved the checkpoint: back off, then resume from where the checkpoint is now.
            log.warning("%s; reloading it", exc)
            self._stopping.wait(self.settings.poll_interval_max)
            with watchdog.guard(conn):
                self._owned[partition] = self._load_state(conn, partition)
            return _Outcome.MORE
        except (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure) as exc:
            # A deadlock PostgreSQL broke by rolling this batch back (an application transaction
            # that holds a job and waits for rows this batch wrote): nothing was applied; again.
            log.warning("batch of partition %s rolled back (%s); trying it again", partition, exc.sqlstate)
            self._stopping.wait(self.settings.poll_interval_max)
            with watchdog.guard(conn):
                self._owned[partition] = self._load_state(conn, partition)
            return _Outcome.MORE
        except PartitionMissingError:
            log.info("partition %s no longer exists (repartitioned); released", partition)
            with watchdog.guard(conn):
                self._release(conn, partition)
            return _Outcome.MORE

    def _step(self, conn: Connection, ctx: FoldContext, state: _LoopState) -> _Outcome:
        """Fold dirty jobs when caught up, else apply the next batch."""
        batch_size = self.settings.batch_size
        cursor = state.cursor
        if state.retry_at is not None and time.monotonic() >= state.retry_at:
            state.dirty, state.retry_at = True, None  # a job whose row was locked is due again
        if state.dirty and cursor.target is None:
            refolded = refold_dirty_jobs(conn, ctx, cursor=cursor, limit=batch_size)
            self.stats.jobs_changed += refolded.jobs_changed
            if self.metrics is not None:
                self.metrics.on_jobs_changed(ctx.partition, refolded.job_statuses)
            state.dirty = refolded.taken == batch_size
            if refolded.next_retry_in is not None:
                state.retry_at = time.monotonic() + max(0.0, refolded.next_retry_in)
            if refolded.taken:
                return _Outcome.MORE
            # None was ready (the rest wait for a locked row): on to the events.
        # When idle, a read-only check first: a batch transaction locks the checkpoint row.
        if state.probe and cursor.target is None and not store.events_probe(conn, ctx.partition, cursor):
            store.transitions_append(conn)  # holds' staged transitions, when no batch publishes them
            if self.metrics is not None:
                self.metrics.caught_up(ctx.partition)
            return _Outcome.IDLE
        started = time.monotonic()
        result = apply_batch(
            conn, ctx, expected=cursor, limit=batch_size, dirty=state.dirty, before_commit=self.before_commit
        )
        state.cursor = result.cursor
        state.dirty = result.deferred
        state.probe = result.complete  # after a full batch, more is surely waiting
        if result.events:
            self._record(result, time.monotonic() - started)
        if not result.complete or result.deferred:
            return _Outcome.MORE
        return _Outcome.CAUGHT_UP if result.events else _Outcome.IDLE

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
