"""Every advisory lock the product takes is named in processor/store/partitions.py, and the copies that
cannot import it (the application's package, the schema's SQL) agree with it."""

from __future__ import annotations

from pathlib import Path

from outbox.subscription import SUBSCRIBER_LOCK_CLASS
from processor.store import partitions

ROOT = Path(__file__).parents[2]


def test_the_classes_are_distinct_and_consecutive():
    classes = [
        partitions.CONSUMER_LOCK_CLASS,
        partitions.MEMBER_LOCK_CLASS,
        SUBSCRIBER_LOCK_CLASS,
        partitions.ELECTION_LOCK_CLASS,
    ]
    assert classes == list(range(0x0B0C_5E11, 0x0B0C_5E15))
    assert partitions.SUBSCRIBER_LOCK_CLASS == SUBSCRIBER_LOCK_CLASS


def test_the_schema_takes_the_transitions_lock_with_the_named_class_and_key():
    taken = f"pg_advisory_xact_lock({partitions.CONSUMER_LOCK_CLASS}, {partitions.TRANSITIONS_LOCK_KEY})"
    assert taken in (ROOT / "schema" / "schema.sql").read_text()
    keys = {partitions.MIGRATIONS_LOCK_KEY, partitions.REPARTITION_LOCK_KEY, partitions.TRANSITIONS_LOCK_KEY}
    assert len(keys) == 3 and max(keys) < 0  # below every partition's key


def test_each_cluster_duty_has_its_own_key():
    assert len({int(duty) for duty in partitions.ClusterDuty}) == len(partitions.ClusterDuty)
