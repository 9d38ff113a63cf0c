"""The events the outbox carries, as pydantic models with a schema version.

An event row has an envelope (``event_type``, ``schema_version``, ids, the variant's version) in
columns and a JSON ``payload`` described by the models below. The SQL that writes payloads
(``outbox_append_variant_event`` and the update trigger ``outbox_capture_variant_update`` in
``schema/migrations``) and the processor that reads them both follow these models; tests check that
every payload the database writes validates against them, and that both write the same row.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

# The event limits (statuses, step length) are outbox.limits'; re-exported here, where they always were.
from outbox.limits import STEP_MAX_CHARS as STEP_MAX_CHARS
from outbox.limits import VariantStatus as VariantStatus


class EventType(StrEnum):
    """Event types, as stored in ``outbox_events.event_type``."""

    VARIANT_CHANGED = "variant_changed"
    VARIANT_REMOVED = "variant_removed"


class VariantChanged(BaseModel):
    """A variant's new status and step (``variant_changed``, schema version 1).

    Unknown fields are ignored so that a newer writer can add fields without stopping an older
    processor.
    """

    model_config = ConfigDict(extra="ignore", frozen=True)

    schema_version: Literal[1] = Field(default=1, exclude=True)
    status: VariantStatus
    # Step names are short identifiers from OUTBOX_PIPELINE_STEPS; the cap keeps a hostile payload
    # from carrying megabytes through the fold.
    step: str | None = Field(default=None, max_length=STEP_MAX_CHARS)


class VariantRemoved(BaseModel):
    """A variant was deleted (``variant_removed``, schema version 1); the payload is empty."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    schema_version: Literal[1] = Field(default=1, exclude=True)


PAYLOAD_MODELS: dict[tuple[str, int], type[BaseModel]] = {
    (EventType.VARIANT_CHANGED, 1): VariantChanged,
    (EventType.VARIANT_REMOVED, 1): VariantRemoved,
}
