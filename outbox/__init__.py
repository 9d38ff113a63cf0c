"""The writer side of the outbox: what an application calls inside its own transaction.

>>> with engine.begin() as conn:
...     job_id, variant_ids = outbox.create_job(conn, variants=3)
>>> with engine.begin() as conn:
...     outbox.update_variant(conn, variant_ids[0], status="running", step="detect")

Writers that run plain SQL on ``jobs_variants`` need no change: the capture trigger installed by
``outbox migrate`` writes the same events.
"""

from outbox.events import EventType, VariantChanged, VariantRemoved, VariantStatus
from outbox.writer import UnknownStepError, VariantNotFoundError, create_job, hold_job, release_job, update_variant

__all__ = [
    "EventType",
    "UnknownStepError",
    "VariantChanged",
    "VariantNotFoundError",
    "VariantRemoved",
    "VariantStatus",
    "create_job",
    "hold_job",
    "release_job",
    "update_variant",
]
