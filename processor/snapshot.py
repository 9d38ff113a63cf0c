"""PostgreSQL snapshots (``pg_snapshot``) and the processor's cursor built from them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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

    @classmethod
    def from_row(cls, done: str, target: str | None, after_txid: str, after_event_id: int) -> Cursor:
        """The cursor a checkpoint row stores (snapshots and the transaction id as text)."""
        return cls(
            Snapshot.parse(done), Snapshot.parse(target) if target else None, Position(int(after_txid), after_event_id)
        )

    def caught_up_to(self, target: Snapshot) -> Cursor:
        return Cursor(done=target)

    def partway_to(self, target: Snapshot, last: Position) -> Cursor:
        return Cursor(done=self.done, target=target, after=last)

    def closing(self, new_done: Snapshot) -> Cursor:
        """The whole catch-up from this cursor's done snapshot to ``new_done``, read from its start.

        What a completed catch-up applied, over all its batches: the events the range read of this
        cursor finds (store.jobs_awaiting_fold_add_applied queues their jobs).
        """
        return Cursor(done=self.done, target=new_done)

    @property
    def xmax(self) -> int:
        """The highest xmax among its snapshots: every transaction id this cursor can have seen is below it."""
        return max(self.done.xmax, self.target.xmax if self.target else 0)

    @property
    def range_start(self) -> Position:
        """Where the range read of events not visible in ``done`` starts, in (txid, event_id) order.

        At the done snapshot's xmax (event ids start at 1: (xmax, 0) is before its first event), or
        further on within a catch-up, after the last event applied. Transactions below xmax that
        ``done`` did not see are its xip list, read by a branch of their own.
        """
        return max(self.after, Position(self.done.xmax, 0))

    def params(self) -> dict[str, Any]:
        """The cursor as the store's statements take it (store/events.sql: the range read)."""
        range_start = self.range_start
        return {
            "range_txid": str(range_start.txid),
            "range_event_id": range_start.event_id,
            "done": str(self.done),
            "done_xip": [str(x) for x in sorted(self.done.xip)],
            "target": str(self.target) if self.target else None,
            "after_txid": str(self.after.txid),
            "after_event_id": self.after.event_id,
        }
