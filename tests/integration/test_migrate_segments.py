"""Migration 0015 on a populated outbox, while writers write: nothing lost, ids go on, writers barely wait.

The database is migrated to 0014, given about 80,000 events (pending: this code's worker needs 0015), then migrated
to 0015 while writer threads commit transactions. 0015's prepare steps (the segment column, the CHECK
validated while writers write, the primary key's index built concurrently) run first, so that the
migration's own transaction reads no row under the writers' lock. Checked: every event is still
there, once; new events take ids after the old ones; the pending ones are applied after the
upgrade and job state equals the reference; writers kept committing. Printed, not asserted: how
long migrate took and the longest a writer transaction took meanwhile.
"""

from __future__ import annotations

import random
import threading
import time
import uuid

import psycopg
import pytest

from processor import migrate
from processor.database import connect
from processor.workload import write_variant
from tests.fix_database import TEST_STEPS, make_settings
from tests.helpers import drain, make_jobs, wait_for
from tests.reference import actual_job_states, reference_job_states

STEPS = TEST_STEPS
# Events a bulk insert adds, the way capture writes them (same columns), to make the table large.
BULK_EVENTS = """
INSERT INTO outbox_events (event_type, schema_version, partition, job_id, variant_id, variant_version, payload)
SELECT 'variant_changed', 1, 0, v.job_id, v.job_variants_id, nextval('outbox_variant_versions'),
       jsonb_build_object('status', v.status, 'step', v.current_step)
FROM jobs_variants AS v CROSS JOIN generate_series(1, %(per_variant)s)
"""


class _Writers:
    """Writer threads updating their own variants, each transaction timed."""

    def __init__(self, db, variants: list[uuid.UUID], threads: int = 2) -> None:
        self.db = db
        self.stop = threading.Event()
        self.longest = 0.0
        self.committed = 0
        self.errors: list[BaseException] = []
        own = [variants[i::threads] for i in range(threads)]
        self._threads = [threading.Thread(target=self._write, args=(own[i], i), daemon=True) for i in range(threads)]

    def __enter__(self) -> _Writers:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self._threads:
            thread.join(timeout=60)

    def _write(self, variants: list[uuid.UUID], seed: int) -> None:
        rng = random.Random(seed)
        try:
            with connect(self.db, application_name="outbox-tests-writer") as conn:
                while not self.stop.is_set():
                    started = time.monotonic()
                    write_variant(conn, rng.choice(variants), rng.choice(["running", "done"]), rng.choice(STEPS))
                    self.longest = max(self.longest, time.monotonic() - started)
                    self.committed += 1
        except BaseException as exc:
            self.errors.append(exc)


def test_a_populated_outbox_becomes_segmented_while_writers_write(empty_db, monkeypatch, capsys):
    every = migrate.migrations()
    segments = next(m for m in every if m.name == "segments")
    assert segments.prepare_steps()[1], "0015 prepares outside its transaction"
    settings = make_settings(empty_db)
    with connect(empty_db, application_name="outbox-tests") as conn:
        monkeypatch.setattr(migrate, "migrations", lambda: every[: segments.version - 1])
        migrate.migrate(conn, pipeline=settings.pipeline)
        monkeypatch.undo()
        from sqlalchemy import create_engine

        engine = create_engine(empty_db.url)
        try:
            jobs = make_jobs(engine, 200, random.Random(15))
        finally:
            engine.dispose()
        conn.execute(BULK_EVENTS, {"per_variant": 100})
        before = conn.execute("SELECT count(*), max(event_id) FROM outbox_events").fetchone()
        assert before is not None and before[0] >= 50_000
        variants = [v for vs in jobs.values() for v in vs]
        with _Writers(empty_db, variants) as writers:
            while writers.committed < 50:  # the writers are under way
                time.sleep(0.01)
            mark = writers.committed
            started = time.monotonic()
            assert migrate.prepare(conn) == [segments]  # what migrate runs first (shown apart to time it)
            prepared = time.monotonic() - started
            report = migrate.migrate(conn)
            took = time.monotonic() - started
            longest_before = writers.longest
            while writers.committed < mark + 50:  # and still are
                time.sleep(0.01)
        assert not writers.errors, writers.errors[0]
        assert [m.version for m in report.applied] == [segments.version]

        assert conn.execute("SELECT relkind FROM pg_class WHERE oid = 'outbox_events'::regclass").fetchone() == ("p",)
        counts = conn.execute(
            "SELECT count(*) FILTER (WHERE segment = 0), count(*) FILTER (WHERE event_id > %s), "
            "count(DISTINCT event_id) = count(*), min(event_id) FILTER (WHERE segment <> 0) "
            "FROM outbox_events",
            [before[1]],
        ).fetchone()
        assert counts is not None
        in_s0, newer, unique, first_new = counts
        assert in_s0 >= before[0] and unique  # every old event, once; those written during the prepare too
        assert first_new is None or first_new > before[1]  # the identity goes on after the old ids
        assert newer > 0
        drain(settings)
        assert actual_job_states(conn) == reference_job_states(conn, STEPS)
    with capsys.disabled():
        print(
            f"\nmigrate 0015 on {before[0]:,} events: {took:.2f} s ({prepared:.2f} s of prepare steps); "
            f"{writers.committed} writer transactions, "
            f"the longest {writers.longest * 1000:.0f} ms (before migrate: {longest_before * 1000:.0f} ms)"
        )


@pytest.mark.parametrize("table", ["outbox_events", "outbox_job_transitions"])
def test_the_prepare_steps_are_safe_to_run_again(empty_db, monkeypatch, table):
    every = migrate.migrations()
    segments = next(m for m in every if m.name == "segments")
    with connect(empty_db, application_name="outbox-tests") as conn:
        monkeypatch.setattr(migrate, "migrations", lambda: every[: segments.version - 1])
        migrate.migrate(conn, pipeline=make_settings(empty_db).pipeline)
        monkeypatch.undo()
        migrate.prepare(conn)
        migrate.prepare(conn)  # again: nothing to do, no error
        valid = conn.execute(
            "SELECT convalidated FROM pg_constraint WHERE conrelid = %s::regclass AND conname = %s",
            [table, f"{table}_s0_segment"],
        ).fetchone()
        assert valid == (True,)
        migrate.migrate(conn)
        assert conn.execute("SELECT relkind FROM pg_class WHERE oid = %s::regclass", [table]).fetchone() == ("p",)


def _at_0014(db, monkeypatch) -> None:
    """Migrate ``db`` to the version before 0015 and add a thousand events."""
    every = migrate.migrations()
    segments = next(m for m in every if m.name == "segments")
    with connect(db, application_name="outbox-tests") as conn:
        monkeypatch.setattr(migrate, "migrations", lambda: every[: segments.version - 1])
        migrate.migrate(conn, pipeline=make_settings(db).pipeline)
        monkeypatch.undo()
        conn.execute(
            "INSERT INTO outbox_events (event_type, schema_version, payload)"
            " SELECT 'x', 1, '{}' FROM generate_series(1, 1000)"
        )


def test_two_migrates_at_once_take_turns(empty_db, monkeypatch):
    """The second waits for the first's commit, then has nothing to do. An open snapshot makes the
    first's CREATE INDEX CONCURRENTLY wait meanwhile: the second must not hold a snapshot while it
    waits (that would deadlock them)."""
    _at_0014(empty_db, monkeypatch)
    results: dict[str, object] = {}

    def run(name: str) -> None:
        with connect(empty_db, application_name=f"outbox-tests-{name}") as conn:
            try:
                results[name] = [m.version for m in migrate.migrate(conn).applied]
            except Exception as exc:
                results[name] = exc

    with connect(empty_db, application_name="outbox-tests-held", autocommit=False) as held:
        held.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        held.execute("SELECT 1").fetchone()
        first = threading.Thread(target=run, args=("first",))
        first.start()
        wait_for(lambda: _session_doing(empty_db, "first", "Lock"), what="the first's index build to wait")
        second = threading.Thread(target=run, args=("second",))
        second.start()
        wait_for(lambda: _session_doing(empty_db, "second", "pg_try_advisory_lock"), what="the second to poll")
        held.rollback()
    first.join(timeout=60)
    second.join(timeout=60)
    assert sorted(map(str, results.values())) == ["[15]", "[]"], results


def _session_doing(db, name: str, what: str) -> bool:
    """Whether migrate ``name``'s session waits for a lock (``what`` "Lock") or last ran a statement
    naming ``what``."""
    with connect(db, application_name="outbox-tests") as conn:
        row = conn.execute(
            "SELECT EXISTS (SELECT FROM pg_stat_activity WHERE application_name = %s"
            " AND (wait_event_type = %s OR query LIKE '%%' || %s || '%%'))",
            [f"outbox-tests-{name}", what, what],
        ).fetchone()
    return bool(row and row[0])


def test_migrate_on_a_connection_that_is_not_autocommit(empty_db, monkeypatch):
    _at_0014(empty_db, monkeypatch)
    with psycopg.connect(empty_db.url.render_as_string(hide_password=False).replace("+psycopg", "")) as conn:
        assert not conn.autocommit
        assert [m.version for m in migrate.migrate(conn).applied] == [15]
        assert conn.execute("SELECT relkind FROM pg_class WHERE oid = 'outbox_events'::regclass").fetchone() == ("p",)


def test_an_index_a_failed_prepare_left_invalid_is_built_again(empty_db, monkeypatch):
    """A prepare step gives up behind an open snapshot (after its lock timeout), leaving an invalid
    index; the migration, run inside a transaction (so without its prepare steps), builds it again."""
    _at_0014(empty_db, monkeypatch)
    monkeypatch.setattr(migrate, "PREPARE_LOCK_TIMEOUT", "200ms")
    with connect(empty_db, application_name="outbox-tests") as conn:
        with connect(empty_db, application_name="outbox-tests-held", autocommit=False) as held:
            held.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            held.execute("SELECT 1").fetchone()
            with pytest.raises(migrate.SchemaError, match="could not prepare"):
                migrate.prepare(conn)
            held.rollback()
        valid = conn.execute(
            "SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass('outbox_events_s0_pkey_new')"
        ).fetchone()
        assert valid == (False,)
        with conn.transaction():
            assert [m.version for m in migrate.migrate(conn).applied] == [15]
        assert conn.execute("SELECT count(*) FROM outbox_events").fetchone() == (1000,)


def test_nobody_but_the_owner_and_the_processor_may_run_retention(empty_db):
    """Retention's functions run with the owner's rights: PUBLIC may not call them, even before
    schema/roles.sql runs."""
    with connect(empty_db, application_name="outbox-tests") as conn:
        migrate.migrate(conn, pipeline=make_settings(empty_db).pipeline)
        role = f"outbox_nobody_{uuid.uuid4().hex[:8]}"
        conn.execute(f"CREATE ROLE {role}")
        try:
            for function in (
                "outbox_segments_rotate(text)",
                "outbox_events_segment_truncate(smallint, pg_snapshot)",
                "outbox_job_transitions_segment_truncate(smallint, timestamptz)",
                "outbox_segment_create(text, smallint)",
            ):
                allowed = conn.execute("SELECT has_function_privilege(%s, %s, 'EXECUTE')", [role, function]).fetchone()
                assert allowed == (False,), function
        finally:
            conn.execute(f"DROP ROLE {role}")
