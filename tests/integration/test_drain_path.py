"""The drain statement (events_apply) decodes the common events in SQL: it must agree with processor.decode.

Every shape of event, valid or not, is written straight into outbox_events; after a drain, each
variant's stored state and each dead letter must be what processor.decode makes of the same row.
"""

from __future__ import annotations

import json
import random
import uuid

from processor.decode import EventRow, decode_event
from tests.helpers import drain

STATUSES = ["queued", "running", "done", "failed"]
STEPS = ["ingest", "detect", "segment", "iou_eval"]
ODD_VALUES: list[object] = [None, 1, 1.5, True, [], ["done"], {}, {"a": 1}, "", "DONE", "finished", " done"]


def random_payload(rng: random.Random) -> object:
    kind = rng.randrange(10)
    if kind < 4:  # the common valid shape
        return {"status": rng.choice(STATUSES), "step": rng.choice([None, *STEPS])}
    if kind == 4:  # steps at and around the length cap, non-ASCII, unknown names
        step = rng.choice(["x" * 200, "x" * 201, "é" * 200, "é" * 201, "not_a_step", ""])
        return {"status": rng.choice(STATUSES), "step": step}
    if kind == 5:  # odd statuses or steps
        payload: dict[str, object] = {"status": rng.choice(ODD_VALUES + STATUSES), "step": rng.choice(ODD_VALUES)}
        if rng.random() < 0.3:
            del payload[rng.choice(["status", "step"])]
        return payload
    if kind == 6:  # unknown fields are ignored
        return {"status": rng.choice(STATUSES), "step": rng.choice(STEPS), "extra": {"nested": [1, 2]}}
    if kind == 7:  # not an object at all
        return rng.choice([[], ["done"], "done", 5, None, True])
    return {}  # the variant_removed shape


def test_sql_decoding_agrees_with_processor_decode(conn, settings):
    rng = random.Random(20261126)
    job_id = uuid.uuid4()
    conn.execute("INSERT INTO jobs (job_id, status) VALUES (%s, 'queued')", [job_id])
    written = []
    for _ in range(600):
        event_type = rng.choice(["variant_changed"] * 6 + ["variant_removed"] * 2 + ["variant_renamed"])
        schema_version = 1 if rng.random() < 0.9 else 2
        payload = json.dumps(random_payload(rng))
        variant_id = uuid.uuid4()
        # A few events lack what every event needs.
        event_job = None if rng.random() < 0.02 else job_id
        version_sql = "NULL" if rng.random() < 0.02 else "nextval('outbox_variant_versions')"
        conn.execute(
            "INSERT INTO outbox_events (event_type, schema_version, job_id, variant_id, variant_version, payload) "
            f"VALUES (%s, %s, %s, %s, {version_sql}, %s::jsonb)",
            [event_type, schema_version, event_job, variant_id, payload],
        )
        written.append(variant_id)

    stats = drain(settings)

    rows = conn.execute(
        "SELECT event_id, txid::text, event_type, schema_version, job_id, variant_id, variant_version, "
        "payload::text, created_at FROM outbox_events WHERE variant_id = ANY(%s)",
        [written],
    ).fetchall()
    states = {
        r[0]: r[1:]
        for r in conn.execute(
            "SELECT variant_id, status, step, removed, problem IS NOT NULL FROM outbox_variant_states"
        ).fetchall()
    }
    dead = {r[0] for r in conn.execute("SELECT event_id FROM outbox_dead_letters").fetchall()}
    assert stats.events == len(rows) == 600
    through_python = 0
    for row in rows:
        event = EventRow(row[0], int(row[1]), *row[2:])
        decoded = decode_event(event)
        assert (event.event_id in dead) == (decoded.dead_letter is not None), event
        through_python += decoded.dead_letter is not None
        if decoded.state is None:
            assert event.variant_id not in states, event
            continue
        state = decoded.state
        expected = (state.status.value if state.status else None, state.step, state.removed, state.problem is not None)
        assert states[event.variant_id] == expected, event
    # The sample covers both paths: events decoded in SQL and events left to Python.
    assert 50 < through_python < 500
