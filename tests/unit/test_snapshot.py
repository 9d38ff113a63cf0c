"""processor.snapshot: the cursor's arithmetic (where the range read starts, the query parameters)."""

from __future__ import annotations

import uuid

from processor.fold import VariantState, newest_states
from processor.snapshot import Cursor, Position, Snapshot


def test_the_range_read_starts_at_the_done_xmax_or_after_the_last_event_applied():
    done = Snapshot(10, 15, (12,))
    assert Cursor(done).range_start == Position(15, 0)  # event ids start at 1: before xmax's first event
    within = Cursor(done, Snapshot(20, 20), Position(17, 40))
    assert within.range_start == Position(17, 40)
    # A position below the done xmax (only the xip branch's events were applied): still from xmax.
    assert Cursor(done, Snapshot(20, 20), Position(12, 7)).range_start == Position(15, 0)


def test_params_and_a_checkpoint_row_round_trip():
    cursor = Cursor.from_row("10:15:12,11", "20:20:", "17", 40)
    assert cursor == Cursor(Snapshot(10, 15, (12, 11)), Snapshot(20, 20), Position(17, 40))
    assert cursor.params() == {
        "range_txid": "17",
        "range_event_id": 40,
        "done": "10:15:12,11",
        "done_xip": ["11", "12"],
        "target": "20:20:",
        "after_txid": "17",
        "after_event_id": 40,
    }
    assert Cursor.from_row("10:15:", None, "0", 0) == Cursor(Snapshot(10, 15))


def test_closing_a_catch_up_reads_it_from_its_start_and_xmax_is_the_newest_bound():
    cursor = Cursor(Snapshot(10, 15), Snapshot(20, 22), Position(17, 40))
    closing = cursor.closing(Snapshot(21, 21))
    assert closing == Cursor(Snapshot(10, 15), Snapshot(21, 21))
    assert closing.range_start == Position(15, 0)
    assert cursor.xmax == 22 and Cursor(Snapshot(10, 15)).xmax == 15


def test_the_newest_state_is_the_highest_version_then_the_highest_event_id():
    variant, other, job = uuid.UUID(int=1), uuid.UUID(int=2), uuid.UUID(int=3)

    def state(v: uuid.UUID, version: int) -> VariantState:
        return VariantState(v, job, version, None, None)

    candidates = [(state(variant, 2), 5), (state(variant, 3), 4), (state(variant, 3), 6), (state(other, 1), 1)]
    for order in (candidates, candidates[::-1]):
        newest = newest_states(order)
        assert newest == {variant: (state(variant, 3), 6), other: (state(other, 1), 1)}
