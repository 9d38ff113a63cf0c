"""Turn outbox rows into variant states, or into dead letters with the reason they cannot apply."""

from __future__ import annotations

import datetime as dt
import json
import uuid
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from outbox.events import PAYLOAD_MODELS, EventType, VariantChanged, VariantStatus
from processor.fold import VariantState


@dataclass(frozen=True, slots=True)
class EventRow:
    """One row of ``outbox_events``, as the processor reads it."""

    event_id: int
    txid: int
    event_type: str
    schema_version: int
    job_id: uuid.UUID | None
    variant_id: uuid.UUID | None
    variant_version: int | None
    payload: Any  # None: over PAYLOAD_MAX_BYTES, left unread (outbox_event_payload in migration 0007)
    created_at: dt.datetime


PAYLOAD_MAX_BYTES = 65_536  # as outbox_event_payload


@dataclass(frozen=True, slots=True)
class DeadLetter:
    event_id: int
    job_id: uuid.UUID | None
    variant_id: uuid.UUID | None
    reason: str


@dataclass(frozen=True, slots=True)
class Decoded:
    """What one event means for its variant, and the dead letter when it cannot be used.

    An unusable event that still names its variant and version yields a state with a ``problem``:
    the variant's latest state is unknown, so its job is flagged instead of folded without it.
    """

    state: VariantState | None
    dead_letter: DeadLetter | None = None


def decode_event(row: EventRow) -> Decoded:
    """Validate one event against its payload model."""

    def dead(reason: str) -> Decoded:
        letter = DeadLetter(row.event_id, row.job_id, row.variant_id, reason)
        if row.job_id is None or row.variant_id is None or row.variant_version is None:
            return Decoded(None, letter)
        problem = f"event {row.event_id} is a dead letter: {reason}"
        return Decoded(
            VariantState(row.variant_id, row.job_id, row.variant_version, None, None, problem=problem), letter
        )

    if row.job_id is None or row.variant_id is None or row.variant_version is None:
        return dead("event has no job_id, variant_id or variant_version")
    model = PAYLOAD_MODELS.get((row.event_type, row.schema_version))
    if model is None:
        return dead(f"unknown event type {row.event_type!r} at schema version {row.schema_version}")
    if row.payload is None:
        return dead(f"payload is over {PAYLOAD_MAX_BYTES:,} bytes (not read)")
    try:
        # Payloads arrive as text and are parsed here, one at a time, so that a hostile one (nested
        # deeper than Python's parser allows, say) becomes this event's dead letter, not a crash.
        data = json.loads(row.payload) if isinstance(row.payload, str) else row.payload
    except (ValueError, RecursionError) as exc:
        return dead(f"payload is not readable JSON: {type(exc).__name__}")
    fast = _variant_changed_fast(row, data)
    if fast is not None:
        return fast
    try:
        payload = model.model_validate(data)
    except ValidationError as exc:
        return dead(f"invalid payload: {_first_error(exc)}")
    except RecursionError:
        return dead("invalid payload: nested too deeply")

    if row.event_type == EventType.VARIANT_REMOVED:
        return Decoded(VariantState(row.variant_id, row.job_id, row.variant_version, None, None, removed=True))
    assert isinstance(payload, VariantChanged)
    # A step missing from the pipeline is kept as is: the fold flags the job (see processor.fold).
    return Decoded(VariantState(row.variant_id, row.job_id, row.variant_version, payload.status, payload.step))


_STATUSES = {status.value: status for status in VariantStatus}
_STEP_MAX = 200  # as VariantChanged.step


def _variant_changed_fast(row: EventRow, data: Any) -> Decoded | None:
    """The common, valid ``variant_changed`` v1 payload without pydantic (a tenth of the cost).

    Returns None for anything else, which then goes through the model: the result is the same.
    """
    if row.event_type != EventType.VARIANT_CHANGED or row.schema_version != 1 or type(data) is not dict:
        return None
    raw_status = data.get("status")
    status = _STATUSES.get(raw_status) if type(raw_status) is str else None
    step = data.get("step")
    if status is None or not (step is None or (type(step) is str and len(step) <= _STEP_MAX)):
        return None
    assert row.variant_id is not None and row.job_id is not None and row.variant_version is not None
    return Decoded(VariantState(row.variant_id, row.job_id, row.variant_version, status, step))


def _first_error(exc: ValidationError) -> str:
    # One short line; the input is not echoed back, it may be large or hostile.
    error = exc.errors(include_input=False, include_url=False)[0]
    where = ".".join(str(part) for part in error["loc"]) or "payload"
    return f"{where}: {error['msg']}"
