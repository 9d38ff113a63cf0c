"""Least privilege: schema/roles.sql gives outbox_writer and outbox_processor exactly what they need.

Each test runs roles.sql in its fresh database and creates two LOGIN roles, members of the group
roles, with names unique to the run (roles are cluster-wide); they are dropped at teardown, and so
are the group roles when this test created them (an earlier run, or a run in another database,
may have created them already: roles.sql creates them only when missing). The shared server trusts
127.0.0.1, so the logins need no password.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import itertools
import os
import random
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

import outbox
from processor.backlog import collect_backlog
from processor.database import DatabaseUrl, connect
from processor.dead_letters import discard, list_dead_letters, retry
from processor.metrics import scan as metrics_scan
from processor.replay import replay
from processor.retention import retain
from processor.store import Segmented, job_ids_all
from processor.verify import repair, verify
from tests.fix_database import make_settings
from tests.helpers import drain, write_jobs_behind_the_processor
from tests.reference import actual_job_states, reference_job_states

ROLES_SQL = Path(__file__).resolve().parents[2] / "schema" / "roles.sql"
STEPS = ("ingest", "detect", "segment", "iou_eval")
WRITER, PROCESSOR, SUBSCRIBER = "outbox_writer", "outbox_processor", "outbox_subscriber"
GROUPS = (WRITER, PROCESSOR, SUBSCRIBER)

_counter = itertools.count()

# The expected matrix, written out. Table-level privileges per table and group role ("" = none);
# every product table and both application tables must be listed (test_every_object_is_in_the_matrix).
TABLE_PRIVILEGES = ("SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE", "REFERENCES", "TRIGGER")
TABLES: dict[str, dict[str, str]] = {
    "jobs": {WRITER: "SELECT INSERT DELETE", PROCESSOR: ""},
    "jobs_variants": {WRITER: "SELECT INSERT UPDATE DELETE", PROCESSOR: ""},
    "outbox_events": {WRITER: "", PROCESSOR: "SELECT DELETE"},
    "outbox_checkpoints": {WRITER: "", PROCESSOR: "SELECT UPDATE"},
    "outbox_dirty_jobs": {WRITER: "", PROCESSOR: "SELECT INSERT UPDATE DELETE"},
    "outbox_job_flags": {WRITER: "", PROCESSOR: "SELECT INSERT UPDATE DELETE"},
    "outbox_variant_states": {WRITER: "", PROCESSOR: "SELECT INSERT UPDATE DELETE"},
    "outbox_dead_letters": {WRITER: "", PROCESSOR: "SELECT INSERT UPDATE DELETE"},
    "outbox_throughput": {WRITER: "", PROCESSOR: "SELECT INSERT UPDATE DELETE"},
    "outbox_variant_baseline": {WRITER: "", PROCESSOR: "SELECT INSERT UPDATE"},
    "outbox_schema_migrations": {WRITER: "", PROCESSOR: "SELECT", SUBSCRIBER: "SELECT"},
    "outbox_partitioning": {WRITER: "", PROCESSOR: "SELECT"},
    "outbox_fold_config": {WRITER: "SELECT", PROCESSOR: "SELECT UPDATE", SUBSCRIBER: "SELECT"},
    "outbox_job_holds": {WRITER: "", PROCESSOR: "SELECT"},  # written by outbox_hold_job (owner's rights)
    # Transitions (0012): the processor writes and prunes them; a subscriber reads them and moves
    # its own subscription's position; a hold stages its transition with the owner's rights.
    "outbox_job_transitions": {WRITER: "", PROCESSOR: "SELECT INSERT DELETE", SUBSCRIBER: "SELECT"},
    "outbox_job_transitions_staged": {WRITER: "", PROCESSOR: "SELECT DELETE"},
    # Segments (0015): the processor reads them; it rotates and truncates through owner's functions.
    "outbox_segments": {WRITER: "", PROCESSOR: "SELECT"},
    "outbox_subscriptions": {WRITER: "", PROCESSOR: "SELECT INSERT UPDATE DELETE", SUBSCRIBER: "SELECT"},
    "outbox_subscription_failures": {
        WRITER: "",
        PROCESSOR: "SELECT INSERT UPDATE DELETE",
        SUBSCRIBER: "SELECT INSERT UPDATE DELETE",
    },
}
# Column-level privileges, for the tables where they differ from the table-level ones; elsewhere a
# column has exactly the table's SELECT/INSERT/UPDATE/REFERENCES.
COLUMN_PRIVILEGES = ("SELECT", "INSERT", "UPDATE", "REFERENCES")
_EVENT_WRITE = {WRITER: "INSERT", PROCESSOR: "SELECT INSERT"}  # the columns the capture function writes
COLUMNS: dict[tuple[str, str], dict[str, str]] = {
    # The writer inserts jobs (create_job) but never updates a job's state; the processor writes it.
    ("jobs", "job_id"): {WRITER: "SELECT INSERT", PROCESSOR: "SELECT"},
    ("jobs", "status"): {WRITER: "SELECT INSERT", PROCESSOR: "SELECT UPDATE"},
    ("jobs", "current_step"): {WRITER: "SELECT INSERT", PROCESSOR: "SELECT UPDATE"},
    ("jobs", "updated_at"): {WRITER: "SELECT INSERT", PROCESSOR: "SELECT UPDATE"},
    # UPDATE of updated_at only so that verify --repair may lock a variant row (FOR UPDATE).
    ("jobs_variants", "job_variants_id"): {WRITER: "SELECT INSERT UPDATE", PROCESSOR: "SELECT"},
    ("jobs_variants", "job_id"): {WRITER: "SELECT INSERT UPDATE", PROCESSOR: "SELECT"},
    ("jobs_variants", "status"): {WRITER: "SELECT INSERT UPDATE", PROCESSOR: "SELECT"},
    ("jobs_variants", "current_step"): {WRITER: "SELECT INSERT UPDATE", PROCESSOR: "SELECT"},
    ("jobs_variants", "updated_at"): {WRITER: "SELECT INSERT UPDATE", PROCESSOR: "SELECT UPDATE"},
    # Nobody chooses an event's id, txid or time.
    ("outbox_events", "event_id"): {WRITER: "", PROCESSOR: "SELECT"},
    ("outbox_events", "txid"): {WRITER: "", PROCESSOR: "SELECT UPDATE"},
    ("outbox_events", "partition"): _EVENT_WRITE,
    ("outbox_events", "event_type"): _EVENT_WRITE,
    ("outbox_events", "schema_version"): _EVENT_WRITE,
    ("outbox_events", "job_id"): _EVENT_WRITE,
    ("outbox_events", "variant_id"): _EVENT_WRITE,
    ("outbox_events", "variant_version"): _EVENT_WRITE,
    ("outbox_events", "payload"): _EVENT_WRITE,
    ("outbox_events", "trace_parent"): _EVENT_WRITE,  # capture copies the writer's trace context (0013)
    ("outbox_events", "created_at"): {WRITER: "", PROCESSOR: "SELECT"},
    # A subscriber moves its position; nothing else of a subscription.
    ("outbox_subscriptions", "position"): {WRITER: "", PROCESSOR: "SELECT INSERT UPDATE", SUBSCRIBER: "SELECT UPDATE"},
    ("outbox_subscriptions", "acknowledged_at"): {
        WRITER: "",
        PROCESSOR: "SELECT INSERT UPDATE",
        SUBSCRIBER: "SELECT UPDATE",
    },
}
SEQUENCE_PRIVILEGES = ("USAGE", "SELECT", "UPDATE")
SEQUENCES: dict[str, dict[str, str]] = {
    "outbox_variant_versions": {WRITER: "USAGE", PROCESSOR: "USAGE"},
    # An identity column's sequence needs no grant to insert.
    "outbox_events_event_id_seq": {WRITER: "", PROCESSOR: ""},
    "outbox_job_transitions_transition_id_seq": {WRITER: "", PROCESSOR: ""},
    "outbox_job_transitions_staged_staged_id_seq": {WRITER: "", PROCESSOR: ""},
}
FUNCTIONS: dict[str, dict[str, bool]] = {
    "outbox_partition_of(uuid)": {WRITER: True, PROCESSOR: True},
    "outbox_partition_hash(uuid,integer)": {WRITER: True, PROCESSOR: True},
    "outbox_append_variant_event(text,uuid,uuid,text,text)": {WRITER: True, PROCESSOR: True},
    "outbox_event_applied_v1(xid8,bigint,pg_snapshot,pg_snapshot,xid8,bigint)": {WRITER: False, PROCESSOR: True},
    "outbox_variant_states_merge_v1(outbox_variant_states[])": {WRITER: False, PROCESSOR: True},
    "outbox_event_payload(jsonb)": {WRITER: False, PROCESSOR: True},
    "outbox_payload_fits(jsonb)": {WRITER: False, PROCESSOR: True},
    "outbox_state_newer(bigint,bigint,bigint,bigint)": {WRITER: False, PROCESSOR: True},
    "outbox_variant_states_newest(outbox_variant_states[])": {WRITER: False, PROCESSOR: True},
    "outbox_variant_baseline_merge(outbox_variant_states[])": {WRITER: False, PROCESSOR: True},
    "outbox_event_decode_v1(text,integer,uuid,uuid,bigint,jsonb,bigint)": {WRITER: False, PROCESSOR: True},
    "outbox_versions_issued_v1()": {WRITER: False, PROCESSOR: True},
    "outbox_unreadable_problem_v1(bigint,text)": {WRITER: False, PROCESSOR: True},
    "outbox_events_pending(integer)": {WRITER: False, PROCESSOR: True},
    # Capture calls these, with the writer's rights: to refuse a bad status or step, and for a
    # change made inside another trigger.
    "outbox_refuse_variant(text,text)": {WRITER: True, PROCESSOR: False},
    "outbox_capture_change(uuid,uuid,uuid,uuid,text,text)": {WRITER: True, PROCESSOR: False},
    # The casts of the application's column types (0010), and holds (owner's rights).
    "outbox_job_status(text)": {WRITER: True, PROCESSOR: True},
    "outbox_job_step(text)": {WRITER: True, PROCESSOR: True},
    "outbox_variant_status(text)": {WRITER: True, PROCESSOR: False},
    "outbox_variant_step(text)": {WRITER: True, PROCESSOR: False},
    "outbox_hold_job(uuid,text,text,text)": {WRITER: True, PROCESSOR: False},
    "outbox_release_job(uuid)": {WRITER: True, PROCESSOR: False},
    "outbox_guard_job_state()": {WRITER: False, PROCESSOR: False},
    # Checked when the trigger is created (by migrate), not when it fires.
    "outbox_capture_variant_change()": {WRITER: False, PROCESSOR: False},
    "outbox_capture_variant_update()": {WRITER: False, PROCESSOR: False},
    "outbox_wakeup_notify()": {WRITER: False, PROCESSOR: False},
    # DDL, for the owner only (outbox repartition, outbox migrate --wakeup).
    "outbox_partitions_set(integer)": {WRITER: False, PROCESSOR: False},
    "outbox_wakeup_enable()": {WRITER: False, PROCESSOR: False},
    "outbox_wakeup_disable()": {WRITER: False, PROCESSOR: False},
    # Transitions (0012): the processor's statements take the lock and publish holds' transitions.
    "outbox_transitions_lock()": {WRITER: False, PROCESSOR: True},
    "outbox_transitions_publish_v1()": {WRITER: False, PROCESSOR: True},
    # Segments (0015): the current one is the default of each new row's segment column (the writer
    # appends events, the processor transitions and repaired events); retention runs the others.
    "outbox_events_segment()": {WRITER: True, PROCESSOR: True},
    "outbox_job_transitions_segment()": {WRITER: False, PROCESSOR: True},
    "outbox_segments_rotate(text)": {WRITER: False, PROCESSOR: True},
    "outbox_events_segment_truncate(smallint,pg_snapshot)": {WRITER: False, PROCESSOR: True},
    "outbox_job_transitions_segment_truncate(smallint,timestamp with time zone)": {WRITER: False, PROCESSOR: True},
    "outbox_segment_create(text,smallint)": {WRITER: False, PROCESSOR: False},  # called by the rotation only
}
# The subscriber has nothing but what is given it above.
for _matrix in (TABLES, COLUMNS, SEQUENCES):
    for _by_role in _matrix.values():
        _by_role.setdefault(SUBSCRIBER, "")  # type: ignore[arg-type]
for _by_role_f in FUNCTIONS.values():
    _by_role_f.setdefault(SUBSCRIBER, False)


@dataclass(frozen=True)
class Logins:
    admin: DatabaseUrl
    writer_role: str
    processor_role: str
    subscriber_role: str

    def url(self, role: str) -> DatabaseUrl:
        return DatabaseUrl(self.admin.url.set(username=role, password=None))

    @property
    def writer(self) -> DatabaseUrl:
        return self.url(self.writer_role)

    @property
    def processor(self) -> DatabaseUrl:
        return self.url(self.processor_role)

    def member(self, group: str) -> str:
        return {WRITER: self.writer_role, PROCESSOR: self.processor_role, SUBSCRIBER: self.subscriber_role}[group]


def _drop_role(admin: psycopg.Connection[Any], role: str) -> None:
    """Drop a role's grants in this database, then the role (it may still have some in another one)."""
    admin.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
    # A concurrent run in another database may have granted it something: that run's teardown drops it.
    with contextlib.suppress(psycopg.errors.DependentObjectsStillExist):
        admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


@pytest.fixture
def logins(db: DatabaseUrl) -> Iterator[Logins]:
    suffix = f"{os.getpid()}_{next(_counter)}"
    names = Logins(db, f"outbox_t_writer_{suffix}", f"outbox_t_processor_{suffix}", f"outbox_t_subscriber_{suffix}")
    with connect(db, application_name="outbox-tests") as admin:
        rows = admin.execute("SELECT rolname FROM pg_roles WHERE rolname = ANY(%s)", [list(GROUPS)]).fetchall()
        created_groups = [g for g in GROUPS if g not in {r[0] for r in rows}]
        admin.execute(ROLES_SQL.read_bytes())  # several statements: one implicit transaction
        for group in GROUPS:
            login = sql.Identifier(names.member(group))
            admin.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(login))  # left by a crashed run
            admin.execute(sql.SQL("CREATE ROLE {} LOGIN IN ROLE {}").format(login, sql.Identifier(group)))
    try:
        yield names
    finally:
        with connect(db, application_name="outbox-tests") as admin:
            logins_ = [names.writer_role, names.processor_role, names.subscriber_role]
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = ANY(%s)", [logins_])
            for role in [*logins_, *created_groups]:
                _drop_role(admin, role)


@pytest.fixture
def admin(db: DatabaseUrl) -> Iterator[psycopg.Connection[Any]]:
    with connect(db, application_name="outbox-tests-admin") as connection:
        yield connection


def _has(admin: psycopg.Connection[Any], function: str, *args: str) -> bool:
    """has_table_privilege(role, table, privilege) and its kin."""
    query = sql.SQL("SELECT {}({})").format(
        sql.Identifier(function), sql.SQL(", ").join([sql.Placeholder()] * len(args))
    )
    row = admin.execute(query, list(args)).fetchone()
    return bool(row and row[0])


def _privileges(expected: str) -> set[str]:
    return set(expected.split())


# (a) The matrix -----------------------------------------------------------------------------------


def test_every_object_is_in_the_matrix(logins: Logins, admin: psycopg.Connection[Any]) -> None:
    """A migration that adds a table, sequence or function must extend roles.sql and this matrix."""
    schema = "(SELECT relnamespace FROM pg_class WHERE oid = 'outbox_events'::regclass)"
    tables = {
        r[0]
        for r in admin.execute(
            f"SELECT relname FROM pg_class WHERE relnamespace = {schema} AND relkind IN ('r', 'p', 'v', 'm')"
            " AND (relname LIKE 'outbox\\_%' OR relname IN ('jobs', 'jobs_variants')) AND NOT relispartition"
        )
    }
    assert tables == set(TABLES)
    # The segments of the partitioned tables grant nothing: rows are read and written through the parent.
    segments = [
        r[0]
        for r in admin.execute(
            f"SELECT relname FROM pg_class WHERE relnamespace = {schema} AND relispartition"
            " AND relname LIKE 'outbox\\_%'"
        )
    ]
    assert segments
    for segment in segments:
        for group in GROUPS:
            assert not [p for p in TABLE_PRIVILEGES if _has(admin, "has_table_privilege", group, segment, p)], segment
    sequences = {
        r[0] for r in admin.execute(f"SELECT relname FROM pg_class WHERE relnamespace = {schema} AND relkind = 'S'")
    }
    assert sequences == set(SEQUENCES)
    functions = {
        r[0]
        for r in admin.execute(
            f"SELECT oid::regprocedure::text FROM pg_proc WHERE pronamespace = {schema} AND proname LIKE 'outbox\\_%'"
        )
    }
    assert {f.replace(" ", "") for f in functions} == {f.replace(" ", "") for f in FUNCTIONS}


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("through_login", [False, True], ids=["group", "login"])
def test_privilege_matrix(logins: Logins, admin: psycopg.Connection[Any], group: str, through_login: bool) -> None:
    """Exactly the expected privileges, for the group role and for a login that is a member of it
    (the login also has what PUBLIC has: roles.sql revokes from PUBLIC what would leak)."""
    role = logins.member(group) if through_login else group
    actual: dict[str, set[str]] = {}
    expected: dict[str, set[str]] = {}
    for table, by_role in TABLES.items():
        key = f"table {table}"
        expected[key] = _privileges(by_role[group])
        actual[key] = {p for p in TABLE_PRIVILEGES if _has(admin, "has_table_privilege", role, table, p)}
        columns = [
            r[0]
            for r in admin.execute(
                "SELECT attname FROM pg_attribute WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped",
                [table],
            )
        ]
        for column in columns:
            key = f"column {table}.{column}"
            explicit = COLUMNS.get((table, column))
            expected[key] = (
                _privileges(explicit[group])
                if explicit is not None
                else _privileges(by_role[group]) & set(COLUMN_PRIVILEGES)
            )
            actual[key] = {p for p in COLUMN_PRIVILEGES if _has(admin, "has_column_privilege", role, table, column, p)}
    for sequence, by_role in SEQUENCES.items():
        key = f"sequence {sequence}"
        expected[key] = _privileges(by_role[group])
        actual[key] = {p for p in SEQUENCE_PRIVILEGES if _has(admin, "has_sequence_privilege", role, sequence, p)}
    for function, by_role in FUNCTIONS.items():
        key = f"function {function}"
        expected[key] = {"EXECUTE"} if by_role[group] else set()
        actual[key] = {"EXECUTE"} if _has(admin, "has_function_privilege", role, function, "EXECUTE") else set()
    assert {k: sorted(v) for k, v in actual.items()} == {k: sorted(v) for k, v in expected.items()}
    print(f"\nprivilege matrix for {role}: {len(expected)} objects checked, all as expected")


def test_roles_sql_is_idempotent_and_resets_extra_grants(logins: Logins, admin: psycopg.Connection[Any]) -> None:
    """A re-run removes what was granted by hand, and gives writers the columns an adopted jobs
    table has of its own."""
    admin.execute("GRANT UPDATE ON jobs, outbox_events TO outbox_writer")
    admin.execute("GRANT ALL ON outbox_checkpoints TO PUBLIC")
    admin.execute("ALTER TABLE jobs ADD COLUMN owner text")
    admin.execute(ROLES_SQL.read_bytes())

    def can(privilege: str, table: str, column: str | None = None) -> bool:
        if column is None:
            return _has(admin, "has_table_privilege", logins.writer_role, table, privilege)
        return _has(admin, "has_column_privilege", logins.writer_role, table, column, privilege)

    assert not can("UPDATE", "outbox_events")
    assert not can("SELECT", "outbox_checkpoints")
    assert not can("UPDATE", "jobs", "status")
    assert can("UPDATE", "jobs", "owner")
    with connect(logins.writer, application_name="writer") as writer:
        job_id, _ = outbox.create_job(writer, variants=1)
        writer.execute("UPDATE jobs SET owner = 'me' WHERE job_id = %s", [job_id])
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            writer.execute("UPDATE jobs SET owner = 'me', status = 'done' WHERE job_id = %s", [job_id])


# (b) The whole flow under the two roles -----------------------------------------------------------


def _write_jobs(logins: Logins, rng: random.Random, count: int) -> dict[uuid.UUID, list[uuid.UUID]]:
    """As the writer: jobs through the API (SQLAlchemy and psycopg) and through plain SQL."""
    jobs: dict[uuid.UUID, list[uuid.UUID]] = {}
    engine = logins.writer.create_engine()
    try:
        with engine.begin() as conn:
            for _ in range(count // 2):
                job_id, variants = outbox.create_job(conn, variants=rng.randint(2, 5))
                jobs[job_id] = variants
    finally:
        engine.dispose()
    with connect(logins.writer, application_name="writer", autocommit=False) as conn:
        for _ in range(count - count // 2):
            job_id, variants = uuid.uuid4(), [uuid.uuid4() for _ in range(rng.randint(2, 5))]
            conn.execute("INSERT INTO jobs (job_id, status, updated_at) VALUES (%s, 'queued', now())", [job_id])
            for variant in variants:
                conn.execute(
                    "INSERT INTO jobs_variants (job_variants_id, job_id, status) VALUES (%s, %s, 'queued')",
                    [variant, job_id],
                )
            jobs[job_id] = variants
        conn.commit()
    return jobs


def _move_variants(logins: Logins, jobs: dict[uuid.UUID, list[uuid.UUID]], rng: random.Random, count: int) -> None:
    """As the writer: random moves, half through update_variant, half through plain SQL; a delete."""
    variants = [v for vs in jobs.values() for v in vs]
    with connect(logins.writer, application_name="writer") as conn:
        for i in range(count):
            status, step, variant = rng.choice(["running", "done", "failed"]), rng.choice(STEPS), rng.choice(variants)
            if i % 2:
                outbox.update_variant(conn, variant, status=status, step=step)
            else:
                conn.execute(
                    "UPDATE jobs_variants SET status = %s, current_step = %s, updated_at = now()"
                    " WHERE job_variants_id = %s",
                    [status, step, variant],
                )
        first_job = next(iter(jobs))
        conn.execute("DELETE FROM jobs_variants WHERE job_variants_id = %s", [jobs[first_job].pop()])
        # A variant moved to another job: capture's rarer path (outbox_append_variant_event, twice).
        source = next(j for j in list(jobs)[1:] if len(jobs[j]) > 1)
        moved = jobs[source].pop()
        conn.execute("UPDATE jobs_variants SET job_id = %s WHERE job_variants_id = %s", [first_job, moved])
        jobs[first_job].append(moved)
        # Most jobs finish, so that done is reached too.
        finished = [j for j in jobs if rng.random() < 0.6]
        conn.execute(
            "UPDATE jobs_variants SET status = 'done', current_step = 'iou_eval' WHERE job_id = ANY(%s)", [finished]
        )


def _assert_matches_reference(admin: psycopg.Connection[Any]) -> None:
    assert actual_job_states(admin) == reference_job_states(admin, STEPS)


def test_whole_flow_under_the_writer_and_processor_roles(logins: Logins, admin: psycopg.Connection[Any]) -> None:
    rng = random.Random(20240611)
    settings = make_settings(logins.processor)
    jobs = _write_jobs(logins, rng, 24)
    _move_variants(logins, jobs, rng, 150)
    # Capture's refusals reach the writer as such, not as a missing privilege (outbox_refuse_variant).
    some_variant = jobs[next(iter(jobs))][0]
    with connect(logins.writer, application_name="writer") as conn:
        for column, value, message in [
            ("status", "exploded", "status must be one of"),
            ("current_step", "s" * 70_000, "an event may carry"),
        ]:
            with pytest.raises(psycopg.errors.CheckViolation, match=message):
                conn.execute(
                    f"UPDATE jobs_variants SET {column} = %s WHERE job_variants_id = %s", [value, some_variant]
                )

    with connect(logins.processor, application_name="outbox-ops") as ops:
        assert collect_backlog(ops, 0).pending_events > 0
        stats = drain(settings)
        assert stats.events > 0
        _assert_matches_reference(admin)
        backlog = collect_backlog(ops, 0)
        assert (backlog.pending_events, backlog.dead_letters, backlog.flagged_jobs) == (0, 0, 0)
        scanned = metrics_scan(ops)  # what the metrics' elected worker reads, under the same grants
        assert (sum(scanned.pending.values()), sum(scanned.dead_letters.values()), scanned.flagged_jobs) == (0, 0, 0)

        # Replay: job state lost (by the owner) is rebuilt from the events.
        expected = actual_job_states(admin)
        write_jobs_behind_the_processor(admin, "UPDATE jobs SET status = NULL, current_step = NULL")
        changes = replay(ops, job_ids_all(ops, 0), dry_run=False, chunk_size=7)
        assert {c.job_id for c in changes} >= set(expected)
        assert actual_job_states(admin) == expected
        assert not verify(ops).drift

        # verify --repair: a change the trigger did not capture (the owner, triggers off) is found
        # and resynced through an event (the processor locks the row and appends it).
        drifted = jobs[next(iter(jobs))][0]
        with admin.transaction():
            admin.execute("SET LOCAL session_replication_role = replica")
            admin.execute(
                "UPDATE jobs_variants SET status = 'running', current_step = 'segment' WHERE job_variants_id = %s",
                [drifted],
            )
        report = verify(ops)
        assert [d.variant_id for d in report.variant_drift] == [drifted]
        assert repair(ops, report, wait=0).resync_events == 1
        drain(settings)
        _assert_matches_reference(admin)
        assert not verify(ops).drift

        # Dead letters: two unusable events (written by the owner); one fixed by the owner and
        # retried, one discarded, both by the processor.
        bad_variants = [jobs[j][0] for j in list(jobs)[1:3]]
        bad_events = [
            admin.execute(
                "INSERT INTO outbox_events (event_type, schema_version, job_id, variant_id, variant_version, payload)"
                " SELECT 'variant_changed', 1, job_id, job_variants_id, nextval('outbox_variant_versions'),"
                ' \'{"status": "bogus"}\' FROM jobs_variants WHERE job_variants_id = %s RETURNING event_id',
                [variant],
            ).fetchone()[0]  # type: ignore[index]
            for variant in bad_variants
        ]
        drain(settings)
        assert sorted(d.event_id for d in list_dead_letters(ops)) == sorted(bad_events)
        assert collect_backlog(ops, 0).flagged_jobs == 2
        admin.execute(
            "UPDATE outbox_events AS e SET payload = jsonb_build_object('status', v.status, 'step', v.current_step)"
            " FROM jobs_variants AS v WHERE e.event_id = %s AND v.job_variants_id = e.variant_id",
            [bad_events[0]],
        )
        assert retry(ops, [bad_events[0]]) == {bad_events[0]: "applied"}
        assert discard(ops, [bad_events[1]]) == {bad_events[1]: "discarded"}
        _assert_matches_reference(admin)
        assert collect_backlog(ops, 0).flagged_jobs == 0

        # Prune everything applied, then replay: the same state, from the baseline.
        expected = actual_job_states(admin)
        result = retain(ops, dt.timedelta(0), chunk_size=50)
        assert result.removed(Segmented.EVENTS) > 0 and not result.kept(), result
        assert admin.execute("SELECT count(*) FROM outbox_events").fetchone()[0] == 0  # type: ignore[index]
        write_jobs_behind_the_processor(admin, "UPDATE jobs SET status = NULL, current_step = NULL")
        replay(ops, job_ids_all(ops, 0), dry_run=False)
        assert actual_job_states(admin) == expected

        # And the writers keep writing, the worker keeps applying.
        _move_variants(logins, jobs, rng, 40)
        drain(settings)
        _assert_matches_reference(admin)
        assert not verify(ops).drift
        assert collect_backlog(ops, 0).pending_events == 0


# (c) What each role is refused --------------------------------------------------------------------

WRITER_REFUSED = {
    "update an event": "UPDATE outbox_events SET payload = '{}'",
    "delete an event": "DELETE FROM outbox_events",
    "read events": "SELECT count(*) FROM outbox_events",
    "choose an event's txid": "INSERT INTO outbox_events (txid, event_type, schema_version, payload)"
    " VALUES ('3', 'variant_changed', 1, '{}')",
    "truncate events": "TRUNCATE outbox_events",
    "truncate variants (not captured)": "TRUNCATE jobs_variants",
    "set a job's status": "UPDATE jobs SET status = 'done'",
    "set a job's step": "UPDATE jobs SET current_step = 'iou_eval'",
    "set a job's updated_at": "UPDATE jobs SET updated_at = now()",
    "move the checkpoint": "UPDATE outbox_checkpoints SET events_applied = 0",
    "lock the checkpoint": "SELECT partition FROM outbox_checkpoints FOR UPDATE",
    "add a checkpoint": "INSERT INTO outbox_checkpoints (partition) VALUES (7)",
    "write variant states": "INSERT INTO outbox_variant_states (variant_id, job_id, version, event_id)"
    " VALUES (gen_random_uuid(), gen_random_uuid(), 1, 1)",
    "write dead letters": "INSERT INTO outbox_dead_letters (event_id, partition, reason) VALUES (1, 0, 'x')",
    "clear dead letters": "DELETE FROM outbox_dead_letters",
    "write job flags": "INSERT INTO outbox_job_flags (job_id, reason) VALUES (gen_random_uuid(), 'x')",
    "write dirty jobs": "INSERT INTO outbox_dirty_jobs (partition, job_id) VALUES (0, gen_random_uuid())",
    "write the baseline": "INSERT INTO outbox_variant_baseline (variant_id, job_id, version, event_id)"
    " VALUES (gen_random_uuid(), gen_random_uuid(), 1, 1)",
    "write throughput": "INSERT INTO outbox_throughput (partition, bucket, events) VALUES (0, now(), 1)",
    "read migrations": "SELECT count(*) FROM outbox_schema_migrations",
    "reset the versions": "SELECT setval('outbox_variant_versions', 1)",
    "call the processor's function": "SELECT outbox_event_applied_v1('1', 1, '1:1:', NULL, '0', 0)",
}

PROCESSOR_REFUSED = {
    "update an event's payload": "UPDATE outbox_events SET payload = '{}'",
    "choose an event's txid": "INSERT INTO outbox_events (txid, event_type, schema_version, payload)"
    " VALUES ('3', 'variant_changed', 1, '{}')",
    "truncate events": "TRUNCATE outbox_events",
    "write a variant": "UPDATE jobs_variants SET status = 'done'",
    "insert a variant": "INSERT INTO jobs_variants (job_variants_id, status) VALUES (gen_random_uuid(), 'queued')",
    "delete a variant": "DELETE FROM jobs_variants",
    "insert a job": "INSERT INTO jobs (job_id) VALUES (gen_random_uuid())",
    "delete a job": "DELETE FROM jobs",
    "change a job's id": "UPDATE jobs SET job_id = gen_random_uuid()",
    "remove the checkpoint": "DELETE FROM outbox_checkpoints",
    "add a checkpoint": "INSERT INTO outbox_checkpoints (partition) VALUES (7)",
    "delete the baseline": "DELETE FROM outbox_variant_baseline",
    "record a migration": "INSERT INTO outbox_schema_migrations (version, name) VALUES (99, 'x')",
    "reset the versions": "SELECT setval('outbox_variant_versions', 1)",
}


def _assert_refused(url: DatabaseUrl, statements: dict[str, str], admin: psycopg.Connection[Any]) -> None:
    """Every statement fails with InsufficientPrivilege, and nothing changed."""

    def snapshot() -> list[Any]:
        return [
            admin.execute(
                f"SELECT count(*), md5(coalesce(string_agg(t::text, ',' ORDER BY t::text), '')) FROM {t} AS t"
            ).fetchone()
            for t in TABLES
        ]

    before = snapshot()
    allowed = []
    with connect(url, application_name="refused") as conn:
        for what, statement in statements.items():
            try:
                conn.execute(statement)
            except psycopg.errors.InsufficientPrivilege:
                continue
            allowed.append(what)
    assert allowed == []
    assert snapshot() == before


def test_the_writer_is_refused_the_events_job_state_and_the_processor_tables(
    logins: Logins, admin: psycopg.Connection[Any]
) -> None:
    _write_jobs(logins, random.Random(3), 4)
    drain(make_settings(logins.processor))
    _assert_refused(logins.writer, WRITER_REFUSED, admin)
    print(f"\nwriter refused {len(WRITER_REFUSED)} statements it must not run")
    # Nor can it run the worker.
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        drain(make_settings(logins.writer))


def test_the_processor_is_refused_the_application_data_and_the_events_payload(
    logins: Logins, admin: psycopg.Connection[Any]
) -> None:
    _write_jobs(logins, random.Random(4), 4)
    drain(make_settings(logins.processor))
    _assert_refused(logins.processor, PROCESSOR_REFUSED, admin)
    print(f"\nprocessor refused {len(PROCESSOR_REFUSED)} statements it must not run")


def test_transitions_under_the_processor_and_subscriber_roles(logins: Logins, admin: psycopg.Connection[Any]) -> None:
    """The processor writes transitions (and publishes a hold's); an operator under the processor
    role creates a subscription; its consumer under the subscriber role delivers and fails, parks
    and acknowledges with nothing more than its grants."""
    from processor import subscriptions

    rng = random.Random(7)
    jobs = _write_jobs(logins, rng, 6)
    with connect(logins.writer, application_name="writer") as conn:
        conn.execute("UPDATE jobs_variants SET status = 'done', current_step = 'iou_eval'")
        outbox.hold_job(conn, next(iter(jobs)), status="failed", reason="cancelled")
    with connect(logins.processor, application_name="outbox-ops") as ops:
        subscriptions.create(ops, "billing", from_start=True, to_statuses=None)
        drain(make_settings(logins.processor))
    count = admin.execute("SELECT count(*), count(*) FILTER (WHERE written_by = 'hold') FROM outbox_job_transitions")
    assert count.fetchone() == (6, 1)
    seen: list[int] = []

    def handler(_conn: Any, t: outbox.Transition) -> None:
        if t.written_by == "hold":
            raise RuntimeError("refused")
        seen.append(t.transition_id)

    url = logins.url(logins.subscriber_role).url.render_as_string(hide_password=False)
    policy = outbox.RetryPolicy(max_attempts=1)
    assert outbox.Subscriber("billing", url, handler, retry=policy).run_until_idle() == 5
    info = admin.execute(
        "SELECT position, (SELECT count(*) FROM outbox_subscription_failures) FROM outbox_subscriptions"
    )
    assert info.fetchone() == (6, 1)
    # The commands too, under the subscriber's login alone.
    from tests.acceptance.test_cli import outbox_cli
    from tests.fix_database import subprocess_env

    env = subprocess_env(logins.url(logins.subscriber_role))
    handler = "tests.acceptance.transition_handlers:record"
    ran = outbox_cli("subscribe", "billing", "--handler", handler, "--until-idle", env=env)
    assert ran.returncode == 0 and "0 transitions handled" in ran.stdout, ran.stderr
    with (
        pytest.raises(psycopg.errors.InsufficientPrivilege),
        connect(logins.url(logins.subscriber_role), application_name="subscriber") as sub,
    ):
        sub.execute("UPDATE outbox_subscriptions SET to_statuses = NULL")
