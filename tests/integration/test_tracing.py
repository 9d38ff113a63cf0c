"""OpenTelemetry tracing: one trace from a variant update to the batch that applied it to the reaction.

The SDK (opentelemetry-sdk, a test dependency) is set up once for the process, with an in-memory
exporter and a sampler that records only while a test of this module asks for spans: the tracer
provider can be set only once, and the other tests run as without one (their spans are dropped).
Without any SDK (a fresh interpreter that never imports it) nothing is written to trace_parent.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import psycopg
import pytest
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import Decision, Sampler, SamplingResult
from opentelemetry.trace import Link, SpanKind, StatusCode

import outbox
import outbox.aio
from processor import migrate, subscriptions
from processor.database import DatabaseUrl, connect
from processor.tracing import MAX_LINKS
from tests.fix_database import make_settings, subprocess_env
from tests.helpers import drain

app_tracer = trace.get_tracer("tests.application")


class _Switch(Sampler):
    """Records every span while on; drops them otherwise (the rest of the test session)."""

    on = False

    def should_sample(
        self,
        parent_context: Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Any = None,
        links: Sequence[Link] | None = None,
        trace_state: Any = None,
    ) -> SamplingResult:
        return SamplingResult(Decision.RECORD_AND_SAMPLE if self.on else Decision.DROP)

    def get_description(self) -> str:
        return "tests.integration.test_tracing switch"


_SWITCH = _Switch()
_EXPORTER = InMemorySpanExporter()


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """The spans finished during the test (the SDK set up on first use)."""
    if not isinstance(trace.get_tracer_provider(), TracerProvider):
        provider = TracerProvider(sampler=_SWITCH)
        provider.add_span_processor(SimpleSpanProcessor(_EXPORTER))
        trace.set_tracer_provider(provider)
    assert getattr(trace.get_tracer_provider(), "sampler", None) is _SWITCH, "another tracer provider is set"
    _EXPORTER.clear()
    _SWITCH.on = True
    try:
        yield _EXPORTER
    finally:
        _SWITCH.on = False
        _EXPORTER.clear()


def traceparent(span: trace.Span) -> str:
    context = span.get_span_context()
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"


def named(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [span for span in exporter.get_finished_spans() if span.name == name]


def event_trace_parents(conn: psycopg.Connection[Any], variant_id: uuid.UUID) -> list[str | None]:
    rows = conn.execute("SELECT trace_parent FROM outbox_events WHERE variant_id = %s ORDER BY event_id", [variant_id])
    return [row[0] for row in rows]


def transition_trace_parent(conn: psycopg.Connection[Any], job_id: uuid.UUID, to_status: str) -> str | None:
    row = conn.execute(
        "SELECT trace_parent FROM outbox_job_transitions WHERE job_id = %s AND to_status = %s", [job_id, to_status]
    ).fetchone()
    assert row is not None
    return row[0]  # type: ignore[no-any-return]


def create_subscription(db: DatabaseUrl, name: str, to_statuses: list[str]) -> None:
    with connect(db, application_name="outbox-tests") as op:
        subscriptions.create(op, name, from_start=False, to_statuses=to_statuses)


def test_one_trace_goes_from_update_variant_to_the_batch_that_applied_it_to_the_handler(db, engine, conn, spans):
    settings = make_settings(db)
    create_subscription(db, "react", ["done"])
    with engine.begin() as c:
        job, (variant,) = outbox.create_job(c, variants=1)
    drain(settings)
    spans.clear()

    with app_tracer.start_as_current_span("application.finish") as app, engine.begin() as c:
        outbox.update_variant(c, variant, status="done", step="iou_eval")
    writer = app.get_span_context()
    # The writer's trace context is in the event, written in the writer's transaction.
    assert event_trace_parents(conn, variant) == [None, traceparent(app)]

    drain(settings)
    (batch,) = named(spans, "outbox.batch")
    assert [link.context.span_id for link in batch.links] == [writer.span_id]
    assert batch.links[0].context.trace_id == writer.trace_id
    assert batch.kind is SpanKind.CONSUMER
    assert dict(batch.attributes or {}) == {
        "outbox.partition": 0,
        "outbox.events": 1,
        "outbox.jobs_changed": 1,
        "outbox.dead_letters": 0,
        "outbox.traced_jobs": 1,
    }
    # The transition the batch wrote carries the trace context of the event that caused it.
    assert transition_trace_parent(conn, job, "done") == traceparent(app)

    reactions: list[outbox.Transition] = []

    def handler(c: Any, t: outbox.Transition) -> None:
        reactions.append(t)

    assert outbox.Subscriber("react", db.url.render_as_string(hide_password=False), handler).run_until_idle() == 1
    assert reactions[0].trace_parent == traceparent(app)
    (handle,) = named(spans, "outbox.handle")
    # The reaction is in the writer's trace: a child of the span that called update_variant.
    assert handle.context.trace_id == writer.trace_id
    assert handle.parent is not None and handle.parent.span_id == writer.span_id
    assert dict(handle.attributes or {}) == {
        "outbox.subscription": "react",
        "outbox.transition_id": reactions[0].transition_id,
        "outbox.job_id": str(job),
        "outbox.to_status": "done",
        "outbox.attempt": 1,
    }
    assert handle.status.status_code is StatusCode.UNSET


def test_a_handler_that_raises_ends_its_span_with_an_error(db, engine, conn, spans):
    create_subscription(db, "fails", ["running"])
    with engine.begin() as c:
        _, (variant,) = outbox.create_job(c, variants=1)
    with app_tracer.start_as_current_span("application.start"), engine.begin() as c:
        outbox.update_variant(c, variant, status="running", step="ingest")
    drain(make_settings(db))

    def handler(c: Any, t: outbox.Transition) -> None:
        raise RuntimeError("the reaction failed")

    policy = outbox.RetryPolicy(max_attempts=1, first_delay=0.0, max_delay=0.0)
    url = db.url.render_as_string(hide_password=False)
    assert outbox.Subscriber("fails", url, handler, retry=policy).run_until_idle() == 0
    (handle,) = named(spans, "outbox.handle")
    assert handle.status.status_code is StatusCode.ERROR
    assert [event.name for event in handle.events] == ["exception"]
    assert "the reaction failed" in str((handle.events[0].attributes or {})["exception.message"])


@pytest.mark.parametrize("kind", ["psycopg", "asyncpg"])
def test_the_asyncio_api_and_subscriber_carry_the_trace_too(db, conn, spans, kind):
    settings = make_settings(db)
    create_subscription(db, "aio", ["running"])
    url = db.url.render_as_string(hide_password=False).replace("postgresql+psycopg", "postgresql")

    async def write() -> tuple[uuid.UUID, list[uuid.UUID], str]:
        if kind == "asyncpg":
            import asyncpg

            connection = await asyncpg.connect(url)
            try:
                async with connection.transaction():
                    with app_tracer.start_as_current_span("application.create") as app:
                        job, variants = await outbox.aio.create_job(connection, variants=2)
                        await outbox.aio.update_variant(connection, variants[0], status="running", step="detect")
            finally:
                await connection.close()
            return job, variants, traceparent(app)
        async with await psycopg.AsyncConnection.connect(url) as aconn:
            with app_tracer.start_as_current_span("application.create") as app:
                job, variants = await outbox.aio.create_job(aconn, variants=2)
                await outbox.aio.update_variant(aconn, variants[0], status="running", step="detect")
            await aconn.commit()
        return job, variants, traceparent(app)

    job, variants, parent = asyncio.run(write())
    # create_job's events too (capture appends them through outbox_append_variant_event).
    assert event_trace_parents(conn, variants[0]) == [parent, parent]
    assert event_trace_parents(conn, variants[1]) == [parent]
    drain(settings)
    assert transition_trace_parent(conn, job, "running") == parent

    async def react() -> int:
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as source:

            async def handler(c: Any, t: outbox.Transition) -> None:
                await asyncio.sleep(0)

            return await outbox.aio.AsyncSubscriber("aio", source, handler).run_until_idle()

    assert asyncio.run(react()) == 1
    (handle,) = named(spans, "outbox.handle")
    assert handle.parent is not None
    assert f"00-{handle.context.trace_id:032x}-{handle.parent.span_id:016x}" == parent[:-3]


def test_a_batch_links_to_at_most_max_links_traces(db, engine, conn, spans):
    settings = make_settings(db)
    with engine.begin() as c:
        variants = [outbox.create_job(c, variants=1)[1][0] for _ in range(MAX_LINKS + 8)]
    drain(settings)
    spans.clear()
    for variant in variants:  # a trace each
        with app_tracer.start_as_current_span("application.update"), engine.begin() as c:
            outbox.update_variant(c, variant, status="running", step="detect")
    drain(settings)
    (batch,) = named(spans, "outbox.batch")
    assert len(batch.links) == MAX_LINKS
    assert len({link.context.trace_id for link in batch.links}) == MAX_LINKS
    assert (batch.attributes or {})["outbox.traced_jobs"] == MAX_LINKS + 8
    assert (batch.attributes or {})["outbox.jobs_changed"] == MAX_LINKS + 8


def test_plain_sql_writers_are_unaffected(db, engine, conn, spans):
    with engine.begin() as c:
        _, (first, second) = outbox.create_job(c, variants=2)
    with app_tracer.start_as_current_span("application.sql") as app:
        # Plain SQL, inside a span: capture gets no trace context (only the write API hands it over).
        conn.execute("UPDATE jobs_variants SET status = 'running', current_step = 'ingest' WHERE job_variants_id = %s",
                     [first])  # fmt: skip
        # The API on the same connection, then plain SQL in the next transaction: nothing left over.
        with conn.transaction():
            outbox.update_variant(conn, second, status="running", step="ingest")
        conn.execute("UPDATE jobs_variants SET status = 'done', current_step = 'iou_eval' WHERE job_variants_id = %s",
                     [second])  # fmt: skip
        # Within one transaction, a change captured after an API call carries the call's context.
        with conn.transaction():
            outbox.update_variant(conn, first, status="done", step="iou_eval")
            conn.execute("UPDATE jobs_variants SET current_step = 'segment' WHERE job_variants_id = %s", [second])
    assert event_trace_parents(conn, first) == [None, None, traceparent(app)]
    assert event_trace_parents(conn, second) == [None, traceparent(app), None, traceparent(app)]


def test_update_variant_carries_the_context_on_a_connection_in_autocommit(engine, conn, spans):
    """The UPDATE itself sets the context: no transaction of its own to lose it in."""
    with engine.begin() as c:
        _, (variant,) = outbox.create_job(c, variants=1)
    assert conn.autocommit
    with app_tracer.start_as_current_span("application.autocommit") as app:
        outbox.update_variant(conn, variant, status="running", step="ingest")
        with pytest.raises(outbox.VariantNotFoundError):  # no row, no event: nothing else changes
            outbox.update_variant(conn, uuid.uuid4(), status="running", step="ingest")
    assert event_trace_parents(conn, variant) == [None, traceparent(app)]


def test_a_worker_of_migration_0012_is_refused_after_0013(conn, engine):
    """A worker from before trace context says it is the processor with 0012's token: refused with what to do."""
    with engine.begin() as c:
        job, _ = outbox.create_job(c, variants=1)
    for token in ("processor:12", "processor"):
        with (
            pytest.raises(psycopg.errors.RestrictViolation, match=r"older than the database's schema \(migration 0013"),
            conn.transaction(),
        ):
            conn.execute("SELECT set_config('outbox.job_writer', %s, true)", [token])
            conn.execute("UPDATE jobs SET status = 'running' WHERE job_id = %s", [job])
    assert conn.execute("SELECT count(*) FROM outbox_job_transitions").fetchone()[0] == 0


def test_upgrading_from_0012_keeps_pending_events_and_their_transitions(empty_db, monkeypatch):
    """Events written under 0012 (no trace_parent) are applied by the new worker after `migrate`."""
    every = migrate.migrations()
    assert every[12].version == 13 and every[12].name == "trace_context"
    with connect(empty_db, application_name="outbox-tests", autocommit=True) as conn:
        monkeypatch.setattr(migrate, "migrations", lambda: every[:12])
        migrate.migrate(conn, pipeline=make_settings(empty_db).pipeline)
        job = uuid.uuid4()
        conn.execute("INSERT INTO jobs (job_id, status) VALUES (%s, 'queued')", [job])
        conn.execute("INSERT INTO jobs_variants (job_variants_id, job_id, status) VALUES (%s, %s, 'queued')",
                     [uuid.uuid4(), job])  # fmt: skip
        conn.execute("UPDATE jobs_variants SET status = 'running', current_step = 'detect'")
        monkeypatch.undo()
        report = migrate.migrate(conn)
        assert [m.version for m in report.applied] == [m.version for m in every[12:]]  # 0013 and later
        assert conn.execute("SELECT count(*), count(trace_parent) FROM outbox_events").fetchone() == (2, 0)
        drain(make_settings(empty_db))
        assert conn.execute("SELECT status, current_step FROM jobs").fetchone() == ("running", "detect")
        assert conn.execute("SELECT to_status, trace_parent FROM outbox_job_transitions").fetchall() == [
            ("running", None)
        ]


NO_SDK = """
import json, sys, uuid
import sqlalchemy
from opentelemetry import trace
import outbox
from processor.settings import load_settings
from processor.worker import Worker

url, variant = sys.argv[1], uuid.UUID(sys.argv[2])
engine = sqlalchemy.create_engine(url)
with trace.get_tracer("application").start_as_current_span("application.finish") as span:
    with engine.begin() as conn:
        outbox.update_variant(conn, variant, status="done", step="iou_eval")
settings = load_settings(database_url=url, pipeline_steps="ingest,detect,segment,iou_eval")
stats = Worker(settings, settings.database()).run(until_idle=True)
reactions = []
delivered = outbox.Subscriber("no-sdk", url, lambda c, t: reactions.append(t.trace_parent)).run_until_idle()
print(json.dumps({
    "recording": span.is_recording(), "sdk": "opentelemetry.sdk" in sys.modules,
    "events": stats.events, "delivered": delivered, "trace_parents": reactions,
}))
"""


def test_without_an_sdk_nothing_is_written_to_trace_parent_and_nothing_breaks(db, engine, conn):
    """A fresh interpreter that never configures (nor imports) an SDK: the API's spans record nothing."""
    create_subscription(db, "no-sdk", ["done"])
    with engine.begin() as c:
        job, (variant,) = outbox.create_job(c, variants=1)
    url = db.url.render_as_string(hide_password=False)
    ran = subprocess.run(
        [sys.executable, "-c", NO_SDK, url, str(variant)],
        env=subprocess_env(db),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert ran.returncode == 0, ran.stderr
    result = json.loads(ran.stdout.strip().splitlines()[-1])
    assert result == {"recording": False, "sdk": False, "events": 2, "delivered": 1, "trace_parents": [None]}
    assert conn.execute("SELECT status FROM jobs WHERE job_id = %s", [job]).fetchone() == ("done",)
    assert conn.execute("SELECT count(trace_parent) FROM outbox_events").fetchone() == (0,)
    assert conn.execute("SELECT count(trace_parent) FROM outbox_job_transitions").fetchone() == (0,)
