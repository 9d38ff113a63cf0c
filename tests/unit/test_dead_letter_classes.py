"""Dead letters by reason class (the metric's label): every reason decode_event writes has its class."""

from __future__ import annotations

import itertools

import pytest

from processor.decode import DeadLetterClass, decode_event
from tests.unit.test_decode import row


@pytest.mark.parametrize(
    ("event", "kind"),
    [
        (row({"status": "done"}, job_id=None), DeadLetterClass.MISSING_IDS),
        (row({"status": "done"}, variant_version=None), DeadLetterClass.MISSING_IDS),
        (row({"status": "done"}, version_issued=False), DeadLetterClass.VERSION_NOT_ISSUED),
        (row({}, event_type="job_exploded"), DeadLetterClass.UNKNOWN_TYPE),
        (row({}, schema_version=99), DeadLetterClass.UNKNOWN_TYPE),
        (row(None), DeadLetterClass.PAYLOAD_TOO_LARGE),
        (row("not JSON at all"), DeadLetterClass.UNREADABLE_JSON),
        (row("[" * 5000 + "]" * 5000), DeadLetterClass.UNREADABLE_JSON),
        (row({"status": "exploded", "step": "ingest"}), DeadLetterClass.INVALID_PAYLOAD),
        (row('"a JSON string"'), DeadLetterClass.INVALID_PAYLOAD),
    ],
)
def test_each_reason_decode_writes_reads_back_as_its_class(event, kind):
    letter = decode_event(event).dead_letter
    assert letter is not None
    assert DeadLetterClass.of(letter.reason) is kind, letter.reason


def test_the_classes_are_told_apart_whatever_their_order():
    prefixes = {kind: kind.prefix for kind in DeadLetterClass if kind is not DeadLetterClass.OTHER}
    assert all(prefixes.values())
    for a, b in itertools.permutations(prefixes.values(), 2):
        assert not a.startswith(b), (a, b)  # no reason could match two classes
    assert DeadLetterClass.OTHER.prefix == ""
    assert DeadLetterClass.of("written by hand") is DeadLetterClass.OTHER
    assert list(DeadLetterClass)[-1] is DeadLetterClass.OTHER  # the query takes the first match, in this order
