"""The limits of an event, defined once: the statuses a variant may have, how long a step may be,
how large a payload the processor reads, and how many partitions there may be.

Python reads them from here (outbox.events, the write API's validation, processor.decode, the
pipeline's check, migrate's column check). The SQL that applies them at write time and in the drain
(capture, outbox_event_decode_v1, outbox_payload_fits, the CHECKs on outbox_partitioning and
outbox_subscriptions) is installed by migrations that databases in the field have run, and sits on
the writers' hot path, measured to the instruction (docs/decisions/0004, 0005): it keeps its
literals, and tests/integration/test_limits.py reads every one of them from the installed catalog
and checks it against this module (docs/decisions/0014-event-limits-owner.md). A migration that
changes a limit changes it here in the same commit, and that test names every place to follow.
"""

from __future__ import annotations

from enum import StrEnum


class VariantStatus(StrEnum):
    """The statuses a variant can have; anything else is refused at write time."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


# The status set, in its order, as SQL writes it: IN ('queued', 'running', 'done', 'failed').
VARIANT_STATUSES: tuple[str, ...] = tuple(status.value for status in VariantStatus)

# The longest step name an event carries (characters). A pipeline may not name a longer step, and an
# event with one is a dead letter (outbox_event_decode_v1 in SQL, processor.decode in Python).
STEP_MAX_CHARS = 200

# The longest step capture writes into an event (bytes): a longer one is refused at write time, so
# that an event's payload stays within PAYLOAD_MAX_BYTES.
STEP_MAX_BYTES = 65_000

# The largest payload the processor reads (bytes, as JSON text): over it an event is a dead letter
# whose payload is never sent to the worker (outbox_payload_fits).
PAYLOAD_MAX_BYTES = 65_536

# outbox_payload_fits's cheap first test: an uncompressed jsonb of at most this many bytes is within
# PAYLOAD_MAX_BYTES as text (at most 6 times as long, with \u escapes).
PAYLOAD_SMALL_BYTES = 10_000

# How many partitions there may be (outbox_partitioning's CHECK); partitions are numbered from 0.
PARTITIONS_MIN = 1
PARTITIONS_MAX = 1024
