"""The write API in asyncio code (outbox.aio) on every kind of connection, against the sync API and the reference.

Each kind: SQLAlchemy's AsyncConnection and AsyncSession on the psycopg and asyncpg drivers, psycopg's
AsyncConnection, asyncpg's own Connection. The application's tables carry their own NOT NULL
columns, which create_job fills from ``columns=`` / ``variant_columns=``.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import psycopg
import pydantic
import pytest
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

import outbox
import outbox.aio
from processor.database import DatabaseUrl
from processor.settings import Settings
from tests.helpers import drain
from tests.reference import actual_job_states, reference_job_states

STEPS = ("ingest", "detect", "segment", "iou_eval")  # the test databases' pipeline
KINDS = [
    "sqlalchemy+psycopg",
    "sqlalchemy+asyncpg",
    "session+asyncpg",
    "psycopg",
    "asyncpg",
]

APPLICATION_COLUMNS = """
ALTER TABLE jobs ADD COLUMN user_id bigint NOT NULL DEFAULT 0;
ALTER TABLE jobs ALTER COLUMN user_id DROP DEFAULT;
ALTER TABLE jobs_variants ADD COLUMN model text NOT NULL DEFAULT '';
ALTER TABLE jobs_variants ALTER COLUMN model DROP DEFAULT;
ALTER TABLE jobs_variants ADD COLUMN "Score Threshold" numeric(4, 2);
ALTER TABLE jobs ADD COLUMN code char(5);
"""


def _plain(db: DatabaseUrl) -> str:
    return db.url.set(drivername="postgresql").render_as_string(hide_password=False)


@contextlib.asynccontextmanager
async def transactions(db: DatabaseUrl, kind: str) -> AsyncIterator[Callable[[], Any]]:
    """A factory of ``async with factory() as conn``: one transaction of ``kind``, committed at the end."""
    if kind.startswith(("sqlalchemy", "session")):
        engine = create_async_engine(db.url.set(drivername=f"postgresql+{kind.split('+')[1]}"), pool_size=10)

        @contextlib.asynccontextmanager
        async def sqlalchemy_transaction() -> AsyncIterator[Any]:
            if kind.startswith("session"):
                async with AsyncSession(engine) as session, session.begin():
                    yield session
            else:
                async with engine.begin() as conn:
                    yield conn

        try:
            yield sqlalchemy_transaction
        finally:
            await engine.dispose()
    elif kind == "psycopg":

        @contextlib.asynccontextmanager
        async def psycopg_transaction() -> AsyncIterator[Any]:
            async with await psycopg.AsyncConnection.connect(_plain(db)) as conn:
                yield conn  # the block commits on a clean exit

        yield psycopg_transaction
    else:
        pool = await asyncpg.create_pool(_plain(db), min_size=1, max_size=10)

        @contextlib.asynccontextmanager
        async def asyncpg_transaction() -> AsyncIterator[Any]:
            async with pool.acquire() as conn, conn.transaction():
                yield conn

        try:
            yield asyncpg_transaction
        finally:
            await pool.close()


def test_the_async_calls_take_the_same_arguments_as_the_sync_ones() -> None:
    for name in ("create_job", "update_variant", "hold_job", "release_job"):
        sync, coroutine = getattr(outbox, name), getattr(outbox.aio, name)
        assert inspect.iscoroutinefunction(coroutine), name
        assert list(inspect.signature(sync).parameters.values()) == list(
            inspect.signature(coroutine).parameters.values()
        ), name


@pytest.mark.parametrize("kind", KINDS)
def test_each_connection_writes_what_the_sync_api_writes(
    kind: str, db: DatabaseUrl, conn: psycopg.Connection[Any], engine: Any
) -> None:
    conn.execute(APPLICATION_COLUMNS)

    async def write() -> tuple[uuid.UUID, list[uuid.UUID]]:
        async with transactions(db, kind) as transaction:
            async with transaction() as c:
                job_id, variants = await outbox.aio.create_job(
                    c, variants=2, step="ingest", columns={"user_id": 42},
                    variant_columns={"model": "yolo", "Score Threshold": 0.5},
                )  # fmt: skip
                await outbox.aio.update_variant(c, variants[0], status="running", step="detect")
                await outbox.aio.update_variant(c, str(variants[1]), status="done", step="iou_eval")
            return job_id, variants

    job_id, variants = asyncio.run(write())
    with engine.begin() as sa:  # the same through the sync API
        twin_job, twin_variants = outbox.create_job(
            sa, variants=2, step="ingest", columns={"user_id": 42},
            variant_columns={"model": "yolo", "Score Threshold": 0.5},
        )  # fmt: skip
        outbox.update_variant(sa, twin_variants[0], status="running", step="detect")
        outbox.update_variant(sa, twin_variants[1], status="done", step="iou_eval")

    def written(job: uuid.UUID, ids: list[uuid.UUID]) -> Any:
        job_row = conn.execute("SELECT status, current_step, user_id FROM jobs WHERE job_id = %s", [job]).fetchone()
        variant_rows = [
            conn.execute(
                'SELECT status, current_step, model, "Score Threshold" FROM jobs_variants WHERE job_variants_id = %s',
                [v],
            ).fetchone()
            for v in ids
        ]
        events = conn.execute(
            "SELECT event_type, payload FROM outbox_events WHERE variant_id = ANY(%s)"
            " ORDER BY variant_id = %s DESC, variant_version",
            [ids, ids[0]],
        ).fetchall()
        return job_row, variant_rows, events

    assert written(job_id, variants) == written(twin_job, twin_variants)
    assert written(job_id, variants)[0] == ("queued", "ingest", 42)


@pytest.mark.parametrize("kind", KINDS)
def test_each_connection_checks_what_the_sync_api_checks(
    kind: str, db: DatabaseUrl, conn: psycopg.Connection[Any]
) -> None:
    conn.execute(APPLICATION_COLUMNS)

    async def refused() -> list[str]:
        messages = []
        async with transactions(db, kind) as transaction:
            async with transaction() as c:
                _, (variant,) = await outbox.aio.create_job(c, columns={"user_id": 1}, variant_columns={"model": "m"})
            attempts: list[Callable[[Any], Any]] = [
                lambda c: outbox.aio.update_variant(c, variant, status="paused"),
                lambda c: outbox.aio.update_variant(c, variant, status="running", step="no_such_step"),
                lambda c: outbox.aio.update_variant(c, uuid.uuid4(), status="running"),
                lambda c: outbox.aio.update_variant(c, "not-a-uuid", status="running"),
                lambda c: outbox.aio.create_job(c, variants=0),
                lambda c: outbox.aio.create_job(c, step="no_such_step", columns={"user_id": 1}),
                lambda c: outbox.aio.create_job(c, columns={"status": "done"}),
                lambda c: outbox.aio.hold_job(c, uuid.uuid4(), status="done", reason=""),
            ]
            for attempt in attempts:
                with pytest.raises((ValueError, LookupError, pydantic.ValidationError)) as caught:
                    async with transaction() as c:
                        await attempt(c)
                assert isinstance(caught.value, outbox.OutboxError)  # and still the builtin it was (outbox.errors)
                messages.append(f"{type(caught.value).__name__}: {str(caught.value).splitlines()[0]}")
            # What the database refuses (a column the table lacks, a value too long for its column,
            # a variant row that violates NOT NULL) comes from the driver as for the application's
            # own INSERT, and the job is not written either: it is one statement with its variants.
            database_refusals: list[Callable[[Any], Any]] = [
                lambda c: outbox.aio.create_job(c, columns={"user_id": 1, "no_such_column": 2}),
                lambda c: outbox.aio.create_job(c, columns={"user_id": 1, "code": "abcdefgh"}),
                lambda c: outbox.aio.create_job(c, variants=3, columns={"user_id": 1}),  # model is NOT NULL
            ]
            for attempt in database_refusals:
                with pytest.raises(Exception) as caught:
                    async with transaction() as c:
                        await attempt(c)
                messages.append(f"database: {str(caught.value).splitlines()[0]}")
        return messages

    messages = asyncio.run(refused())
    assert [m.split(":")[0] for m in messages] == [
        "InvalidEventError", "UnknownStepError", "VariantNotFoundError", "InvalidArgumentError", "InvalidArgumentError",
        "UnknownStepError", "InvalidArgumentError", "InvalidArgumentError", "database", "database", "database",
    ], messages  # fmt: skip
    assert 'column "no_such_column" of relation "jobs" does not exist' in messages[8]
    assert "value too long for type character(5)" in messages[9]  # refused, not cut short
    assert 'null value in column "model"' in messages[10]
    # Nothing of the refused calls was written: one job, one variant, one event.
    counts = conn.execute(
        "SELECT (SELECT count(*) FROM jobs), (SELECT count(*) FROM jobs_variants), (SELECT count(*) FROM outbox_events)"
    ).fetchone()
    assert counts == (1, 1, 1)


def test_a_wrong_connection_type_is_told_what_is_accepted(db: DatabaseUrl, engine: Any) -> None:
    async def sync_call_on_async_connection() -> None:
        async with await psycopg.AsyncConnection.connect(_plain(db)) as c:
            with pytest.raises(
                TypeError, match=r"for a psycopg AsyncConnection use `await outbox\.aio\.update_variant"
            ):
                outbox.update_variant(c, uuid.uuid4(), status="running")
            with pytest.raises(TypeError, match=r"SQLAlchemy AsyncConnection or AsyncSession .*asyncpg Connection"):
                await outbox.aio.create_job(object())

    asyncio.run(sync_call_on_async_connection())
    with engine.begin() as sa, pytest.raises(TypeError, match=r"for a SQLAlchemy Connection use outbox\.create_job"):
        asyncio.run(outbox.aio.create_job(sa))
    with pytest.raises(TypeError, match=r"pass `conn` from `with engine.begin\(\) as conn`"):
        outbox.create_job(engine)
    with pytest.raises(TypeError, match=r"SQLAlchemy Connection or Session .*or a psycopg Connection.*got a str"):
        outbox.create_job("postgresql://db/app")


@pytest.mark.parametrize("kind", ["sqlalchemy+psycopg", "sqlalchemy+asyncpg", "psycopg", "asyncpg"])
def test_concurrent_coroutines_finishing_the_last_variants_leave_no_job_stuck(
    kind: str, db: DatabaseUrl, settings: Settings, conn: psycopg.Connection[Any]
) -> None:
    """The original race: the last variants of each job finish in concurrent transactions."""
    jobs, per_job = 30, 4

    async def race() -> None:
        async with transactions(db, kind) as transaction:
            created = []
            async with transaction() as c:
                for _ in range(jobs):
                    _, variants = await outbox.aio.create_job(c, variants=per_job, step="ingest")
                    created.append(variants)
            # Each variant but the last of a job reaches the final step first; the last ones then
            # finish together, each in its own transaction, all holding their transactions open
            # until every one has written (a barrier), so that none sees the others' commits.
            async with transaction() as c:
                for variants in created:
                    for variant in variants[:-2]:
                        await outbox.aio.update_variant(c, variant, status="done", step="iou_eval")

            async def finish(variant: uuid.UUID, barrier: asyncio.Barrier) -> None:
                async with transaction() as c:
                    await outbox.aio.update_variant(c, variant, status="done", step="iou_eval")
                    await barrier.wait()

            last = [v for variants in created for v in variants[-2:]]
            for start in range(0, len(last), 10):
                group = last[start : start + 10]
                barrier = asyncio.Barrier(len(group))
                await asyncio.gather(*(finish(v, barrier) for v in group))

    asyncio.run(race())
    drain(settings)
    actual, expected = actual_job_states(conn), reference_job_states(conn, STEPS)
    assert len(expected) == jobs
    assert actual == expected
    assert set(actual.values()) == {("done", "iou_eval")}  # 0 stuck


def test_create_job_is_all_or_nothing_outside_a_transaction(db: DatabaseUrl, conn: psycopg.Connection[Any]) -> None:
    """On an autocommit connection (asyncpg's default too) a refused variant row leaves no job behind."""
    conn.execute(APPLICATION_COLUMNS)

    async def attempt() -> None:
        raw = await asyncpg.connect(_plain(db))
        try:
            with pytest.raises(asyncpg.NotNullViolationError):
                await outbox.aio.create_job(raw, variants=2, columns={"user_id": 1})  # model is NOT NULL
        finally:
            await raw.close()

    asyncio.run(attempt())
    with psycopg.connect(_plain(db), autocommit=True) as auto, pytest.raises(psycopg.errors.NotNullViolation):
        outbox.create_job(auto, variants=2, columns={"user_id": 1})
    assert conn.execute("SELECT (SELECT count(*) FROM jobs), (SELECT count(*) FROM jobs_variants)").fetchone() == (0, 0)


def test_a_connection_with_its_own_row_factory_works(db: DatabaseUrl, conn: psycopg.Connection[Any]) -> None:
    """dict_row connections, common in applications: the API reads its rows as tuples whatever the factory."""
    from psycopg.rows import dict_row

    conn.execute(APPLICATION_COLUMNS)
    with psycopg.connect(_plain(db), row_factory=dict_row) as c:
        job_id, (variant,) = outbox.create_job(c, step="ingest", columns={"user_id": 7}, variant_columns={"model": "m"})
        outbox.update_variant(c, variant, status="running", step="detect")
        with pytest.raises(outbox.UnknownStepError):
            outbox.update_variant(c, variant, status="running", step="no_such_step")
        outbox.hold_job(c, job_id, status="failed", reason="support")
        assert outbox.release_job(c, job_id) is True

    async def on_async() -> None:
        async with await psycopg.AsyncConnection.connect(_plain(db), row_factory=dict_row) as c:
            await outbox.aio.create_job(c, step="ingest", columns={"user_id": 8}, variant_columns={"model": "m"})

    asyncio.run(on_async())
    assert conn.execute("SELECT count(*) FROM jobs WHERE user_id IN (7, 8)").fetchone() == (2,)


def test_an_orm_session_is_flushed_first_so_changes_keep_program_order(
    db: DatabaseUrl, engine: Any, conn: psycopg.Connection[Any]
) -> None:
    from sqlalchemy import Column, String, Uuid
    from sqlalchemy.orm import Session, declarative_base

    Base = declarative_base()

    class Variant(Base):  # type: ignore[misc,valid-type]
        __tablename__ = "jobs_variants"
        job_variants_id = Column(Uuid, primary_key=True)
        job_id = Column(Uuid)
        status = Column(String)
        current_step = Column(String)

    with engine.begin() as sa:
        job_id, (variant,) = outbox.create_job(sa)
    with Session(engine) as session, session.begin():
        session.get(Variant, variant).status = "running"  # pending in the session
        outbox.update_variant(session, variant, status="failed")  # after it, in program order
        other = uuid.uuid4()
        session.add(Variant(job_variants_id=other, job_id=job_id, status="queued"))
        outbox.update_variant(session, other, status="running")  # the ORM's new row is there first
    statuses = conn.execute(
        "SELECT payload->>'status' FROM outbox_events WHERE variant_id = %s ORDER BY variant_version", [variant]
    ).fetchall()
    assert [row[0] for row in statuses] == ["queued", "running", "failed"]
    assert conn.execute("SELECT status FROM jobs_variants WHERE job_variants_id = %s", [variant]).fetchone() == (
        "failed",
    )


@pytest.mark.parametrize("driver", ["psycopg", "psycopg2"])
def test_the_sync_api_on_sqlalchemys_drivers_and_orm_session(
    driver: str, db: DatabaseUrl, conn: psycopg.Connection[Any]
) -> None:
    import sqlalchemy
    from sqlalchemy.orm import Session

    conn.execute(APPLICATION_COLUMNS)
    engine = sqlalchemy.create_engine(db.url.set(drivername=f"postgresql+{driver}"))
    try:
        with engine.begin() as sa:
            job_id, variants = outbox.create_job(
                sa, variants=2, step="ingest", columns={"user_id": 5}, variant_columns={"model": "m"}
            )
            outbox.update_variant(sa, variants[0], status="done", step="iou_eval")
        with Session(engine) as session, session.begin():
            outbox.update_variant(session, variants[1], status="done", step="iou_eval")
            with pytest.raises(outbox.UnknownStepError):
                outbox.update_variant(session, variants[1], status="done", step="no_such_step")
    finally:
        engine.dispose()
    rows = conn.execute("SELECT status, current_step FROM jobs_variants WHERE job_id = %s", [job_id]).fetchall()
    assert rows == [("done", "iou_eval")] * 2
