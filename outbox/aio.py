"""The asyncio side: the write API as coroutines, and ``AsyncSubscriber``, which reacts to job transitions.

>>> async with engine.begin() as conn:             # a SQLAlchemy AsyncEngine: psycopg or asyncpg driver
...     job_id, variant_ids = await outbox.aio.create_job(conn, variants=3, columns={"user_id": 42})
...     await outbox.aio.update_variant(conn, variant_ids[0], status="running", step="ingest")

``create_job``, ``update_variant``, ``hold_job`` and ``release_job`` take the same arguments, check
the same things and write the same rows as their sync twins in ``outbox`` (they run the same
operations, outbox.writer), in the caller's transaction.

>>> async def on_transition(conn, transition):
...     if transition.to_status == "done":
...         await conn.execute("INSERT INTO notifications (job_id) VALUES (%s)", (transition.job_id,))
>>> subscriber = outbox.aio.AsyncSubscriber("notify-done", "postgresql://app@db/app", on_transition)
>>> task = asyncio.create_task(subscriber.run())   # cancel it (or await subscriber.stop()) to stop

The same consumer as ``outbox.Subscriber`` (outbox.subscription says what it guarantees), with no
thread of its own: ``source`` is a database URL, a ``psycopg.AsyncConnection``, or a SQLAlchemy
``AsyncEngine`` or ``AsyncConnection`` (any driver: asyncpg too); the coroutine handler gets that kind
of connection, inside the transaction that acknowledges the transition, and must not commit it.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any

import psycopg
import sqlalchemy

try:  # SQLAlchemy's asyncio needs greenlet: an application with an AsyncEngine has it (sqlalchemy[asyncio])
    from sqlalchemy.ext.asyncio import AsyncConnection as SAAsyncConnection
    from sqlalchemy.ext.asyncio import AsyncEngine
except ImportError:  # pragma: no cover - only psycopg connections and URLs then
    SAAsyncConnection = AsyncEngine = type("_Unavailable", (), {})  # type: ignore[assignment,misc]

from outbox import writer
from outbox.connections import Statement, execute_async, run_async
from outbox.errors import ArgumentTypeError, FencedError
from outbox.events import VariantStatus
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

AsyncHandler = Callable[[Any, Transition], Awaitable[None]]
AsyncSource = str | psycopg.AsyncConnection[Any] | AsyncEngine | SAAsyncConnection


class _AsyncSession:
    """One async connection of either kind; each statement in a transaction of its own unless inside one."""

    def __init__(self, conn: psycopg.AsyncConnection[Any] | SAAsyncConnection) -> None:
        self.conn = conn
        self._in_transaction = False

    async def fetch(self, name: str, params: dict[str, Any]) -> list[Any]:
        if not self._in_transaction:
            async with self.transaction():
                return await self.fetch(name, params)
        return (await execute_async(self.conn, Statement(QUERIES[name], params))).rows

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[Any]:
        self._in_transaction = True
        try:
            if isinstance(self.conn, psycopg.AsyncConnection):
                async with self.conn.transaction():
                    yield self.conn
            else:
                async with self.conn.begin():
                    yield self.conn
        finally:
            self._in_transaction = False

    async def psycopg_connection(self) -> psycopg.AsyncConnection[Any] | None:
        if isinstance(self.conn, psycopg.AsyncConnection):
            return self.conn
        raw = await self.conn.get_raw_connection()
        driver = raw.driver_connection
        return driver if isinstance(driver, psycopg.AsyncConnection) else None

    @property
    def closed(self) -> bool:
        if isinstance(self.conn, psycopg.AsyncConnection):
            return bool(self.conn.closed)
        return bool(self.conn.closed or self.conn.invalidated)


class AsyncSubscriber(Consumer):
    """The asyncio consumer of one subscription (see ``outbox.Subscriber``: the same rules and arguments)."""

    def __init__(
        self,
        name: str,
        source: AsyncSource,
        handler: AsyncHandler,
        *,
        batch_size: int = 100,
        poll_interval: float = 1.0,
        standby_interval: float = 5.0,
        retry: RetryPolicy | None = None,
        application_name: str = "outbox-subscriber",
        session_timeout: float = 60.0,
        per_transaction: int = 50,
    ) -> None:
        if not isinstance(source, str | psycopg.AsyncConnection | AsyncEngine | SAAsyncConnection):
            raise ArgumentTypeError(
                "source must be a database URL, a psycopg AsyncConnection, or a SQLAlchemy AsyncEngine or "
                f"AsyncConnection (got {type(source).__name__}); for sync code use outbox.Subscriber"
            )
        super().__init__(
            name, handler, batch_size=batch_size, poll_interval=poll_interval, standby_interval=standby_interval,
            retry=retry, application_name=application_name, session_timeout=session_timeout,
            per_transaction=per_transaction,
        )  # fmt: skip
        self._source = source
        self._stopping = asyncio.Event()
        self._listening: psycopg.AsyncConnection[Any] | None = None

    async def run(self) -> None:
        """Deliver until ``stop()`` or cancellation.

        Cancelled, it rolls back the transition being handled (it comes again, to this consumer or
        another), releases the subscription's lock and closes the connection it opened, then raises
        CancelledError: a standby takes over at once.
        """
        self._stopping.clear()
        with self.tracking_run():
            await self._loop(until_idle=False)

    async def run_until_idle(self) -> int:
        """Deliver what there is now (waiting out the retries it needs); return how many were handled."""
        self._stopping.clear()
        before = self.delivered
        with self.tracking_run():
            await self._loop(until_idle=True)
        return self.delivered - before

    def stop(self) -> None:
        """Finish the transition being handled, then return from ``run``."""
        self._stopping.set()

    async def _loop(self, *, until_idle: bool) -> None:
        while True:
            try:
                async with self._session() as session:
                    with self.tracking_session():
                        await self._serve(session, until_idle=until_idle)
                return
            except (psycopg.OperationalError, sqlalchemy.exc.OperationalError) as exc:
                if not isinstance(self._source, str | AsyncEngine) or self._stopping.is_set():
                    raise
                self.log_reconnecting(exc)
                await self._sleep(self.poll_interval)

    async def _serve(self, session: _AsyncSession, *, until_idle: bool) -> None:
        try:
            while not self._stopping.is_set():
                if not self.active:
                    if await self._take_lock(session):
                        continue
                    if until_idle:
                        raise self.busy()
                    await self._sleep(self.standby_interval)
                    continue
                wait = await self._deliver_page(session)
                if wait == 0:
                    continue
                if wait is None:
                    if until_idle:
                        return
                    wait = self.poll_interval
                await self._wait(wait)
        finally:
            await asyncio.shield(self._release(session))

    async def _take_lock(self, session: _AsyncSession) -> bool:
        taken = single_value(await session.fetch("subscriber_lock_try", lock_params(self.name)))
        if not taken:
            return False
        self.active = True
        self.log_activated()
        conn = await session.psycopg_connection()
        if conn is not None:
            await session.fetch("subscription_listen", {})
            self._listening = conn
        return True

    async def _release(self, session: _AsyncSession) -> None:
        self._listening = None
        if self.active:
            self.active = False
            with contextlib.suppress(psycopg.Error, sqlalchemy.exc.SQLAlchemyError):
                # The connection may be the application's (or its pool's): it goes back as it came.
                await session.fetch("subscription_unlisten", {})
                await session.fetch("subscriber_lock_release", lock_params(self.name))

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    async def _wait(self, seconds: float) -> None:
        """Until ``seconds`` pass, ``stop()``, or (on a psycopg connection) the processor's notification."""
        conn = self._listening
        if conn is None:
            await self._sleep(seconds)
            return
        notified = asyncio.ensure_future(_next_notification(conn, seconds))
        stopped = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({notified, stopped}, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (notified, stopped):
                task.cancel()
            await asyncio.gather(notified, stopped, return_exceptions=True)

    async def _deliver_page(self, session: _AsyncSession) -> float | None:
        rows = await session.fetch("transitions_page", page_params(self.name, self.batch_size))
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
                    return wait
                run = self.first_deliveries(page.transitions, index, position) if together else []
                if len(run) > 1:
                    if await self._deliver_together(session, run, position):
                        position, index = run[-1].transition_id, index + len(run)
                        continue
                    together = False  # one of the run failed: the rest of the page one by one
                if not await self._deliver(session, transition, position):
                    return 0
                position, index = max(position, transition.transition_id), index + 1
            moved_to = page.position_after()
            if moved_to is not None:
                async with session.transaction():
                    await self._fence(session, position)
                    await session.fetch("subscription_acknowledge", self.acknowledge_params(0, moved_to))
        except FencedError as exc:
            self.log_fenced(exc)
            return 0
        return 0 if page.transitions else None

    async def _fence(self, session: _AsyncSession, expected: int) -> None:
        rows = await session.fetch("subscription_fence", {"name": self.name})
        self.fenced(rows, expected)

    async def _deliver_together(self, session: _AsyncSession, run: list[Transition], position: int) -> bool:
        """As outbox.Subscriber's: first deliveries in one transaction; False if one failed (then one by one)."""
        try:
            async with session.transaction() as conn:
                await self._fence(session, position)
                for transition in run:
                    with self.handling(transition):
                        await self.handler(conn, transition)
                await session.fetch("subscription_acknowledge", self.acknowledge_params(0, run[-1].transition_id))
        except FencedError:
            raise
        except Exception:
            if session.closed:
                raise
            return False
        self.delivered += len(run)
        return True

    async def _deliver(self, session: _AsyncSession, transition: Transition, position: int) -> bool:
        try:
            async with session.transaction() as conn:
                await self._fence(session, position)
                if transition.transition_id <= position:  # a parked one given back: still to deliver?
                    self.fenced_redelivery(
                        await session.fetch("subscription_fence_redelivery", self.redelivery_params(transition)),
                        transition,
                    )
                with self.handling(transition):
                    await self.handler(conn, transition)
                await session.fetch(
                    "subscription_acknowledge",
                    self.acknowledge_params(transition.transition_id, transition.transition_id),
                )
        except FencedError:
            raise
        except Exception as exc:  # the handler's failure: never skipped, retried then parked
            if session.closed:
                raise
            await self._failed(session, transition, position, exc)
            return False
        self.delivered += 1
        return True

    async def _failed(self, session: _AsyncSession, transition: Transition, position: int, exc: Exception) -> None:
        params = self.failure_params(transition, exc)
        attempts = single_value(await session.fetch("subscription_failure_record", params))
        if attempts < self.retry.max_attempts:
            self.log_failed(transition, attempts, params["error"])
            return
        async with session.transaction():
            await self._fence(session, position)
            await session.fetch("subscription_park", {"name": self.name, "transition_id": transition.transition_id})
        self.log_parked(transition, attempts, params["error"])

    @contextlib.asynccontextmanager
    async def _session(self) -> AsyncIterator[_AsyncSession]:
        source = self._source
        if isinstance(source, psycopg.AsyncConnection):
            check_transactional(source.info.transaction_status != psycopg.pq.TransactionStatus.IDLE, autocommit=False)
            yield _AsyncSession(source)
        elif isinstance(source, SAAsyncConnection):
            raw = await source.get_raw_connection()
            check_transactional(source.in_transaction(), getattr(raw.dbapi_connection, "autocommit", False))
            yield _AsyncSession(source)
        elif isinstance(source, AsyncEngine):
            async with source.connect() as conn:
                await conn.execution_options(isolation_level="READ COMMITTED")  # as outbox.Subscriber says
                session = _AsyncSession(conn)
                await session.fetch("subscriber_session_limits", self.session_limits())
                try:
                    yield session
                finally:  # the pool's connection goes back as it came
                    with contextlib.suppress(psycopg.Error, sqlalchemy.exc.SQLAlchemyError):
                        await asyncio.shield(session.fetch("subscriber_session_limits_reset", {}))
        else:
            from processor.database import DatabaseUrl, connect_params

            params = connect_params(DatabaseUrl.parse(source), application_name=self.application_name)
            async with await psycopg.AsyncConnection.connect(**params, autocommit=True) as conn:
                session = _AsyncSession(conn)
                await session.fetch("subscriber_session_limits", self.session_limits())
                yield session


async def _next_notification(conn: psycopg.AsyncConnection[Any], seconds: float) -> None:
    async for _ in conn.notifies(timeout=seconds, stop_after=1):
        return


# ----- the write API, for an asyncio connection (outbox.writer has the sync one: same arguments, same checks)


async def create_job(
    conn: Any,
    *,
    variants: int | Sequence[uuid.UUID | str] = 1,
    job_id: uuid.UUID | str | None = None,
    step: str | None = None,
    columns: Mapping[str, Any] | None = None,
    variant_columns: Mapping[str, Any] | None = None,
) -> tuple[uuid.UUID, list[uuid.UUID]]:
    """``outbox.create_job`` on an asyncio connection, in its transaction.

    ``conn``: a SQLAlchemy ``AsyncConnection`` or ``AsyncSession`` (psycopg or asyncpg driver), a
    psycopg ``AsyncConnection`` or an asyncpg ``Connection``.
    """
    operation = writer.create_job_operation(
        variants=variants, job_id=job_id, step=step, columns=columns, variant_columns=variant_columns
    )
    return await run_async(conn, operation, call="create_job")


async def update_variant(
    conn: Any, variant_id: uuid.UUID | str, *, status: VariantStatus | str, step: str | None = None
) -> None:
    """``outbox.update_variant`` on an asyncio connection (as for ``create_job``), in its transaction."""
    await run_async(conn, writer.update_variant_operation(variant_id, status=status, step=step), call="update_variant")


async def hold_job(
    conn: Any, job_id: uuid.UUID | str, *, status: VariantStatus | str, step: str | None = None, reason: str
) -> None:
    """``outbox.hold_job`` on an asyncio connection, in its transaction."""
    await run_async(conn, writer.hold_job_operation(job_id, status=status, step=step, reason=reason), call="hold_job")


async def release_job(conn: Any, job_id: uuid.UUID | str) -> bool:
    """``outbox.release_job`` on an asyncio connection, in its transaction."""
    return await run_async(conn, writer.release_job_operation(job_id), call="release_job")


__all__ = ["AsyncHandler", "AsyncSubscriber", "create_job", "hold_job", "release_job", "update_variant"]
