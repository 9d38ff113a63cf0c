"""Run the write API's statements on the connection the application already has, sync or asyncio.

The write calls (outbox.writer) are written once, as generators that yield the statements they need
and receive each one's result, without doing any I/O themselves (psycopg's own connection logic is
written the same way). This module runs such an operation on each kind of connection an
application has, in the application's transaction:

- sync (``outbox.create_job``, ...): a SQLAlchemy ``Connection`` or ORM ``Session`` (psycopg or
  psycopg2 driver), a psycopg ``Connection``;
- asyncio (``outbox.aio.create_job``, ...): a SQLAlchemy ``AsyncConnection`` or ``AsyncSession``
  (psycopg or asyncpg driver), a psycopg ``AsyncConnection``, an asyncpg ``Connection``.

The statements use psycopg's ``%(name)s`` parameters: psycopg and psycopg2 take them as they are,
SQLAlchemy's other drivers get ``text()`` with ``:name``, asyncpg gets ``$1, $2, ...``.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Generator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import psycopg
import sqlalchemy
from psycopg.rows import tuple_row
from sqlalchemy.engine import Connection as SAConnection
from sqlalchemy.orm import Session

from outbox.errors import ArgumentTypeError
from outbox.sqlfile import numbered, sqlalchemy_text

try:  # SQLAlchemy's asyncio needs greenlet, which an application with an AsyncEngine has
    from sqlalchemy.ext.asyncio import AsyncConnection as SAAsyncConnection
    from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
except ImportError:  # pragma: no cover - psycopg and asyncpg connections only, then
    SAAsyncConnection = AsyncEngine = AsyncSession = type("_Unavailable", (), {})  # type: ignore[assignment,misc]

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Statement:
    """One statement of an operation, with psycopg-style ``%(name)s`` parameters."""

    sql: str
    params: Mapping[str, Any] = field(default_factory=dict)
    # Said for asyncpg, whose protocol needs to know; psycopg and SQLAlchemy see it from the result.
    returns_rows: bool = False


@dataclass(frozen=True, slots=True)
class Result:
    rowcount: int  # the rows an INSERT/UPDATE changed
    rows: list[tuple[Any, ...]]  # what a statement that returns rows returned

    @property
    def first(self) -> tuple[Any, ...] | None:
        return self.rows[0] if self.rows else None


# An operation yields statements, gets each one's result back, and returns its own result.
Operation = Generator[Statement, Result, T]

SYNC_ACCEPTED = "a SQLAlchemy Connection or Session (psycopg or psycopg2 driver) or a psycopg Connection"
ASYNC_ACCEPTED = (
    "a SQLAlchemy AsyncConnection or AsyncSession (psycopg or asyncpg driver), "
    "a psycopg AsyncConnection or an asyncpg Connection"
)


def run(conn: Any, operation: Operation[T], *, call: str) -> T:
    """Run ``operation`` on a sync connection; ``call`` (``create_job``, ...) names it in errors."""
    execute = _sync_executor(conn, call)
    try:
        statement = next(operation)
        while True:
            statement = operation.send(execute(statement))
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]


async def run_async(conn: Any, operation: Operation[T], *, call: str) -> T:
    """Run ``operation`` on an asyncio connection; ``call`` names it in errors."""
    execute = await _async_executor(conn, call)
    try:
        statement = next(operation)
        while True:
            statement = operation.send(await execute(statement))
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]


def _sync_executor(conn: Any, call: str) -> Callable[[Statement], Result]:
    if isinstance(conn, psycopg.Connection):  # checked first: the common case pays one isinstance
        return functools.partial(_on_psycopg, conn)
    if isinstance(conn, Session):
        # The ORM's pending changes go first, in program order (connection() does not flush).
        conn.flush()
        conn = conn.connection()  # the session's own transaction
    if isinstance(conn, SAConnection):
        return functools.partial(_on_sqlalchemy, conn)
    if _is_async(conn):
        raise ArgumentTypeError(
            f"outbox.{call} runs on a sync connection; for {_kind(conn)} use `await outbox.aio.{call}(...)`"
        )
    if isinstance(conn, sqlalchemy.Engine):
        raise ArgumentTypeError(
            f"outbox.{call} writes in a transaction: pass `conn` from `with engine.begin() as conn`"
        )
    raise ArgumentTypeError(f"outbox.{call} takes {SYNC_ACCEPTED}, in the transaction to write in (got {_kind(conn)})")


async def _async_executor(conn: Any, call: str) -> Callable[[Statement], Awaitable[Result]]:
    if isinstance(conn, psycopg.AsyncConnection):
        return functools.partial(_on_psycopg_async, conn)
    if isinstance(conn, AsyncSession):
        await conn.flush()  # the ORM's pending changes go first, in program order
        conn = await conn.connection()  # the session's own transaction
    if isinstance(conn, SAAsyncConnection):
        return functools.partial(_on_sqlalchemy_async, conn)
    if _is_asyncpg(conn):
        return functools.partial(_on_asyncpg, conn)
    if isinstance(conn, psycopg.Connection | SAConnection | Session):
        raise ArgumentTypeError(f"outbox.aio.{call} runs on an asyncio connection; for {_kind(conn)} use outbox.{call}")
    if isinstance(conn, AsyncEngine):
        raise ArgumentTypeError(
            f"outbox.aio.{call} writes in a transaction: pass `conn` from `async with engine.begin() as conn`"
        )
    raise ArgumentTypeError(
        f"outbox.aio.{call} takes {ASYNC_ACCEPTED}, in the transaction to write in (got {_kind(conn)})"
    )


def execute(conn: psycopg.Connection[Any] | SAConnection, statement: Statement) -> Result:
    """One statement on a sync connection, in its current transaction."""
    return _on_psycopg(conn, statement) if isinstance(conn, psycopg.Connection) else _on_sqlalchemy(conn, statement)


async def execute_async(conn: psycopg.AsyncConnection[Any] | SAAsyncConnection, statement: Statement) -> Result:
    """One statement on an asyncio connection (psycopg's or SQLAlchemy's), in its current transaction."""
    if isinstance(conn, psycopg.AsyncConnection):
        return await _on_psycopg_async(conn, statement)
    return await _on_sqlalchemy_async(conn, statement)


def _on_psycopg(conn: psycopg.Connection[Any], statement: Statement) -> Result:
    # Tuples whatever the connection's row factory (dict_row is common in applications).
    with conn.cursor(row_factory=tuple_row) as cur:
        cur.execute(statement.sql, statement.params)
        return Result(cur.rowcount, cur.fetchall() if cur.description else [])


def _on_sqlalchemy(conn: SAConnection, statement: Statement) -> Result:
    if conn.dialect.paramstyle == "pyformat":
        # psycopg and psycopg2 take %(name)s as it is: exec_driver_sql hands the statement to the
        # driver inside SQLAlchemy's transaction, with no compilation (bench/HISTORY.md, "Writer path").
        result = conn.exec_driver_sql(statement.sql, dict(statement.params))
    else:
        result = conn.execute(_text(statement.sql), statement.params)
    return Result(int(result.rowcount), [tuple(row) for row in result] if result.returns_rows else [])


async def _on_psycopg_async(conn: psycopg.AsyncConnection[Any], statement: Statement) -> Result:
    async with conn.cursor(row_factory=tuple_row) as cur:
        await cur.execute(statement.sql, statement.params)
        return Result(cur.rowcount, await cur.fetchall() if cur.description else [])


async def _on_sqlalchemy_async(conn: SAAsyncConnection, statement: Statement) -> Result:
    if conn.dialect.paramstyle == "pyformat":
        result = await conn.exec_driver_sql(statement.sql, dict(statement.params))
    else:
        result = await conn.execute(_text(statement.sql), statement.params)
    return Result(int(result.rowcount), [tuple(row) for row in result] if result.returns_rows else [])


async def _on_asyncpg(conn: Any, statement: Statement) -> Result:
    sql, names = numbered(statement.sql)
    args = [statement.params[name] for name in names]
    if statement.returns_rows:
        rows = [tuple(record) for record in await conn.fetch(sql, *args)]
        return Result(len(rows), rows)
    status: str = await conn.execute(sql, *args)  # "UPDATE 1", "INSERT 0 3"
    count = status.rsplit(" ", 1)[-1]
    return Result(int(count) if count.isdigit() else 0, [])


@functools.cache
def _text(sql: str) -> sqlalchemy.TextClause:
    """One ``text()`` per statement, so that SQLAlchemy's compiled cache finds it again."""
    return sqlalchemy.text(sqlalchemy_text(sql))


def _is_asyncpg(conn: Any) -> bool:
    # Not imported: asyncpg is the application's dependency, not ours. A pool hands out proxies.
    return any(
        cls.__module__.startswith("asyncpg.") and cls.__name__ in ("Connection", "PoolConnectionProxy")
        for cls in type(conn).__mro__
    )


def _is_async(conn: Any) -> bool:
    return isinstance(conn, psycopg.AsyncConnection | SAAsyncConnection | AsyncSession) or _is_asyncpg(conn)


def _kind(conn: Any) -> str:
    """How the connection is named in a message: psycopg's and SQLAlchemy's classes share names."""
    cls = type(conn)
    package = cls.__module__.split(".", 1)[0]
    names = {"psycopg": "psycopg", "sqlalchemy": "SQLAlchemy", "asyncpg": "asyncpg"}
    name = f"{names[package]} {cls.__name__}" if package in names else cls.__name__
    return f"{'an' if name[0] in 'aeiouAEIOU' else 'a'} {name}"
