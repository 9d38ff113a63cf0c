"""The age of the oldest open transaction that wrote events, when the login may not see when it began."""

from __future__ import annotations

import pytest

from processor import metrics


def test_a_hidden_start_is_counted_from_when_a_scan_first_saw_it(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [100.0]
    monkeypatch.setattr(metrics.time, "monotonic", lambda: now[0])
    clock = metrics.WriterClock()
    assert clock.oldest_age({}) == 0.0  # none open
    assert clock.oldest_age({"7": None, "8": 2.5}) == 2.5  # the hidden one was first seen just now
    now[0] = 130.0
    assert clock.oldest_age({"7": None, "8": 32.5}) == 32.5
    now[0] = 200.0
    assert clock.oldest_age({"7": None}) == 100.0  # a lower bound, never "none open"
    assert clock.oldest_age({"9": None}) == 0.0  # 7 ended: forgotten; 9 is new
