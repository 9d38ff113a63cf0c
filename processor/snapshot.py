"""PostgreSQL snapshots (``pg_snapshot``) and the processor's cursor built from them."""

from __future__ import annotations

from dataclasses import dataclass

from processor.decode import EventRow


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A ``pg_snapshot``: transactions below xmin are finished, xip were running, xmax and up not started.

    A committed transaction is visible in a snapshot when its id is below xmax and not in xip.
    """

    xmin: int
    xmax: int
    xip: tuple[int, ...] = ()

    @classmethod
    def parse(cls, text: str) -> Snapshot:
        xmin, xmax, xip = text.split(":")
        return cls(int(xmin), int(xmax), tuple(int(x) for x in xip.split(",") if x))

    def __str__(self) -> str:
        return f"{self.xmin}:{self.xmax}:{','.join(str(x) for x in self.xip)}"


@dataclass(frozen=True, slots=True, order=True)
class Position:
    """A place in (transaction id, event id) order."""

    txid: int
    event_id: int

    @classmethod
    def of(cls, event: EventRow) -> Position:
        return cls(event.txid, event.event_id)


START = Position(0, 0)
NOTHING_SEEN = Snapshot(1, 1)


@dataclass(frozen=True, slots=True)
class Cursor:
    """How far a partition has been applied.

    Every event of a transaction visible in ``done`` is applied. While a catch-up to ``target``
    spans several batches, the events of transactions visible in ``target`` but not in ``done``
    are applied up to ``after``, in (txid, event_id) order.
    """

    done: Snapshot
    target: Snapshot | None = None
    after: Position = START

    def caught_up_to(self, target: Snapshot) -> Cursor:
        return Cursor(done=target)

    def partway_to(self, target: Snapshot, last: Position) -> Cursor:
        return Cursor(done=self.done, target=target, after=last)
