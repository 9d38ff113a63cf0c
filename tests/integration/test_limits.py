"""The event limits in the installed SQL are outbox/limits.py's (docs/decisions/0014-event-limits-owner.md).

The SQL that applies them (capture, the drain's decoding, the payload bound, two CHECKs) keeps its
literals: it is installed by shipped migrations and sits on the writers' hot path. This test reads
every such literal from the catalog of a migrated database, checks it against outbox.limits, and
counts the places, so that a new copy is noticed and a changed limit names every place to follow.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any

import psycopg

from outbox import limits

# Every definition of the product: functions and table constraints.
_DEFINITIONS = """
SELECT p.proname::text, pg_get_functiondef(p.oid)
FROM pg_proc AS p JOIN pg_namespace AS n ON n.oid = p.pronamespace
WHERE n.nspname = 'public' AND p.proname LIKE 'outbox\\_%'
UNION ALL
SELECT c.relname || '.' || k.conname, pg_get_constraintdef(k.oid)
FROM pg_constraint AS k JOIN pg_class AS c ON c.oid = k.conrelid
WHERE c.relname LIKE 'outbox\\_%'
"""

_STATUS_LIST = re.compile(r"(?:IN \(|ARRAY\[)((?:[^)\]]*?)'\"?queued\"?'[^)\]]*)[)\]]")
_STATUS_WORDS = re.compile(r"must be one of ([a-z, ]+) \(got")
_STEP_BYTES = re.compile(r"octet_length\([^()]*step[^()]*\)(?:, 0\))?\s*(?:>|<=)\s*(\d+)")
_STEP_BYTES_WORDS = re.compile(r"a step of at most ([\d,]+) bytes")
_STEP_CHARS = re.compile(r"length\(p\.step #>> '\{\}'\) <= (\d+)")
_PAYLOAD_SMALL = re.compile(r"pg_column_size\(p_payload\) <= (\d+)")
_PAYLOAD_MAX = re.compile(r"octet_length\(p_payload::text\) <= (\d+)")
_PARTITIONS = re.compile(r"partitions >= (\d+)\) AND \(partitions <= (\d+)")


def limits_in_sql(conn: psycopg.Connection[Any]) -> dict[str, list[tuple[str, Any]]]:
    """Each limit's places in the installed SQL: (object, the value written there)."""
    found: dict[str, list[tuple[str, Any]]] = defaultdict(list)
    for name, text in conn.execute(_DEFINITIONS).fetchall():
        for match in _STATUS_LIST.finditer(text):
            words = tuple(re.findall(r"'\"?([a-z]+)\"?'", match.group(1)))
            found["status set"].append((name, words))
        for match in _STATUS_WORDS.finditer(text):
            found["status set"].append((name, tuple(match.group(1).split(", "))))
        for match in _STEP_BYTES.finditer(text):
            found["step bytes"].append((name, int(match.group(1))))
        for match in _STEP_BYTES_WORDS.finditer(text):
            found["step bytes"].append((name, int(match.group(1).replace(",", ""))))
        for match in _STEP_CHARS.finditer(text):
            found["step characters"].append((name, int(match.group(1))))
        for match in _PAYLOAD_SMALL.finditer(text):
            found["payload, cheap test"].append((name, int(match.group(1))))
        for match in _PAYLOAD_MAX.finditer(text):
            found["payload"].append((name, int(match.group(1))))
        for match in _PARTITIONS.finditer(text):
            found["partition count"].append((name, (int(match.group(1)), int(match.group(2)))))
    return found


EXPECTED = {
    "status set": limits.VARIANT_STATUSES,
    "step bytes": limits.STEP_MAX_BYTES,
    "step characters": limits.STEP_MAX_CHARS,
    "payload, cheap test": limits.PAYLOAD_SMALL_BYTES,
    "payload": limits.PAYLOAD_MAX_BYTES,
    "partition count": (limits.PARTITIONS_MIN, limits.PARTITIONS_MAX),
}

# How many places of the installed SQL write each limit (the figures of decision 0014). A new place
# changes a count: add it here once it is checked above.
PLACES = {
    "status set": 10,
    "step bytes": 6,
    "step characters": 1,
    "payload, cheap test": 1,
    "payload": 1,
    "partition count": 1,
}


def test_every_limit_in_the_installed_sql_is_the_one_outbox_limits_defines(conn):
    found = limits_in_sql(conn)
    wrong = [
        f"{limit} in {name} is {value!r}, outbox/limits.py says {EXPECTED[limit]!r}"
        for limit, places in found.items()
        for name, value in places
        if value != EXPECTED[limit]
    ]
    assert not wrong, "\n".join(wrong)
    counts = {limit: len(found.get(limit, [])) for limit in EXPECTED}
    assert counts == PLACES, {limit: [name for name, _ in found.get(limit, [])] for limit in EXPECTED}


def test_the_python_side_reads_outbox_limits():
    from outbox import events
    from processor import decode

    assert events.STEP_MAX_CHARS is limits.STEP_MAX_CHARS and events.VariantStatus is limits.VariantStatus
    assert decode.PAYLOAD_MAX_BYTES == limits.PAYLOAD_MAX_BYTES
    assert events.VariantChanged.model_fields["step"].metadata[0].max_length == limits.STEP_MAX_CHARS
