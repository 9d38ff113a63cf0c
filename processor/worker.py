"""The worker loop: take a fair share of the partitions, read each one's events in commit-safe order, apply.

One active worker per partition, by a session advisory lock held on the connection that writes:
if the worker dies, its connection closes, its locks go, and the other workers take its partitions
within their standby interval. Any number of workers share the partitions (docs/design.md: "Scaling out").
The checkpoint row lock (processor.batch) fences anything the advisory lock cannot see.

Each turn (every standby interval) rebalances, then takes each partition claimed through its life
(processor/partition.py: claimed, checking, rebasing if it must, ready; releasing when it goes), then does
the cluster's periodic upkeep if this worker is elected for it (processor/election.py). Each step emits a
test signal (processor/testsignal.py): in-process tests wait on those rather than poll.
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

from processor import fold_config, schema_check, store, testsignal
from processor.batch import (
    BatchResult,
    FoldContext,
    apply_batch,
    fold_awaiting_jobs,
)
from processor.database import DatabaseUrl, check_direct_session, connect, redact, session_lost
from processor.election import PeriodicDuty, throughput_pruning
from processor.errors import (
    ConsumerBusyError,
    FencedError,
    FoldConfigChangedError,
    PartitionCountError,
    PartitionMissingError,
)
from processor.fold_config import FoldConfig
from processor.metrics import WorkerMetrics
from processor.migrate import check_ready, check_window
from processor.partition import Partition, Progress
from processor.rebase import Need
from processor.settings import Settings, Wakeup
from processor.store import Connection
from processor.testsignal import Signal
from processor.wakeup import Waiter
from processor.watchdog import CallWatchdog

log = logging.getLogger(__name__)


class _Outcome(Enum):
    IDLE = "nothing to apply right now"
    CAUGHT_UP = "applied everything that was committed"
    MORE = "more work may be waiting"


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
        self._owned: dict[int, Partition] = {}  # the partitions this worker holds, ready (processor/partition.py)
        self._duties: list[PeriodicDuty] = [throughput_pruning()]  # cluster-wide, when elected (processor/election.py)
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
        retention = self._start_retention(until_idle)
        try:
            for attempt in retrying:
                with attempt:
                    self._session(until_idle)
        finally:
            self.waiter.close()
            if retention is not None:
                self._stopping.set()  # it waits on the same event
                retention.join()
        return self.stats

    def _start_retention(self, until_idle: bool) -> threading.Thread | None:
        """OUTBOX_RETENTION: rounds of retention while this worker runs, done by the one worker of the
        cluster elected for them, in a thread and on a connection of their own (processor/retention.py).
        A one-off run (until_idle) leaves them to the workers that stay."""
        if self.settings.retention is None or until_idle:
            return None
        from processor.retention import run_retention

        thread = threading.Thread(
            target=run_retention,
            args=(self.db, self.settings.retention, self._stopping),
            name="outbox-retention",
            daemon=True,
        )
        thread.start()
        return thread

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
                    for duty in self._duties:
                        duty.election.forget()  # its lock goes with the session
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
                self._turn(conn, until_idle, watchdog)
                next_rebalance = time.monotonic() + settings.standby_interval
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

    def _turn(self, conn: Connection, until_idle: bool, watchdog: CallWatchdog) -> None:
        """Every standby interval: rebalance, make what was claimed ready, do the cluster's duties if elected."""
        claimed = self._rebalance(conn, until_idle, watchdog)
        for partition in claimed:
            self._take(conn, partition, watchdog)
        if not self._owned:
            self._announce_standby(conn, until_idle, watchdog)
        # A one-off run (until_idle) leaves the cluster's upkeep to the workers that stay.
        if not until_idle:
            with watchdog.guard(conn):
                for duty in self._duties:
                    duty.run_if_due(conn)
        if not self.ready.is_set():
            self.sessions += 1
            self.ready.set()
            testsignal.emit(Signal.SESSION_READY, worker=self, partitions=self.partitions)

    def _rebalance(self, conn: Connection, until_idle: bool, watchdog: CallWatchdog) -> list[Partition]:
        """Claim this worker's fair share of the partitions, or release what is beyond it; the ones claimed.

        The share is ceil(partitions / live workers), the workers being the sessions that hold the
        membership lock: a worker that joins makes the others release partitions, one that dies
        (its session ends) leaves its partitions to be claimed, each within a standby interval.
        With ``until_idle`` (a one-off run) it claims every partition free now.
        """
        with watchdog.guard(conn):
            self._check_schema(conn)
            count = self._partition_count(conn)
            for partition in [p for p in self._owned if p >= count]:
                log.info("partition %s no longer exists (repartitioned); released", partition)
                self._release(conn, partition)
            candidates, share = self._fair_share(conn, count, until_idle)
            for partition in sorted(self._owned)[share:]:
                log.info("releasing partition %s to a worker that joined (share: %s)", partition, share)
                self._release(conn, partition)
            claimed = self._claim(conn, candidates, share)
            self._notice_queued_jobs(conn)
        return claimed

    def _fair_share(self, conn: Connection, count: int, until_idle: bool) -> tuple[list[int], int]:
        """The partitions this worker may claim, and how many it should hold."""
        if self.settings.partition is not None:
            return [self.settings.partition], 1
        share = count if until_idle else -(-count // max(1, store.members_count(conn)))
        return list(range(count)), share

    def _claim(self, conn: Connection, candidates: list[int], share: int) -> list[Partition]:
        """Take free partitions among ``candidates`` until this worker holds ``share`` of them."""
        claimed: list[Partition] = []
        # Each worker tries the partitions from its own starting point, so that workers starting
        # together do not all race for the same ones.
        start = self._claim_offset % len(candidates)
        for number in candidates[start:] + candidates[:start]:
            if len(self._owned) + len(claimed) >= share:
                break
            if number not in self._owned and (partition := Partition.claim(conn, number, owner=self)):
                claimed.append(partition)
        return claimed

    def _notice_queued_jobs(self, conn: Connection) -> None:
        """Jobs queued by an operation (a replay during a catch-up, a job row it found locked)."""
        for partition in self._owned.values():
            progress = partition.progress
            if (
                not progress.awaiting_fold
                and progress.retry_at is None
                and store.jobs_awaiting_fold_exist(conn, partition.number)
            ):
                progress.awaiting_fold = True

    def _take(self, conn: Connection, partition: Partition, watchdog: CallWatchdog) -> None:
        """A partition just claimed: check it, rebase it if it must, make it ready (or let it go if removed)."""
        try:
            with watchdog.guard(conn):
                need = partition.check(conn)
            if need is not Need.NOTHING:
                # Not under the watchdog: rebuilding every job may take longer than one call's deadline
                # (each statement still has its statement_timeout).
                partition.rebase(conn, self._context(partition.number))
            with watchdog.guard(conn):
                partition.make_ready(conn)
        except PartitionMissingError:  # removed by a repartition since the count was read
            with watchdog.guard(conn):
                partition.release(conn)
            return
        self._owned[partition.number] = partition
        self.partitions = tuple(sorted(self._owned))
        log.info("active consumer of partition %s (pid %s)", partition.number, os.getpid())
        self._failures = 0
        self.active.set()
        if self.metrics is not None:
            self.metrics.set_active(partition.number, True)
        testsignal.emit(Signal.PARTITION_READY, worker=self, partition=partition.number)

    def _check_schema(self, conn: Connection) -> None:
        """Every standby interval: stop (SchemaError, one line, as at start-up) when a migration applied
        since no longer serves this worker's version; log each problem of the schema once, when it
        appears and when it is gone."""
        check_window(conn)
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

    @property
    def elected_duties(self) -> list[store.ClusterDuty]:
        """The cluster-wide duties this worker's session is elected for (processor/election.py)."""
        return [duty.election.duty for duty in self._duties if duty.election.elected]

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

    def _release(self, conn: Connection, partition: int) -> None:
        self._owned[partition].release(conn)
        self._forget(partition)

    def _forget(self, partition: int) -> None:
        held = self._owned.pop(partition, None)
        self.partitions = tuple(sorted(self._owned))
        if self.metrics is not None:
            self.metrics.set_active(partition, False)
        if not self._owned:
            self.active.clear()
            self._announced = False
        if held is not None:
            held.forget()  # released, or gone with the session (signalled once the health shows it)

    def _context(self, partition: int) -> FoldContext:
        assert self._config is not None
        return FoldContext(partition, self._config)

    def _step_partition(self, conn: Connection, watchdog: CallWatchdog, partition: int) -> _Outcome:
        """One step for one partition, each watched for a dead connection."""
        try:
            with watchdog.guard(conn):
                return self._step(conn, self._context(partition), self._owned[partition].progress)
        except FoldConfigChangedError as exc:
            # `outbox pipeline set`: fold with the new configuration (it queued every job to be
            # folded again), unless this process was told another one.
            log.info("%s; reloading it", exc)
            with watchdog.guard(conn):
                self._load_config(conn)
                self._owned[partition].reload(conn)
            return _Outcome.MORE
        except FencedError as exc:
            # Another consumer got past the advisory lock (a pooler?), or `outbox repartition`
            # moved the checkpoint: back off, then resume from where the checkpoint is now.
            log.warning("%s; reloading it", exc)
            self._stopping.wait(self.settings.poll_interval_max)
            with watchdog.guard(conn):
                self._owned[partition].reload(conn)
            return _Outcome.MORE
        except (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure) as exc:
            # A deadlock PostgreSQL broke by rolling this batch back (an application transaction
            # that holds a job and waits for rows this batch wrote): nothing was applied; again.
            log.warning("batch of partition %s rolled back (%s); trying it again", partition, exc.sqlstate)
            self._stopping.wait(self.settings.poll_interval_max)
            with watchdog.guard(conn):
                self._owned[partition].reload(conn)
            return _Outcome.MORE
        except PartitionMissingError:
            log.info("partition %s no longer exists (repartitioned); released", partition)
            with watchdog.guard(conn):
                self._release(conn, partition)
            return _Outcome.MORE

    def _step(self, conn: Connection, ctx: FoldContext, state: Progress) -> _Outcome:
        """Fold the jobs awaiting fold when caught up, else apply the next batch."""
        batch_size = self.settings.batch_size
        cursor = state.cursor
        if state.retry_at is not None and time.monotonic() >= state.retry_at:
            state.awaiting_fold, state.retry_at = True, None  # a job whose row was locked is due again
        if state.awaiting_fold and cursor.target is None:
            refolded = fold_awaiting_jobs(conn, ctx, cursor=cursor, limit=batch_size)
            self.stats.jobs_changed += refolded.jobs_changed
            if self.metrics is not None:
                self.metrics.on_jobs_changed(ctx.partition, refolded.job_statuses)
            state.awaiting_fold = refolded.taken == batch_size
            if refolded.next_retry_in is not None:
                state.retry_at = time.monotonic() + max(0.0, refolded.next_retry_in)
            # A signal means "done and visible": emitted after the state and stats are recorded.
            testsignal.emit(Signal.JOBS_REFOLDED, worker=self, partition=ctx.partition, jobs=refolded.taken)
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
            conn,
            ctx,
            expected=cursor,
            limit=batch_size,
            awaiting_fold=state.awaiting_fold,
            before_commit=self.before_commit,
        )
        state.cursor = result.cursor
        state.awaiting_fold = result.awaiting_fold
        state.probe = result.complete  # after a full batch, more is surely waiting
        if result.events:
            self._record(result, time.monotonic() - started)
        # After the cursor and stats are recorded, so a waiter sees them (health().events).
        testsignal.emit(Signal.BATCH_COMMITTED, worker=self, partition=ctx.partition, events=result.events)
        if not result.complete or result.awaiting_fold:
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
