"""Hostile and bad input: refused at write time with a clear error, or parked as a dead letter;
never a crash, never blocking other jobs."""

from __future__ import annotations

import json
import secrets

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import outbox
from processor.database import connect
from tests.fix_database import make_settings
from tests.helpers import drain, job_state

INSERT_EVENT = (
    "INSERT INTO outbox_events (event_type, schema_version, job_id, variant_id, variant_version, payload) "
    "VALUES (%s, %s, %s, %s, nextval('outbox_variant_versions'), %s::jsonb)"
)


def test_nul_characters_bad_json_and_bad_variants_are_refused_at_write_time(conn, engine):
    with engine.begin() as sa:
        job, (variant,) = outbox.create_job(sa, variants=1)
    with pytest.raises(psycopg.errors.UntranslatableCharacter):
        conn.execute(INSERT_EVENT, ["variant_changed", 1, job, variant, '{"status": "done\\u0000"}'])
    with pytest.raises(psycopg.errors.InvalidTextRepresentation):
        conn.execute(INSERT_EVENT, ["variant_changed", 1, job, variant, '{"status": '])
    with pytest.raises(psycopg.errors.CheckViolation, match="status must be one of"):
        conn.execute("UPDATE jobs_variants SET status = 'done\\u0000x' WHERE job_variants_id = %s", [variant])
    with pytest.raises(psycopg.errors.CheckViolation, match="current_step is 200000 bytes long"):
        conn.execute("UPDATE jobs_variants SET current_step = %s WHERE job_variants_id = %s", ["x" * 200_000, variant])
    print("\nrefused at write time: a NUL character, malformed JSON, an invalid status, a 200,000-character step")


def test_an_oversized_event_written_around_capture_is_a_dead_letter_never_read(conn, engine, settings):
    """Capture cannot write a payload over 65,536 bytes; one appended directly is parked without its
    payload ever reaching the worker (outbox_payload_fits), even though its status and step are
    valid, and the job is flagged rather than folded without it. Both kinds of storage: compressed
    (repetitive) and not (random), the bound is on the JSON text either way."""
    with engine.begin() as sa:
        job, (variant, other) = outbox.create_job(sa, variants=2)
    compressible = json.dumps({"status": "done", "step": "ingest", "blob": "x" * 200_000})
    incompressible = json.dumps({"status": "done", "step": "ingest", "blob": secrets.token_urlsafe(150_000)})
    conn.execute(INSERT_EVENT, ["variant_changed", 1, job, variant, compressible])
    conn.execute(INSERT_EVENT, ["variant_changed", 1, job, variant, incompressible])
    stored = conn.execute(
        "SELECT pg_column_compression(payload) IS NOT NULL FROM outbox_events WHERE variant_id = %s ORDER BY event_id",
        [variant],
    ).fetchall()
    assert [r[0] for r in stored][-2:] == [True, False]
    conn.execute("UPDATE jobs_variants SET status = 'done' WHERE job_variants_id = %s", [other])
    stats = drain(settings)
    assert stats.dead_letters == 2
    reasons = {r[0] for r in conn.execute("SELECT reason FROM outbox_dead_letters")}
    assert reasons == {"payload is over 65,536 bytes (not read)"}
    (reason,) = reasons
    assert conn.execute("SELECT job_id FROM outbox_job_flags").fetchall() == [(job,)]
    print(f"\n200 kB payloads written around capture, compressed and not: dead letters ({reason}), job flagged")


def test_deeply_nested_and_odd_payloads_become_dead_letters_and_other_jobs_flow(conn, engine, settings):
    with engine.begin() as sa:
        bad_job, bad_variants = outbox.create_job(sa, variants=4)
        good_job, _ = outbox.create_job(sa, variants=2)
    hostile = [
        "[" * 5000 + "]" * 5000,  # PostgreSQL accepts it; Python's parser does not
        json.dumps({"status": "done", "step": "iou_eval", "extra": {"a": [1, {"b": None}] * 50}}),  # unknown fields
        json.dumps({"status": ["done"], "step": {"x": 1}}),
        json.dumps({"status": "done", "step": "é" * 300}),
    ]
    for variant, payload in zip(bad_variants, hostile, strict=True):
        conn.execute(INSERT_EVENT, ["variant_changed", 1, bad_job, variant, payload])
    conn.execute("UPDATE jobs_variants SET status = 'done', current_step = 'iou_eval' WHERE job_id = %s", [good_job])
    stats = drain(settings)
    assert job_state(conn, good_job) == ("done", "iou_eval")
    reasons = [row[0] for row in conn.execute("SELECT reason FROM outbox_dead_letters ORDER BY event_id")]
    assert len(reasons) == 3 and stats.dead_letters == 3
    assert "not readable JSON" in reasons[0]
    assert conn.execute("SELECT job_id FROM outbox_job_flags").fetchall() == [(bad_job,)]
    print(
        f"\nhostile payloads: {len(hostile)} written, {stats.dead_letters} dead letters, 1 job flagged, others applied"
    )


# Any text PostgreSQL can store in jsonb (NUL is refused at write time, tested above).
storable_text = st.text(alphabet=st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)))


def _nested(children: st.SearchStrategy) -> st.SearchStrategy:
    return st.lists(children, max_size=5) | st.dictionaries(storable_text, children, max_size=5)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | storable_text,
    _nested,
    max_leaves=40,
)
events = st.lists(
    st.tuples(
        st.sampled_from(["variant_changed", "variant_removed", "variant_exploded"]),
        st.integers(min_value=-3, max_value=3),
        json_values
        | st.fixed_dictionaries({"status": st.sampled_from(["done", "running", "bogus"]), "step": json_values}),
    ),
    min_size=1,
    max_size=12,
)


@pytest.mark.slow
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=events)
def test_fuzzed_events_never_stop_the_worker_or_other_jobs(db, engine, batch):
    settings_ = make_settings(db)
    with engine.begin() as sa:
        job, variants = outbox.create_job(sa, variants=3)
        witness, _ = outbox.create_job(sa, variants=1)
    with connect(db, application_name="fuzz") as conn:
        for index, (event_type, schema_version, payload) in enumerate(batch):
            conn.execute(INSERT_EVENT, [event_type, schema_version, job, variants[index % 3], json.dumps(payload)])
        conn.execute(
            "UPDATE jobs_variants SET status = 'running', current_step = 'segment' WHERE job_id = %s", [witness]
        )
        drain(settings_)  # must not raise
        assert job_state(conn, witness) == ("running", "segment")
        pending = conn.execute("SELECT count(*) FROM outbox_dirty_jobs").fetchone()[0]
        assert pending == 0
