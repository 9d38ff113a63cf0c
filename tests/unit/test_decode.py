"""Decoding outbox rows: bad events become dead letters with a reason, never exceptions."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from processor.decode import DeadLetter, EventRow, decode_event
from processor.fold import Pipeline, VariantState

PIPELINE = Pipeline(("ingest", "iou_eval"))


def row(payload: Any, event_type: str = "variant_changed", schema_version: int = 1, **kw: Any) -> EventRow:
    values: dict[str, Any] = {
        "event_id": 7, "txid": 100, "event_type": event_type, "schema_version": schema_version,
        "job_id": uuid.uuid4(), "variant_id": uuid.uuid4(), "variant_version": 3, "payload": payload,
        "created_at": dt.datetime.now(dt.UTC),
    }
    values.update(kw)
    return EventRow(**values)


def test_a_valid_change_decodes_and_unknown_fields_are_ignored():
    decoded = decode_event(row({"status": "running", "step": "ingest", "extra": [1, 2]}), PIPELINE)
    assert isinstance(decoded, VariantState)
    assert (decoded.status.value, decoded.step, decoded.version) == ("running", "ingest", 3)


@pytest.mark.parametrize(
    ("event", "reason"),
    [
        (row({"status": "exploded", "step": "ingest"}), "invalid payload: status"),
        (row({"step": "ingest"}), "invalid payload: status"),
        (row("not an object"), "invalid payload"),
        (row({"status": "done", "step": "mystery"}), "step 'mystery' is not in OUTBOX_PIPELINE_STEPS"),
        (row({}, event_type="job_exploded"), "unknown event type 'job_exploded'"),
        (row({"status": "done"}, schema_version=9), "at schema version 9"),
        (row({"status": "done"}, variant_id=None), "no job_id, variant_id"),
    ],
)
def test_bad_events_become_dead_letters_with_a_reason(event, reason):
    decoded = decode_event(event, PIPELINE)
    assert isinstance(decoded, DeadLetter)
    assert reason in decoded.reason
    assert decoded.event_id == 7


json_st = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(payload=json_st | st.fixed_dictionaries({"status": st.text(max_size=10), "step": json_st}))
def test_any_payload_decodes_or_parks_without_raising(payload):
    decoded = decode_event(row(payload), PIPELINE)
    assert isinstance(decoded, (VariantState, DeadLetter))
