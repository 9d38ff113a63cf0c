"""Decoding outbox rows: bad events become dead letters with a reason, never exceptions."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import uuid
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from processor.decode import decode_event
from processor.fold import Pipeline, UnfoldableJobError, UnknownStepError, fold_job

PIPELINE = Pipeline(("ingest", "iou_eval"))


def row(payload: Any, event_type: str = "variant_changed", schema_version: int = 1, **kw: Any):
    from processor.decode import EventRow

    values: dict[str, Any] = {
        "event_id": 7,
        "txid": 100,
        "event_type": event_type,
        "schema_version": schema_version,
        "job_id": uuid.uuid4(),
        "variant_id": uuid.uuid4(),
        "variant_version": 3,
        "payload": payload,
        "created_at": dt.datetime.now(dt.UTC),
    }
    values.update(kw)
    return EventRow(**values)


def test_a_valid_change_decodes_and_unknown_fields_are_ignored():
    decoded = decode_event(row({"status": "running", "step": "ingest", "extra": [1, 2]}))
    assert decoded.dead_letter is None
    assert (decoded.state.status.value, decoded.state.step, decoded.state.version) == ("running", "ingest", 3)


@pytest.mark.parametrize(
    ("event", "reason"),
    [
        (row({"status": "exploded", "step": "ingest"}), "invalid payload: status"),
        (row({"step": "ingest"}), "invalid payload: status"),
        (row("not JSON at all"), "payload is not readable JSON"),
        (row('"a JSON string"'), "invalid payload"),
        (row("[" * 5000 + "]" * 5000), "payload is not readable JSON: RecursionError"),
        (row({"status": "done", "step": "x" * 500}), "invalid payload: step"),
        (row({}, event_type="job_exploded"), "unknown event type 'job_exploded'"),
        (row({"status": "done"}, schema_version=9), "at schema version 9"),
    ],
)
def test_bad_events_become_dead_letters_and_flag_their_job(event, reason):
    decoded = decode_event(event)
    assert reason in decoded.dead_letter.reason
    assert decoded.dead_letter.event_id == 7
    # The variant's latest state is unknown: its job cannot be folded without it.
    assert decoded.state.problem and reason in decoded.state.problem
    with pytest.raises(UnfoldableJobError, match="is a dead letter"):
        fold_job([decoded.state], PIPELINE)


def test_an_event_without_ids_is_only_a_dead_letter_that_holds_its_job():
    decoded = decode_event(row({"status": "done"}, variant_id=None))
    assert decoded.state is None
    assert decoded.dead_letter.reason == "event has no variant_id"
    assert decoded.dead_letter.holds_job  # its job is flagged until it is retried or discarded
    missing_version = decode_event(row({"status": "done"}, variant_version=None))
    assert missing_version.state is None and missing_version.dead_letter.reason == "event has no variant_version"
    assert missing_version.dead_letter.holds_job
    no_job = decode_event(row({"status": "done"}, job_id=None, variant_id=None))
    assert no_job.dead_letter.reason == "event has no job_id or variant_id" and not no_job.dead_letter.holds_job


def test_a_version_capture_never_issued_is_a_dead_letter_that_holds_its_job():
    decoded = decode_event(row({"status": "done", "step": "iou_eval"}, version_issued=False))
    assert decoded.state is None  # no state at a version nothing could ever pass
    assert "never issued" in decoded.dead_letter.reason and decoded.dead_letter.holds_job


def test_a_step_missing_from_the_pipeline_is_kept_and_flags_the_job():
    decoded = decode_event(row({"status": "done", "step": "mystery"}))
    assert decoded.dead_letter is None and decoded.state.step == "mystery"
    with pytest.raises(UnknownStepError, match="'mystery' is not in the pipeline"):
        fold_job([decoded.state], PIPELINE)


json_st = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(payload=json_st | st.fixed_dictionaries({"status": st.text(max_size=10), "step": json_st}))
def test_any_payload_decodes_or_parks_without_raising(payload):
    decoded = decode_event(row(payload))
    assert decoded.state is not None or decoded.dead_letter is not None


@settings(max_examples=500, deadline=None)
@given(
    payload=json_st
    | st.fixed_dictionaries(
        {"status": st.sampled_from(["queued", "running", "done", "failed", "Done", 3, None]), "step": json_st}
    )
    | st.fixed_dictionaries({"status": st.sampled_from(["done", "running"]), "step": st.text(max_size=250)})
)
def test_the_fast_path_decodes_exactly_as_the_payload_model(payload):
    from processor import decode

    event = row(payload)
    fast = decode._variant_changed_fast(event, payload)
    if fast is None:
        return  # the model decides
    assert decode.decode_event(dataclasses.replace(event, payload=json.dumps(payload))) == fast
    model = decode.VariantChanged.model_validate(payload)
    assert (fast.state.status, fast.state.step) == (model.status, model.step)
