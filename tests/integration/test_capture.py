"""Capture: plain SQL writers and the Python API write the same events in their own transaction."""

from __future__ import annotations

import uuid

import psycopg
import pytest
from pydantic import ValidationError

import outbox
from outbox.events import PAYLOAD_MODELS
from tests.helpers import drain, job_state
from tests.reference import partition_of


def events(conn, variant_id):
    """(event_type, payload) of a variant's events; checks that their versions increase."""
    rows = conn.execute(
        "SELECT event_type, variant_version, payload FROM outbox_events WHERE variant_id = %s ORDER BY event_id",
        [variant_id],
    ).fetchall()
    versions = [row[1] for row in rows]
    assert versions == sorted(set(versions)), versions
    return [(row[0], row[2]) for row in rows]


def test_plain_sql_writers_are_captured_with_increasing_versions(conn):
    job, variant = uuid.uuid4(), uuid.uuid4()
    conn.execute("INSERT INTO jobs (job_id, status) VALUES (%s, 'queued')", [job])
    conn.execute(
        "INSERT INTO jobs_variants (job_variants_id, job_id, status) VALUES (%s, %s, 'queued')", [variant, job]
    )
    conn.execute("UPDATE jobs_variants SET status = 'running', current_step = 'ingest' WHERE job_id = %s", [job])
    conn.execute("UPDATE jobs_variants SET updated_at = now() WHERE job_id = %s", [job])  # no step/status change
    conn.execute("UPDATE jobs_variants SET status = 'done' WHERE job_id = %s", [job])
    conn.execute("DELETE FROM jobs_variants WHERE job_id = %s", [job])

    assert events(conn, variant) == [
        ("variant_changed", {"status": "queued", "step": None}),
        ("variant_changed", {"status": "running", "step": "ingest"}),
        ("variant_changed", {"status": "done", "step": "ingest"}),
        ("variant_removed", {}),
    ]


def test_the_python_api_writes_one_event_per_change_on_both_connection_kinds(conn, engine):
    with engine.begin() as sa_conn:
        _, (variant,) = outbox.create_job(sa_conn, variants=1)
    with engine.begin() as sa_conn:
        outbox.update_variant(sa_conn, variant, status="running", step="ingest")
    with conn.transaction():
        outbox.update_variant(conn, variant, status="done")  # step kept

    assert events(conn, variant) == [
        ("variant_changed", {"status": "queued", "step": None}),
        ("variant_changed", {"status": "running", "step": "ingest"}),
        ("variant_changed", {"status": "done", "step": "ingest"}),
    ]
    row = conn.execute(
        "SELECT status, current_step FROM jobs_variants WHERE job_variants_id = %s", [variant]
    ).fetchone()
    assert row == ("done", "ingest")


def test_a_rolled_back_change_leaves_neither_change_nor_event(conn, engine):
    with engine.begin() as sa_conn:
        _, (variant,) = outbox.create_job(sa_conn, variants=1)
    with pytest.raises(RuntimeError), engine.begin() as sa_conn:
        outbox.update_variant(sa_conn, variant, status="running", step="ingest")
        raise RuntimeError("the caller's transaction fails")
    assert len(events(conn, variant)) == 1


def test_invalid_writes_are_refused_with_a_clear_error(conn, engine):
    with engine.begin() as sa_conn:
        _, (variant,) = outbox.create_job(sa_conn, variants=1)
    with pytest.raises(psycopg.errors.CheckViolation, match="must be one of queued, running, done, failed"):
        conn.execute("UPDATE jobs_variants SET status = 'exploded' WHERE job_variants_id = %s", [variant])
    with pytest.raises(ValidationError):
        outbox.update_variant(conn, variant, status="exploded")
    with pytest.raises(outbox.VariantNotFoundError):
        outbox.update_variant(conn, uuid.uuid4(), status="done")
    with pytest.raises(ValueError, match="must be a UUID"):
        outbox.update_variant(conn, "not-a-uuid", status="done")
    # A step too large for an event (the payload-size CHECK refused it before 0007), by update or
    # insert; refused only when it would be written into an event (not for a variant without a job).
    with pytest.raises(psycopg.errors.CheckViolation, match="current_step is 70000 bytes long; an event may carry"):
        conn.execute("UPDATE jobs_variants SET current_step = %s WHERE job_variants_id = %s", ["s" * 70_000, variant])
    job = conn.execute("SELECT job_id FROM jobs_variants WHERE job_variants_id = %s", [variant]).fetchone()[0]
    with pytest.raises(psycopg.errors.CheckViolation, match="current_step is 70000 bytes long"):
        conn.execute(
            "INSERT INTO jobs_variants (job_variants_id, job_id, status, current_step) VALUES (%s, %s, 'queued', %s)",
            [uuid.uuid4(), job, "é" * 35_000],
        )
    assert len(events(conn, variant)) == 1
    detached = uuid.uuid4()
    conn.execute(
        "INSERT INTO jobs_variants (job_variants_id, status, current_step) VALUES (%s, 'queued', %s)",
        [detached, "s" * 70_000],
    )
    assert events(conn, detached) == []
    # A long step that fits is captured as before (the processor parks it: steps have at most 200 characters).
    conn.execute("UPDATE jobs_variants SET current_step = %s WHERE job_variants_id = %s", ["é" * 300, variant])
    assert events(conn, variant)[-1] == ("variant_changed", {"status": "queued", "step": "é" * 300})


def test_the_update_trigger_writes_the_row_the_append_function_writes(conn, engine):
    """Migration 0007 writes the update's event in the trigger itself: the same row as
    outbox_append_variant_event (the backfill's and verify --repair's), for every shape of step
    and with a partition count other than 1."""
    with engine.begin() as sa_conn:
        job, (variant,) = outbox.create_job(sa_conn, variants=1)
    columns = "event_type, schema_version, partition, job_id, variant_id, payload"
    with conn.transaction(force_rollback=True):
        conn.execute("SELECT outbox_partitions_set(3)")  # rolled back with the transaction
        (partition,) = conn.execute("SELECT outbox_partition_hash(%s, 3)", [job]).fetchone()
        steps = [("running", None), ("done", 'it\'s "quoted" \\ é ✓'), ("failed", ""), ("queued", "x" * 200)]
        for status, step in steps:
            conn.execute(
                "UPDATE jobs_variants SET status = %s, current_step = %s WHERE job_variants_id = %s",
                [status, step, variant],
            )
            conn.execute(
                "SELECT outbox_append_variant_event('variant_changed', %s, %s, %s, %s)", [job, variant, status, step]
            )
            by_trigger, by_function = conn.execute(
                f"SELECT {columns}, variant_version FROM outbox_events WHERE variant_id = %s "
                "ORDER BY event_id DESC LIMIT 2",
                [variant],
            ).fetchall()[::-1]
            assert by_trigger[:-1] == by_function[:-1]
            assert by_trigger[2] == partition
            assert by_trigger[-1] < by_function[-1]  # versions from the same sequence
            assert by_trigger[5] == {"status": status, "step": step}


def test_every_payload_the_database_writes_validates_against_its_model(conn, engine, settings):
    with engine.begin() as sa_conn:
        _, variants = outbox.create_job(sa_conn, variants=2, step="ingest")
        outbox.update_variant(sa_conn, variants[0], status="failed")
    conn.execute("UPDATE jobs_variants SET status = 'running' WHERE job_variants_id = %s", [variants[1]])
    conn.execute("DELETE FROM jobs_variants WHERE job_variants_id = %s", [variants[1]])
    rows = conn.execute("SELECT event_type, schema_version, payload FROM outbox_events").fetchall()
    assert {r[0] for r in rows} == {"variant_changed", "variant_removed"}
    for event_type, schema_version, payload in rows:
        PAYLOAD_MODELS[(event_type, schema_version)].model_validate(payload)


def test_a_variant_moved_to_another_job_refolds_both_jobs(conn, engine, settings):
    with engine.begin() as sa_conn:
        job_a, (a1, a2) = outbox.create_job(sa_conn, variants=2)
        job_b, _ = outbox.create_job(sa_conn, variants=1)
    conn.execute("UPDATE jobs_variants SET status = 'done', current_step = 'iou_eval' WHERE job_variants_id = %s", [a1])
    conn.execute(
        "UPDATE jobs_variants SET status = 'running', current_step = 'detect' WHERE job_variants_id = %s", [a2]
    )
    drain(settings)
    assert job_state(conn, job_a) == ("running", "detect")
    conn.execute("UPDATE jobs_variants SET job_id = %s WHERE job_variants_id = %s", [job_b, a2])
    drain(settings)
    assert job_state(conn, job_a) == ("done", "iou_eval")
    assert job_state(conn, job_b) == ("running", "ingest")


def test_a_variant_detached_from_its_job_no_longer_counts_for_it(conn, engine, settings):
    with engine.begin() as sa_conn:
        job, (v1, v2) = outbox.create_job(sa_conn, variants=2)
    conn.execute("UPDATE jobs_variants SET status = 'failed', current_step = 'ingest' WHERE job_variants_id = %s", [v1])
    conn.execute("UPDATE jobs_variants SET status = 'done', current_step = 'iou_eval' WHERE job_variants_id = %s", [v2])
    drain(settings)
    assert job_state(conn, job) == ("failed", "ingest")
    conn.execute("UPDATE jobs_variants SET job_id = NULL WHERE job_variants_id = %s", [v1])
    drain(settings)
    assert job_state(conn, job) == ("done", "iou_eval")
    assert conn.execute("SELECT count(*) FROM outbox_dead_letters").fetchone()[0] == 0


VALID_STATUSES = {"queued", "running", "done", "failed"}


def expected_update_events(old, new, partitions):
    """The capture rules for an UPDATE, written out independently of the trigger: the events it
    appends as (event_type, partition, job, variant, payload), or the start of the error it raises.

    Nothing when no captured column changed; else a status outside the four is refused, and so is
    a step over 65,000 bytes going into an event; a variant leaving its job (given another id,
    moved or detached) leaves a variant_removed in that job's partition; a variant with a job gets
    a variant_changed."""
    if old == new:
        return []
    (old_job, old_id, _, _), (new_job, new_id, status, step) = old, new
    if status not in VALID_STATUSES:
        return "jobs_variants.status must be one of"
    if new_job is not None and step is not None and len(step.encode()) > 65_000:
        return f"jobs_variants.current_step is {len(step.encode())} bytes long"

    appended = []
    if (new_job, new_id) != (old_job, old_id) and old_job is not None:
        appended.append(("variant_removed", partition_of(old_job, partitions), old_job, old_id, {}))
    if new_job is not None:
        appended.append(
            ("variant_changed", partition_of(new_job, partitions), new_job, new_id, {"status": status, "step": step})
        )
    return appended


def test_every_shape_of_update_appends_the_events_the_rules_give(conn):
    """Migration 0008 captures the common update (same job and id, valid, a new status or step)
    with one test and every other shape on a second path: each shape, from ordinary and legacy
    starting rows (a status capture would refuse, written before it was installed), against the
    rules written out in Python, with 3 partitions."""
    jobs = [uuid.uuid4(), uuid.uuid4()]
    starts = [
        (jobs[0], "queued", None),
        (jobs[0], "running", "ingest"),
        (None, "running", "detect"),
        (jobs[0], None, None),  # legacy rows
        (jobs[1], "exploded", "ingest"),
    ]
    changes = [
        {"status": "running"},  # the status only, no step: the common path
        {"status": "done", "current_step": "iou_eval"},
        {"current_step": "detect"},
        {"current_step": "ingest", "status": "running"},  # possibly the same values: no event
        {"current_step": None},
        {"updated_at": "2026-01-01"},  # nothing captured
        {"status": None},
        {"status": "exploded"},
        {"current_step": "é" * 32_500},  # 65,000 bytes: the largest step an event carries
        {"current_step": "é" * 32_501},
        {"current_step": "s" * 65_000},
        {"current_step": "s" * 65_001},
        {"job_id": None, "current_step": "s" * 70_000},  # detached: the step goes into no event
        {"job_id": jobs[1]},  # a move
        {"job_id": jobs[1], "status": "failed"},
        {"job_id": None},  # detached
        {"job_id": jobs[0]},  # attached, or unchanged
        {"job_variants_id": "new"},  # another id
        {"job_variants_id": "new", "job_id": jobs[1], "current_step": "é" * 300},
    ]
    with conn.transaction(force_rollback=True):
        conn.execute("SELECT outbox_partitions_set(3)")  # rolled back with the transaction
        for job in jobs:
            conn.execute("INSERT INTO jobs (job_id, status) VALUES (%s, 'queued')", [job])
        for job, status, step in starts:
            for change in changes:
                variant = uuid.uuid4()
                legacy = status not in VALID_STATUSES
                if legacy:
                    conn.execute("ALTER TABLE jobs_variants DISABLE TRIGGER outbox_capture_variant_insert_delete")
                conn.execute(
                    "INSERT INTO jobs_variants (job_variants_id, job_id, status, current_step) VALUES (%s, %s, %s, %s)",
                    [variant, job, status, step],
                )
                if legacy:
                    conn.execute("ALTER TABLE jobs_variants ENABLE TRIGGER outbox_capture_variant_insert_delete")
                change = {column: uuid.uuid4() if value == "new" else value for column, value in change.items()}
                old = (job, variant, status, step)
                new = (
                    change.get("job_id", job),
                    change.get("job_variants_id", variant),
                    change.get("status", status),
                    change.get("current_step", step),
                )
                expected = expected_update_events(old, new, partitions=3)
                (before,) = conn.execute("SELECT coalesce(max(event_id), 0) FROM outbox_events").fetchone()
                assignments = ", ".join(f"{column} = %s" for column in change)
                update = f"UPDATE jobs_variants SET {assignments} WHERE job_variants_id = %s"
                if isinstance(expected, str):
                    with pytest.raises(psycopg.errors.CheckViolation, match=expected), conn.transaction():
                        conn.execute(update, [*change.values(), variant])
                    continue
                conn.execute(update, [*change.values(), variant])
                appended = conn.execute(
                    "SELECT event_type, partition, job_id, variant_id, payload, schema_version, variant_version"
                    " FROM outbox_events WHERE event_id > %s ORDER BY event_id",
                    [before],
                ).fetchall()
                assert [row[:5] for row in appended] == expected, (old, change)
                assert all(row[5] == 1 for row in appended)
                versions = [row[6] for row in appended]
                assert versions == sorted(set(versions))
