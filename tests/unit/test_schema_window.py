"""The window of schema versions a worker runs on (processor/migrate.py, docs/decisions/0013)."""

from __future__ import annotations

from processor.migrate import schema_refusal


def test_a_worker_runs_on_its_own_version_and_on_newer_ones_that_still_serve_it():
    assert schema_refusal(14, 14, worker=14) is None
    assert schema_refusal(15, 14, worker=14) is None
    # What the schema serves is the highest any applied migration declares (migrations_state, checked
    # against a database in tests/integration/test_migrate.py): 16 still serving 14 means 15 and 16 did.
    assert schema_refusal(16, 14, worker=14) is None


def test_an_older_schema_asks_for_migrate_and_one_that_no_longer_serves_the_worker_for_an_upgrade():
    assert schema_refusal(13, 13, worker=14) == (
        "the outbox schema is at version 13, this worker needs 14: run `outbox migrate`"
    )
    assert schema_refusal(15, 15, worker=14) == (
        "the outbox schema is at version 15, newer than this worker knows (14), and serves workers of "
        "version 15 and newer: upgrade the worker"
    )
