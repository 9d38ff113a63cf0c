"""React to job transitions exactly once, in a thread or a process: ``outbox.Subscriber``.

>>> def on_transition(conn, transition):
...     if transition.to_status == "done":
...         conn.execute("INSERT INTO notifications (job_id) VALUES (%s)", (transition.job_id,))
>>> subscriber = outbox.Subscriber("notify-done", "postgresql://app@db/app", on_transition)
>>> subscriber.run()          # until subscriber.stop() (from another thread or a signal handler)
>>> with subscriber:          # or in a thread of its own: leaving the block stops it
...     serve_requests(health=subscriber.health)

The handler runs inside the transaction that moves the subscription's position (outbox.subscription
says what that guarantees). ``source`` is a database URL (the subscriber opens and reopens its own
connection), a psycopg ``Connection``, a SQLAlchemy ``Engine`` or ``Connection``; the handler gets
the same kind of connection (psycopg, or SQLAlchemy's) and must not commit it.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import sqlalchemy
from sqlalchemy.engine import Connection as SAConnection
from sqlalchemy.engine import Engine

from outbox.connections import Statement, execute
from outbox.errors import ArgumentTypeError, FencedError, LifecycleError, SubscriberBusyError
from outbox.subscription import (
    QUERIES,
    Consumer,
    Page,
    RetryPolicy,
    Transition,
    check_transactional,
    lock_params,
    page_params,
    single_value,
)
from processor.background import Background, StartsInBackground
from processor.wakeup import Waiter

Handler = Callable[[Any, Transition], None]
Source = str | psycopg.Connection[Any] | Engine | SAConnection


class _Session:
    """One connection of either kind, each statement in a transaction of its own unless inside ``transaction``."""

    def __init__(self, conn: psycopg.Connection[Any] | SAConnection) -> None:
        self.conn = conn
        self._in_transaction = False

    def fetch(self, name: str, params: dict[str, Any]) -> list[Any]:
        with self._statement():
            return execute(self.conn, Statement(QUERIES[name], params)).rows

    @contextlib.contextmanager
    def _statement(self) -> Iterator[None]:
        if self._in_transaction:
            yield
        else:
            with self.transaction():
                yield

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Any]:
        self._in_transaction = True
        try:
            if isinstance(self.conn, psycopg.Connection):
                with self.conn.transaction():
                    yield self.conn
            else:
                with self.conn.begin():
                    yield self.conn
        finally:
            self._in_transaction = False

    def psycopg_connection(self) -> psycopg.Connection[Any] | None:
        """The psycopg connection underneath, to wait for notifications on (None: another driver; poll)."""
        if isinstance(self.conn, psycopg.Connection):
            return self.conn
        driver = self.conn.connection.driver_connection
        return driver if isinstance(driver, psycopg.Connection) else None


class Subscriber(Consumer, StartsInBackground):
    """The consumer of one subscription: one active per name (the others stand by), handler called in order."""

    def __init__(
        self,
        name: str,
        source: Source,
        handler: Handler,
        *,
        batch_size: int = 100,
        poll_interval: float = 1.0,
        standby_interval: float = 5.0,
        retry: RetryPolicy | None = None,
        application_name: str = "outbox-subscriber",
        session_timeout: float = 60.0,
        per_transaction: int = 50,
    ) -> None:
        if not isinstance(source, str | psycopg.Connection | Engine | SAConnection):
            raise ArgumentTypeError(
                "source must be a database URL, a psycopg Connection, or a SQLAlchemy Engine or Connection "
                f"(got {type(source).__name__}); for asyncio use outbox.aio.AsyncSubscriber"
            )
        super().__init__(
            name, handler, batch_size=batch_size, poll_interval=poll_interval, standby_interval=standby_interval,
            retry=retry, application_name=application_name, session_timeout=session_timeout,
            per_transaction=per_transaction,
        )  # fmt: skip
        self._source = source
        self._stopping = threading.Event()
        self._waiter: Waiter | None = None
        self._background: Background | None = None

    # ----- running

    def run(self) -> None:
        """Deliver until ``stop()``: stand by while another consumer of the subscription is active."""
        self._stopping.clear()
        self._run()

    def _run(self) -> None:
        with self.tracking_run():
            self._loop(until_idle=False)

    def run_until_idle(self) -> int:
        """Deliver what there is now (waiting out the retries it needs), then return how many were handled.

        Raises if another consumer of the subscription is active.
        """
        self._stopping.clear()
        before = self.delivered
        with self.tracking_run():
            self._loop(until_idle=True)
        return self.delivered - before

    def start(self) -> None:
        """Deliver in a background thread until ``stop()``, then ``join()`` (or use ``with``)."""
        if self.running or (self._background is not None and not self._background.ended):
            raise LifecycleError(f"subscriber {self.name!r} is already running (one run per object)")
        self._stopping.clear()  # here, not in the thread: a stop() right after start() is kept
        self._background = Background(
            self._run, name=f"outbox-subscriber-{self.name}", on_error=lambda _: self.log_died()
        )
        self._background.start()

    def join(self, timeout: float | None = None) -> None:
        """Wait for the background thread to end; re-raise the error the subscriber died of.

        TimeoutError if it still runs after ``timeout`` seconds.
        """
        if self._background is None:
            raise LifecycleError(f"subscriber {self.name!r} was not started in the background (start, with)")
        self._background.join(timeout)

    def stop(self) -> None:
        """Finish the transition being handled, then return from ``run`` (safe from any thread or a signal handler)."""
        self._stopping.set()
        waiter = self._waiter
        if waiter is not None:
            waiter.wake()

    def _loop(self, *, until_idle: bool) -> None:
        while True:
            try:
                with self._session() as session, self.tracking_session():
                    self._serve(session, until_idle=until_idle)
                return
            except (psycopg.OperationalError, sqlalchemy.exc.OperationalError) as exc:
                # A connection the subscriber opened is opened again; the caller's own is the caller's.
                if isinstance(self._source, psycopg.Connection | SAConnection) or self._stopping.is_set():
                    raise
                self.log_reconnecting(exc)
                self._stopping.wait(self.poll_interval)

    def _serve(self, session: _Session, *, until_idle: bool) -> None:
        try:
            while not self._stopping.is_set():
                if not self.active:
                    if self._take_lock(session):
                        continue
                    if until_idle:
                        raise self.busy()
                    self._wait(self.standby_interval)
                    continue
                wait = self._deliver_page(session)
                if wait == 0:
                    continue
                if wait is None:
                    if until_idle:
                        return
                    wait = self.poll_interval
                self._wait(wait)
        finally:
            self._release(session)

    def _take_lock(self, session: _Session) -> bool:
        taken = single_value(session.fetch("subscriber_lock_try", lock_params(self.name)))
        if not taken:
            return False
        self.active = True
        self.log_activated()
        conn = session.psycopg_connection()
        if conn is not None:
            session.fetch("subscription_listen", {})
            self._waiter = Waiter(self._stopping)
            self._waiter.attach(conn)
        return True

    def _release(self, session: _Session) -> None:
        if self._waiter is not None:
            self._waiter.close()
            self._waiter = None
        if self.active:
            self.active = False
            with contextlib.suppress(psycopg.Error, sqlalchemy.exc.SQLAlchemyError):
                # The connection may be the application's (or its pool's): it goes back as it came.
                session.fetch("subscription_unlisten", {})
                session.fetch("subscriber_lock_release", lock_params(self.name))

    def _wait(self, seconds: float) -> None:
        if self._waiter is not None:
            self._waiter.wait(seconds)
        else:
            self._stopping.wait(seconds)

    # ----- one page

    def _deliver_page(self, session: _Session) -> float | None:
        """Deliver the next page; return how long to wait before the next (0: at once, None: nothing to do)."""
        rows = session.fetch("transitions_page", page_params(self.name, self.batch_size))
        page = Page.of(self.name, rows, self.batch_size)
        position = page.position  # as this consumer moves it
        try:
            index, together = 0, True
            while index < len(page.transitions):
                transition = page.transitions[index]
                if self._stopping.is_set():
                    return 0
                wait = page.wait_before(transition, self.retry)
                if wait > 0:
                    return wait  # in order: the subscription waits at a transition that failed
                run = self.first_deliveries(page.transitions, index, position) if together else []
                if len(run) > 1:
                    if self._deliver_together(session, run, position):
                        position, index = run[-1].transition_id, index + len(run)
                        continue
                    together = False  # one of the run failed: the rest of the page one by one
                # Alone (a failure of a run is then counted against the transition that fails).
                if not self._deliver(session, transition, position):
                    return 0  # counted (or parked): the next page says when it is due
                position, index = max(position, transition.transition_id), index + 1
            moved_to = page.position_after()
            if moved_to is not None:
                # Past transitions the filter leaves out, so that the lag reads 0.
                with session.transaction():
                    self._fence(session, position)
                    session.fetch("subscription_acknowledge", self.acknowledge_params(0, moved_to))
        except FencedError as exc:
            self.log_fenced(exc)
            return 0
        return 0 if page.transitions else None

    def _fence(self, session: _Session, expected: int) -> None:
        rows = session.fetch("subscription_fence", {"name": self.name})
        self.fenced(rows, expected)

    def _deliver_together(self, session: _Session, run: list[Transition], position: int) -> bool:
        """Handle transitions delivered for the first time in one transaction, acknowledged by its commit.

        False if one of them failed: nothing of the run was acknowledged, each is then delivered alone.
        """
        try:
            with session.transaction() as conn:
                self._fence(session, position)
                for transition in run:
                    with self.handling(transition):
                        self.handler(conn, transition)
                acknowledged = self.acknowledge_params(0, run[-1].transition_id)
                session.fetch("subscription_acknowledge", acknowledged)
        except FencedError:
            raise
        except Exception:  # one of them failed: delivered one at a time next, where it is counted
            if _closed(session):
                raise
            return False
        self.delivered += len(run)
        return True

    def _deliver(self, session: _Session, transition: Transition, position: int) -> bool:
        """Handle one transition and acknowledge it in one transaction; False if it failed (counted, maybe parked)."""
        try:
            with session.transaction() as conn:
                self._fence(session, position)
                if transition.transition_id <= position:  # a parked one given back: still to deliver?
                    self.fenced_redelivery(
                        session.fetch("subscription_fence_redelivery", self.redelivery_params(transition)), transition
                    )
                with self.handling(transition):
                    self.handler(conn, transition)
                session.fetch(
                    "subscription_acknowledge",
                    self.acknowledge_params(transition.transition_id, transition.transition_id),
                )
        except FencedError:
            raise
        except Exception as exc:  # the handler's failure (or the database's): never skipped, retried then parked
            if _closed(session):
                raise
            self._failed(session, transition, position, exc)
            return False
        self.delivered += 1
        return True

    def _failed(self, session: _Session, transition: Transition, position: int, exc: Exception) -> None:
        params = self.failure_params(transition, exc)
        attempts = single_value(session.fetch("subscription_failure_record", params))
        if attempts < self.retry.max_attempts:
            self.log_failed(transition, attempts, params["error"])
            return
        with session.transaction():
            self._fence(session, position)
            session.fetch("subscription_park", {"name": self.name, "transition_id": transition.transition_id})
        self.log_parked(transition, attempts, params["error"])

    # ----- the connection

    @contextlib.contextmanager
    def _session(self) -> Iterator[_Session]:
        source = self._source
        if isinstance(source, psycopg.Connection):
            check_transactional(source.info.transaction_status != psycopg.pq.TransactionStatus.IDLE, autocommit=False)
            yield _Session(source)
        elif isinstance(source, SAConnection):
            check_transactional(
                source.in_transaction(), getattr(source.connection.dbapi_connection, "autocommit", False)
            )
            yield _Session(source)
        elif isinstance(source, Engine):
            # READ COMMITTED whatever the engine's default: in AUTOCOMMIT, begin() opens no
            # transaction and the handler's effect would not commit with the acknowledgement.
            with source.connect() as conn:
                conn.execution_options(isolation_level="READ COMMITTED")
                session = _Session(conn)
                session.fetch("subscriber_session_limits", self.session_limits())
                try:
                    yield session
                finally:  # the pool's connection goes back as it came
                    with contextlib.suppress(psycopg.Error, sqlalchemy.exc.SQLAlchemyError):
                        session.fetch("subscriber_session_limits_reset", {})
        else:
            from processor.database import DatabaseUrl, connect

            with connect(DatabaseUrl.parse(source), application_name=self.application_name) as conn:
                session = _Session(conn)
                session.fetch("subscriber_session_limits", self.session_limits())
                yield session


def _closed(session: _Session) -> bool:
    conn = session.conn
    return conn.closed if isinstance(conn, psycopg.Connection) else bool(conn.closed or conn.invalidated)


__all__ = ["Handler", "Subscriber", "SubscriberBusyError", "Transition"]
