"""The worker's test signals (processor/testsignal.py) for tests that run a worker in this process.

def test_x(signals):
    with signals.expect(Signal.PARTITION_READY, worker=service.worker, partition=0) as ready:
        service.start()
    ready.wait(10)
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from processor.testsignal import Signals


@pytest.fixture
def signals() -> Iterator[Signals]:
    """Every in-process worker's signals, while the test runs."""
    with Signals().install() as registry:
        yield registry
