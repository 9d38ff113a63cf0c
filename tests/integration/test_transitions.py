"""Job transitions written with the job state, and subscriptions that follow them exactly once."""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import random
import threading
import uuid
from typing import Any

import psycopg
import pytest

import outbox
import outbox.aio
from processor import subscriptions
from processor.database import connect
from processor.replay import replay
from processor.retention import retain
from processor.store import Segmented
from tests.fix_database import make_settings
from tests.helpers import drain, wait_for, write_jobs_behind_the_processor

# An independent record of every write of a job's state, in the order the rows changed (the row
# lock orders two writes of one job; the sequence is taken under it).
JOB_STATE_AUDIT = """
CREATE TABLE job_state_audit (
    audit_id bigserial PRIMARY KEY, job_id uuid, from_status text, from_step text, to_status text, to_step text);
CREATE FUNCTION audit_job_state() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF (OLD.status, OLD.current_step) IS DISTINCT FROM (NEW.status, NEW.current_step) THEN
        INSERT INTO job_state_audit (job_id, from_status, from_step, to_status, to_step)
        VALUES (NEW.job_id, OLD.status, OLD.current_step, NEW.status, NEW.current_step);
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER audit_job_state AFTER UPDATE ON jobs FOR EACH ROW EXECUTE FUNCTION audit_job_state();
"""
EFFECTS = "CREATE TABLE effects (transition_id bigint, job_id uuid, to_status text)"


def chains(conn: psycopg.Connection[Any], table: str, order: str) -> dict[uuid.UUID, list[tuple[Any, ...]]]:
    rows = conn.execute(
        f"SELECT job_id, from_status, from_step, to_status, to_step FROM {table} ORDER BY {order}"
    ).fetchall()
    by_job: dict[uuid.UUID, list[tuple[Any, ...]]] = {}
    for job_id, *change in rows:
        by_job.setdefault(job_id, []).append(tuple(change))
    return by_job


def assert_transitions_match_the_audit(conn: psycopg.Connection[Any]) -> int:
    transitions = chains(conn, "outbox_job_transitions", "transition_id")
    assert transitions == chains(conn, "job_state_audit", "audit_id")
    for job_id, chain in transitions.items():
        for before, after in itertools.pairwise(chain):
            assert before[2:] == after[:2], f"job {job_id}: {before} then {after}"
        (status, step) = conn.execute("SELECT status, current_step FROM jobs WHERE job_id = %s", [job_id]).fetchone()
        assert chain[-1][2:] == (status, step)
    return sum(len(chain) for chain in transitions.values())


def drive(engine: Any, jobs: dict[uuid.UUID, list[uuid.UUID]], seed: int) -> None:
    """Move every variant through the pipeline in random order, a few variants per transaction."""
    rng = random.Random(seed)
    moves = []
    for variants in jobs.values():
        for variant in variants:
            for step in ("ingest", "detect", "segment", "iou_eval"):
                moves.append((variant, "running", step))
            moves.append((variant, "done" if rng.random() > 0.1 else "failed", "iou_eval"))
    # Each variant's own moves stay in order; variants interleave.
    by_variant: dict[uuid.UUID, list[tuple[uuid.UUID, str, str]]] = {}
    for move in moves:
        by_variant.setdefault(move[0], []).append(move)
    queues = list(by_variant.values())
    while queues:
        with engine.begin() as conn:
            for queue in rng.sample(queues, min(3, len(queues))):
                variant, status, step = queue.pop(0)
                outbox.update_variant(conn, variant, status=status, step=step)
        queues = [q for q in queues if q]


def test_each_job_state_written_is_one_transition_chained_per_job(db, engine, conn):
    conn.execute(JOB_STATE_AUDIT)
    settings = make_settings(db)
    with engine.begin() as c:
        jobs = dict(outbox.create_job(c, variants=random.Random(1).randint(2, 4)) for _ in range(40))
    stop = threading.Event()
    writers = [threading.Thread(target=drive, args=(engine, dict(list(jobs.items())[i::4]), i)) for i in range(4)]
    for thread in writers:
        thread.start()
    while any(thread.is_alive() for thread in writers):
        drain(settings)
    drain(settings)
    stop.set()
    count = assert_transitions_match_the_audit(conn)
    assert count >= 2 * len(jobs)  # queued -> running -> ... -> done/failed at least
    finished = conn.execute("SELECT count(*) FROM outbox_job_transitions WHERE to_status IN ('done', 'failed')")
    assert finished.fetchone()[0] >= len(jobs)


def test_holds_replay_and_repair_write_their_transitions(db, engine, conn):
    conn.execute(JOB_STATE_AUDIT)
    settings = make_settings(db)
    with engine.begin() as c:
        job, (v1, _) = outbox.create_job(c, variants=2)
        outbox.update_variant(c, v1, status="running", step="detect")
    drain(settings)
    folded = tuple(conn.execute("SELECT status, current_step FROM jobs WHERE job_id = %s", [job]).fetchone())
    with engine.begin() as c:
        outbox.hold_job(c, job, status="failed", step="detect", reason="cancelled by support")
    with engine.begin() as c:
        outbox.release_job(c, job)
    drain(settings)
    # A corruption behind the processor's back (no transition: it is not a state the processor
    # wrote), then replay writes the state back, with its transition.
    write_jobs_behind_the_processor(conn, "UPDATE jobs SET status = 'done' WHERE job_id = %s", [job])
    with connect(db, application_name="outbox-tests") as op:
        replay(op, [job], dry_run=False)
    written = conn.execute(
        "SELECT from_status, from_step, to_status, to_step, written_by "
        "FROM outbox_job_transitions ORDER BY transition_id"
    ).fetchall()
    assert written == [
        ("queued", None, *folded, "processor"),
        (*folded, "failed", "detect", "hold"),
        ("failed", "detect", *folded, "processor"),  # the release: folded from its variants again
        ("done", folded[1], *folded, "processor"),  # replay's repair
    ]


def test_a_subscriber_handles_each_transition_once_in_the_handlers_transaction(db, engine, conn):
    conn.execute(EFFECTS)
    settings = make_settings(db)
    with connect(db, application_name="outbox-tests") as op:
        subscriptions.create(op, "effects", from_start=True, to_statuses=["done", "failed"])
    finish = "UPDATE jobs_variants SET status = 'done', current_step = 'iou_eval' WHERE job_id = %s"
    with engine.begin() as c:
        jobs = [outbox.create_job(c, variants=2)[0] for _ in range(30)]
    drain(settings)
    for job in jobs:
        conn.execute(finish, [job])
    drain(settings)

    def handler(c: psycopg.Connection[Any], t: outbox.Transition) -> None:
        c.execute("INSERT INTO effects VALUES (%s, %s, %s)", [t.transition_id, t.job_id, t.to_status])

    subscriber = outbox.Subscriber("effects", db.url.render_as_string(hide_password=False), handler)
    assert subscriber.run_until_idle() == 30
    assert subscriber.run_until_idle() == 0
    effects = conn.execute("SELECT job_id, to_status FROM effects ORDER BY transition_id").fetchall()
    assert sorted(effects) == sorted((job, "done") for job in jobs)
    (info,) = subscriptions.list_subscriptions(conn, "effects")
    # Past the transitions the filter leaves out too: nothing is left to read.
    assert info.lag == 0 and info.position == info.head


@pytest.mark.parametrize("per_transaction", [1, 50])
def test_a_failing_handler_is_retried_then_parked_and_the_rest_go_on(db, engine, conn, per_transaction):
    conn.execute(EFFECTS)
    settings = make_settings(db)
    with connect(db, application_name="outbox-tests") as op:
        subscriptions.create(op, "flaky", from_start=True, to_statuses=["done"])
    with engine.begin() as c:
        jobs = [outbox.create_job(c, variants=1) for _ in range(3)]
    for _, (variant,) in jobs:
        conn.execute("UPDATE jobs_variants SET status = 'done', current_step = 'iou_eval' WHERE job_variants_id = %s",
                     [variant])  # fmt: skip
    drain(settings)
    in_order = [row[0] for row in conn.execute("SELECT job_id FROM outbox_job_transitions ORDER BY transition_id")]
    poison = in_order[1]
    calls: list[uuid.UUID] = []

    def handler(c: psycopg.Connection[Any], t: outbox.Transition) -> None:
        calls.append(t.job_id)
        c.execute("INSERT INTO effects VALUES (%s, %s, %s)", [t.transition_id, t.job_id, t.to_status])
        if t.job_id == poison:
            raise ValueError("cannot bill this job")

    policy = outbox.RetryPolicy(max_attempts=3, first_delay=0.05, max_delay=0.2)
    url = db.url.render_as_string(hide_password=False)
    subscriber = outbox.Subscriber("flaky", url, handler, retry=policy, per_transaction=per_transaction)
    assert subscriber.run_until_idle() == 2
    # In order: the rest waited for it. Handled together, the first was called again once the
    # transaction of both rolled back (its effect once all the same: checked below).
    first = [in_order[0]] if per_transaction == 1 else [in_order[0], poison, in_order[0]]
    assert calls == [*first, poison, poison, poison, in_order[2]]
    # The failed attempts' effects rolled back with them.
    assert {row[0] for row in conn.execute("SELECT job_id FROM effects")} == {in_order[0], in_order[2]}
    (failure,) = subscriptions.failures(conn, "flaky")
    assert failure.attempts == 3 and failure.parked_at and "ValueError: cannot bill this job" in failure.last_error
    assert subscriptions.list_subscriptions(conn, "flaky")[0].parked == 1

    # Retried by an operator, once the cause is fixed: delivered, then no longer listed.
    poison = uuid.uuid4()
    assert subscriptions.retry(conn, "flaky", None) == [failure.transition_id]
    assert subscriber.run_until_idle() == 1
    assert subscriptions.failures(conn, "flaky") == []
    assert conn.execute("SELECT count(*) FROM effects").fetchone()[0] == 3


def test_a_standby_subscriber_takes_over_without_delivering_twice(db, engine, conn):
    conn.execute(EFFECTS)
    settings = make_settings(db)
    with connect(db, application_name="outbox-tests") as op:
        subscriptions.create(op, "takeover", from_start=True, to_statuses=None)
    url = db.url.render_as_string(hide_password=False)

    def handler(c: psycopg.Connection[Any], t: outbox.Transition) -> None:
        c.execute("INSERT INTO effects VALUES (%s, %s, %s)", [t.transition_id, t.job_id, t.to_status])

    first = outbox.Subscriber("takeover", url, handler, poll_interval=0.05, standby_interval=0.05)
    second = outbox.Subscriber("takeover", url, handler, poll_interval=0.05, standby_interval=0.05)
    threads = [threading.Thread(target=s.run) for s in (first, second)]
    threads[0].start()
    wait_for(lambda: first.active, what="the first subscriber to be active")
    threads[1].start()
    with engine.begin() as c:
        for _ in range(10):
            outbox.create_job(c, variants=1)
    conn.execute("UPDATE jobs_variants SET status = 'running', current_step = 'detect'")
    drain(settings)
    wait_for(lambda: first.delivered == 10, what="the active subscriber to deliver")
    assert not second.active and second.delivered == 0
    first.stop()
    threads[0].join(10)
    conn.execute("UPDATE jobs_variants SET status = 'done', current_step = 'iou_eval'")
    drain(settings)
    wait_for(lambda: second.delivered == 10, what="the standby to take over")
    second.stop()
    threads[1].join(10)
    counts = conn.execute("SELECT transition_id, count(*) FROM effects GROUP BY 1").fetchall()
    assert len(counts) == 20 and all(n == 1 for _, n in counts)


@pytest.mark.parametrize("kind", ["psycopg", "sqlalchemy+psycopg", "sqlalchemy+asyncpg"])
def test_the_asyncio_subscriber_runs_in_the_applications_loop_and_stops_on_cancel(db, engine, conn, kind):
    conn.execute(EFFECTS)
    settings = make_settings(db)
    with connect(db, application_name="outbox-tests") as op:
        subscriptions.create(op, "aio", from_start=True, to_statuses=None)
    with engine.begin() as c:
        for _ in range(5):
            outbox.create_job(c, variants=1)
    conn.execute("UPDATE jobs_variants SET status = 'running', current_step = 'detect'")
    drain(settings)

    async def main() -> int:
        if kind == "psycopg":
            source: Any = await psycopg.AsyncConnection.connect(db.url.render_as_string(hide_password=False).replace(
                "postgresql+psycopg", "postgresql"), autocommit=True)  # fmt: skip

            async def handler(c: Any, t: outbox.Transition) -> None:
                await c.execute("INSERT INTO effects VALUES (%s, %s, %s)", [t.transition_id, t.job_id, t.to_status])
        else:
            from sqlalchemy import text
            from sqlalchemy.ext.asyncio import create_async_engine

            driver = kind.split("+")[1]
            source = create_async_engine(db.url.set(drivername=f"postgresql+{driver}"))

            async def handler(c: Any, t: outbox.Transition) -> None:
                await c.execute(text("INSERT INTO effects VALUES (:id, :job, :status)"),
                                {"id": t.transition_id, "job": t.job_id, "status": t.to_status})  # fmt: skip

        subscriber = outbox.aio.AsyncSubscriber("aio", source, handler, poll_interval=0.05)
        task = asyncio.create_task(subscriber.run())
        while subscriber.delivered < 5:
            await asyncio.sleep(0.01)  # the loop stays free while the subscriber waits
        await asyncio.to_thread(conn.execute, "UPDATE jobs_variants SET status = 'done', current_step = 'iou_eval'")
        await asyncio.to_thread(drain, settings)
        while subscriber.delivered < 10:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not subscriber.active
        if kind == "psycopg":
            await source.close()
        else:
            await source.dispose()
        return subscriber.delivered

    assert asyncio.run(main()) == 10
    counts = conn.execute("SELECT transition_id, count(*) FROM effects GROUP BY 1").fetchall()
    assert len(counts) == 10 and all(n == 1 for _, n in counts)
    # The lock went with the cancelled consumer: another one becomes active at once.
    again = outbox.Subscriber("aio", db.url.render_as_string(hide_password=False), lambda c, t: None)
    assert again.run_until_idle() == 0


def test_prune_keeps_what_a_lagging_subscription_still_needs(db, engine, conn):
    settings = make_settings(db)
    with connect(db, application_name="outbox-tests") as op:
        subscriptions.create(op, "slow", from_start=True, to_statuses=None)
        subscriptions.create(op, "fast", from_start=True, to_statuses=None)
    with engine.begin() as c:
        for _ in range(6):
            outbox.create_job(c, variants=1)
    conn.execute("UPDATE jobs_variants SET status = 'running', current_step = 'detect'")
    drain(settings)
    url = db.url.render_as_string(hide_password=False)
    assert outbox.Subscriber("fast", url, lambda c, t: None).run_until_idle() == 6
    slow = outbox.Subscriber("slow", url, lambda c, t: None, batch_size=2)
    # slow acknowledges 2 of the 6 (one page), then stops.
    page = slow._deliver_page
    with connect(db, application_name="outbox-tests") as sc:
        from outbox.subscriber import _Session

        slow.active = True
        page(_Session(sc))
    with connect(db, application_name="outbox-tests") as op:
        kept = retain(op, dt.timedelta(0))
    # Transitions leave by whole segments: the one slow has not acknowledged whole stays, whole.
    assert kept.removed(Segmented.TRANSITIONS) == 0
    assert [s.kept_because for s in kept.kept() if s.table is Segmented.TRANSITIONS] == [
        "a subscription has not acknowledged every transition in it"
    ]
    remaining = [row[0] for row in conn.execute("SELECT transition_id FROM outbox_job_transitions ORDER BY 1")]
    assert len(remaining) == 6
    assert outbox.Subscriber("slow", url, lambda c, t: None).run_until_idle() == 4
    with connect(db, application_name="outbox-tests") as op:
        assert retain(op, dt.timedelta(0)).removed(Segmented.TRANSITIONS) == 6
    assert conn.execute("SELECT count(*) FROM outbox_job_transitions").fetchone()[0] == 0


def test_an_application_transaction_that_blocks_one_partition_never_holds_back_the_others(db, engine, conn):
    """The lock that orders transitions is taken by the last statement before a batch's commit: a
    worker waiting for an application's row (here the dirty-job row of an open hold and release)
    waits without it, and the other partitions' transitions go on."""
    from processor.repartition import repartition
    from tests.helpers import job_in_partition

    with connect(db, application_name="outbox-repartition") as op:
        repartition(op, 2, timeout=30)
    blocked_job, free_job = job_in_partition(0, 2), job_in_partition(1, 2)
    with engine.begin() as c:
        (blocked_variant,) = outbox.create_job(c, job_id=blocked_job, variants=1)[1]
        (free_variant,) = outbox.create_job(c, job_id=free_job, variants=1)[1]
    other_job = job_in_partition(0, 2)
    with engine.begin() as c:
        (other_variant,) = outbox.create_job(c, job_id=other_job, variants=1)[1]
    with connect(db, application_name="application", autocommit=False) as app:
        outbox.hold_job(app, blocked_job, status="failed", reason="cancelled")
        outbox.release_job(app, blocked_job)  # its dirty-job row, uncommitted
        for variant in (blocked_variant, other_variant, free_variant):
            conn.execute(
                "UPDATE jobs_variants SET status = 'running', current_step = 'detect' WHERE job_variants_id = %s",
                [variant],
            )
        waiting = threading.Thread(target=drain, args=(make_settings(db, partition=0),), daemon=True)
        waiting.start()  # partition 0 writes other_job, then waits for the application's row
        wait_for(
            lambda: conn.execute(
                "SELECT 1 FROM pg_stat_activity "
                "WHERE wait_event_type = 'Lock' AND application_name LIKE 'outbox-worker%'"
            ).fetchone(),
            what="partition 0's worker to wait for the application",
        )
        free = threading.Thread(target=drain, args=(make_settings(db, partition=1),))
        free.start()
        free.join(30)
        assert not free.is_alive(), "partition 1 waited for an application transaction on partition 0"
        written = conn.execute("SELECT job_id FROM outbox_job_transitions").fetchall()
        assert [row[0] for row in written] == [free_job]
        app.commit()
    waiting.join(60)
    drain(make_settings(db))
    assert_chains_whole(conn)


def assert_chains_whole(conn: psycopg.Connection[Any]) -> None:
    for job_id, chain in chains(conn, "outbox_job_transitions", "transition_id").items():
        for before, after in itertools.pairwise(chain):
            assert before[2:] == after[:2], f"job {job_id}: {before} then {after}"


def test_a_parked_transition_given_back_is_delivered_by_one_consumer_only(db, engine, conn):
    """The position does not move when a parked transition is delivered again: its failure row,
    locked, fences a second consumer (one that got past the session lock) that read the same page."""
    from outbox.subscriber import _Session
    from outbox.subscription import FencedError, Page

    conn.execute(EFFECTS)
    settings = make_settings(db)
    with connect(db, application_name="outbox-tests") as op:
        subscriptions.create(op, "once", from_start=True, to_statuses=None)
    with engine.begin() as c:
        outbox.create_job(c, variants=1)
    conn.execute("UPDATE jobs_variants SET status = 'running', current_step = 'detect'")
    drain(settings)
    url = db.url.render_as_string(hide_password=False)

    def failing(c: Any, t: outbox.Transition) -> None:
        raise RuntimeError("down")

    assert outbox.Subscriber("once", url, failing, retry=outbox.RetryPolicy(max_attempts=1)).run_until_idle() == 0
    assert len(subscriptions.retry(conn, "once", None)) == 1

    def effect(c: Any, t: outbox.Transition) -> None:
        c.execute("INSERT INTO effects VALUES (%s, %s, %s)", [t.transition_id, t.job_id, t.to_status])

    first, second = (outbox.Subscriber("once", url, effect) for _ in range(2))
    with connect(db, application_name="first") as a, connect(db, application_name="second") as b:
        pages = [
            Page.of("once", _Session(c).fetch("transitions_page", {"name": "once", "limit": 10}), 10) for c in (a, b)
        ]
        (transition,) = pages[0].transitions
        assert transition.transition_id <= pages[0].position  # a redelivery: behind the position
        assert first._deliver(_Session(a), transition, pages[0].position)
        with pytest.raises(FencedError, match="delivered again by another consumer"):
            second._deliver(_Session(b), pages[1].transitions[0], pages[1].position)
    assert conn.execute("SELECT count(*) FROM effects").fetchone()[0] == 1


def test_a_page_row_names_the_columns_the_page_statement_returns(conn):
    from outbox.subscription import QUERIES, PageRow

    with conn.cursor() as cur:
        cur.execute(QUERIES["transitions_page"], {"name": "nobody", "limit": 1})
        assert tuple(column.name for column in cur.description or ()) == PageRow._fields


def test_a_connection_that_cannot_hold_the_handlers_transaction_is_refused(db, engine, conn):
    """In AUTOCOMMIT, or inside a transaction already, the effect and the acknowledgement would not
    commit together: refused with the reason. An engine in AUTOCOMMIT is used in READ COMMITTED."""
    conn.execute(EFFECTS)
    with connect(db, application_name="outbox-tests") as op:
        subscriptions.create(op, "tx", from_start=True, to_statuses=None)
    with engine.connect() as sa:
        auto = sa.execution_options(isolation_level="AUTOCOMMIT")
        with pytest.raises(ValueError, match="AUTOCOMMIT"):
            outbox.Subscriber("tx", auto, lambda c, t: None).run_until_idle()
    with connect(db, application_name="busy", autocommit=False) as busy:
        busy.execute("SELECT 1")  # a transaction left open
        with pytest.raises(ValueError, match="inside a transaction"):
            outbox.Subscriber("tx", busy, lambda c, t: None).run_until_idle()
    with engine.begin() as c:
        outbox.create_job(c, variants=1)
    conn.execute("UPDATE jobs_variants SET status = 'running', current_step = 'detect'")
    drain(make_settings(db))
    calls = []

    def effect_then_fail(c: Any, t: outbox.Transition) -> None:
        from sqlalchemy import text

        calls.append(t.transition_id)
        c.execute(text("INSERT INTO effects VALUES (:i, :j, :s)"), {"i": t.transition_id, "j": t.job_id, "s": "x"})
        if len(calls) == 1:
            raise RuntimeError("fails once, after its effect")

    autocommit_engine = engine.execution_options(isolation_level="AUTOCOMMIT")
    policy = outbox.RetryPolicy(max_attempts=3, first_delay=0.01, max_delay=0.01)
    assert outbox.Subscriber("tx", autocommit_engine, effect_then_fail, retry=policy).run_until_idle() == 1
    assert len(calls) == 2 and conn.execute("SELECT count(*) FROM effects").fetchone()[0] == 1


def test_a_worker_older_than_the_transitions_is_refused_not_silently_writing(conn, engine):
    """A worker of before migration 0012 says it is the processor with the old token: its write of
    job state (which would carry no transition) is refused with what to do."""
    with engine.begin() as c:
        job, _ = outbox.create_job(c, variants=1)
    with (
        pytest.raises(psycopg.errors.RestrictViolation, match="older than the database's schema"),
        conn.transaction(),
    ):
        conn.execute("SELECT set_config('outbox.job_writer', 'processor', true)")
        conn.execute("UPDATE jobs SET status = 'running' WHERE job_id = %s", [job])
    assert conn.execute("SELECT count(*) FROM outbox_job_transitions").fetchone()[0] == 0
