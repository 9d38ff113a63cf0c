"""Turn outbox rows into variant states, or into dead letters with the reason they cannot apply."""

from __future__ import annotations

import datetime as dt
import json
import uuid
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from pydantic import ValidationError

from outbox import limits
from outbox.events import PAYLOAD_MODELS, STEP_MAX_CHARS, EventType, VariantChanged, VariantStatus
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
    # Whether variant_version is one capture issued (at most the sequence's last value when read):
    # a version beyond it can only be hand-written, and has no place in the variant's order.
    version_issued: bool = True


PAYLOAD_MAX_BYTES = limits.PAYLOAD_MAX_BYTES  # as outbox_event_payload (outbox/limits.py owns it)


class DeadLetterClass(StrEnum):
    """The class of a dead letter's reason: a small fixed set, for a metric's label and an alert.

    The one owner of the classification: every reason decode_event writes begins with its class's
    ``prefix`` (``reason`` writes it), and ``of`` reads it back; so does the metric's query, which is
    given each class's prefix (store.dead_letters_count_by_class).
    """

    MISSING_IDS = "missing_ids"  # no job_id, variant_id or variant_version
    VERSION_NOT_ISSUED = "version_not_issued"  # a version capture never issued (hand-written)
    UNKNOWN_TYPE = "unknown_type"  # an event type or schema version this worker does not know
    PAYLOAD_TOO_LARGE = "payload_too_large"  # over PAYLOAD_MAX_BYTES, never read
    UNREADABLE_JSON = "unreadable_json"
    INVALID_PAYLOAD = "invalid_payload"  # JSON that its payload model refuses
    OTHER = "other"  # a reason written by hand, or by an older version

    @property
    def prefix(self) -> str:
        return _PREFIXES[self]

    def reason(self, detail: str) -> str:
        """The reason text of a dead letter of this class."""
        return self.prefix + detail

    @classmethod
    def of(cls, reason: str) -> DeadLetterClass:
        """The class of a stored reason."""
        return next((kind for kind, prefix in _PREFIXES.items() if reason.startswith(prefix)), cls.OTHER)


_PREFIXES = {
    DeadLetterClass.MISSING_IDS: "event has no ",
    DeadLetterClass.VERSION_NOT_ISSUED: "variant_version ",
    DeadLetterClass.UNKNOWN_TYPE: "unknown event type ",
    DeadLetterClass.PAYLOAD_TOO_LARGE: "payload is over ",
    DeadLetterClass.UNREADABLE_JSON: "payload is not readable JSON",
    DeadLetterClass.INVALID_PAYLOAD: "invalid payload",
    DeadLetterClass.OTHER: "",
}


@dataclass(frozen=True, slots=True)
class DeadLetter:
    event_id: int
    job_id: uuid.UUID | None
    variant_id: uuid.UUID | None
    reason: str
    # It names a job but has no trustworthy place in its variant's order: it holds the job (flagged,
    # state left as it was) until it is retried or discarded (migration 0009).
    holds_job: bool = False


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

    ordered = row.variant_id is not None and row.variant_version is not None and row.version_issued

    def dead(kind: DeadLetterClass, detail: str) -> Decoded:
        reason = kind.reason(detail)
        if row.job_id is None or not ordered:
            return Decoded(None, DeadLetter(row.event_id, row.job_id, row.variant_id, reason, row.job_id is not None))
        assert row.variant_id is not None and row.variant_version is not None
        problem = f"event {row.event_id} is a dead letter: {reason}"  # as outbox_unreadable_problem_v1
        return Decoded(
            VariantState(row.variant_id, row.job_id, row.variant_version, None, None, problem=problem),
            DeadLetter(row.event_id, row.job_id, row.variant_id, reason),
        )

    if row.job_id is None or row.variant_id is None or row.variant_version is None:
        missing = [name for name in ("job_id", "variant_id", "variant_version") if getattr(row, name) is None]
        return dead(DeadLetterClass.MISSING_IDS, " or ".join(missing))
    if not row.version_issued:
        return dead(
            DeadLetterClass.VERSION_NOT_ISSUED,
            f"{row.variant_version} was never issued by capture (a hand-written event?): "
            "it has no place in the variant's order",
        )
    model = PAYLOAD_MODELS.get((row.event_type, row.schema_version))
    if model is None:
        return dead(DeadLetterClass.UNKNOWN_TYPE, f"{row.event_type!r} at schema version {row.schema_version}")
    if row.payload is None:
        return dead(DeadLetterClass.PAYLOAD_TOO_LARGE, f"{PAYLOAD_MAX_BYTES:,} bytes (not read)")
    try:
        # Payloads arrive as text and are parsed here, one at a time, so that a hostile one (nested
        # deeper than Python's parser allows, say) becomes this event's dead letter, not a crash.
        data = json.loads(row.payload) if isinstance(row.payload, str) else row.payload
    except (ValueError, RecursionError) as exc:
        return dead(DeadLetterClass.UNREADABLE_JSON, f": {type(exc).__name__}")
    fast = _variant_changed_fast(row, data)
    if fast is not None:
        return fast
    try:
        payload = model.model_validate(data)
    except ValidationError as exc:
        return dead(DeadLetterClass.INVALID_PAYLOAD, f": {_first_error(exc)}")
    except RecursionError:
        return dead(DeadLetterClass.INVALID_PAYLOAD, ": nested too deeply")

    if row.event_type == EventType.VARIANT_REMOVED:
        return Decoded(VariantState(row.variant_id, row.job_id, row.variant_version, None, None, removed=True))
    assert isinstance(payload, VariantChanged)
    # A step missing from the pipeline is kept as is: the fold flags the job (see processor.fold).
    return Decoded(VariantState(row.variant_id, row.job_id, row.variant_version, payload.status, payload.step))


_STATUSES = {status.value: status for status in VariantStatus}


def _variant_changed_fast(row: EventRow, data: Any) -> Decoded | None:
    """The common, valid ``variant_changed`` v1 payload without pydantic (a tenth of the cost).

    Returns None for anything else, which then goes through the model: the result is the same.
    """
    if row.event_type != EventType.VARIANT_CHANGED or row.schema_version != 1 or type(data) is not dict:
        return None
    raw_status = data.get("status")
    status = _STATUSES.get(raw_status) if type(raw_status) is str else None
    step = data.get("step")
    if status is None or not (step is None or (type(step) is str and len(step) <= STEP_MAX_CHARS)):
        return None
    assert row.variant_id is not None and row.job_id is not None and row.variant_version is not None
    return Decoded(VariantState(row.variant_id, row.job_id, row.variant_version, status, step))


def _first_error(exc: ValidationError) -> str:
    # One short line; the input is not echoed back, it may be large or hostile.
    error = exc.errors(include_input=False, include_url=False)[0]
    where = ".".join(str(part) for part in error["loc"]) or "payload"
    return f"{where}: {error['msg']}"
