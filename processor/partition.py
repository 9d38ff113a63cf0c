"""A partition's life in the worker that claimed it: claimed -> checking -> (rebasing ->) ready -> releasing.

- claimed: this worker's session took the partition's consumer lock (one consumer per partition);
- checking: its checkpoint is read and checked: taken in this cluster, or restored from another one
  (processor/rebase.py), or a rebase interrupted;
- rebasing: only when the check asks for it, a step of its own that may take long (every job rebuilt);
- ready: flagged jobs queued to be folded again, and its progress (cursor, jobs to fold) loaded: the
  worker applies its events (processor/worker.py);
- releasing: the lock let go (a worker joined, the partition was removed, the worker stops); released
  also when the session is gone, its lock with it.

Each transition is a method, checked against the state it leaves, and emits a test signal
(processor/testsignal.py) so that tests wait on it instead of polling.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from processor import rebase, store, testsignal
from processor.batch import FoldContext
from processor.errors import TransitionError
from processor.snapshot import Cursor
from processor.store import Connection
from processor.testsignal import Signal


class PartitionState(Enum):
    CLAIMED = "its consumer lock is held"
    CHECKING = "its checkpoint is being checked"
    REBASING = "being rebased after a restore"
    READY = "its events are being applied"
    RELEASING = "its consumer lock is being let go"
    RELEASED = "no longer this worker's"


@dataclass
class Progress:
    """Where a ready partition is, between two steps of the worker."""

    cursor: Cursor
    awaiting_fold: bool = False  # jobs wait in outbox_dirty_jobs to be folded
    probe: bool = True  # check for events before opening a batch transaction
    retry_at: float | None = None  # monotonic time when a job whose row was locked is due again


class Partition:
    """One partition this worker holds, and the step of its life it is at (``state``)."""

    def __init__(self, number: int, owner: object) -> None:
        self.number = number
        self.state = PartitionState.CLAIMED
        self.need = rebase.Need.NOTHING  # what the check found
        self._progress: Progress | None = None
        self._owner = owner  # the worker, named in the signals
        self._signal(Signal.PARTITION_CLAIMED)

    @classmethod
    def claim(cls, conn: Connection, number: int, owner: object) -> Partition | None:
        """Take the partition's consumer lock if it is free (a session lock: it goes with the session)."""
        return cls(number, owner) if store.consumer_lock_try(conn, number) else None

    @property
    def progress(self) -> Progress:
        if self._progress is None:
            raise TransitionError(f"partition {self.number} is {self.state.name.lower()}, not ready")
        return self._progress

    def check(self, conn: Connection) -> rebase.Need:
        """Claimed -> checking: whether the checkpoint needs a rebase (restored elsewhere) or a rebuild."""
        self._enter(PartitionState.CHECKING, Signal.PARTITION_CHECKING, PartitionState.CLAIMED)
        cursor = store.checkpoint_get(conn, self.number).cursor
        self.need = rebase.check(conn, self.number, cursor)
        return self.need

    def rebase(self, conn: Connection, ctx: FoldContext) -> None:
        """Checking -> rebasing: do what the check found (may take long: every job is rebuilt)."""
        self._enter(PartitionState.REBASING, Signal.PARTITION_REBASING, PartitionState.CHECKING)
        rebase.run(conn, ctx, self.need)
        self._signal(Signal.REBASE_DONE)

    def make_ready(self, conn: Connection) -> Progress:
        """Checking or rebasing -> ready: queue flagged jobs again (the pipeline may have been fixed), load progress."""
        if self.state is PartitionState.CHECKING and self.need is not rebase.Need.NOTHING:
            raise TransitionError(f"partition {self.number} needs {self.need.value} before it is ready")
        self._enter(PartitionState.READY, None, PartitionState.CHECKING, PartitionState.REBASING)
        store.jobs_awaiting_fold_add_flagged(conn, self.number)
        return self.reload(conn)  # the worker signals it once its health shows it (Worker._take)

    def reload(self, conn: Connection) -> Progress:
        """Ready: resume from the checkpoint as it is now (after a fence, a rollback, a configuration change)."""
        if self.state is not PartitionState.READY:
            raise TransitionError(f"partition {self.number} is {self.state.name.lower()}, not ready")
        progress = Progress(store.checkpoint_get(conn, self.number).cursor)
        progress.awaiting_fold = store.jobs_awaiting_fold_exist(conn, self.number)
        self._progress = progress
        return progress

    def release(self, conn: Connection) -> None:
        """Any state -> releasing -> released: let go of the consumer lock."""
        self._enter(PartitionState.RELEASING, Signal.PARTITION_RELEASING, *_HELD)
        store.consumer_lock_release(conn, self.number)
        self.forget()

    def forget(self) -> None:
        """Released: the lock was let go, or went with the session."""
        if self.state is not PartitionState.RELEASED:
            self._progress = None  # before the signal: a signal means the transition is done
            self._enter(PartitionState.RELEASED, Signal.PARTITION_RELEASED, *_HELD, PartitionState.RELEASING)

    def _enter(self, state: PartitionState, signal: Signal | None, *sources: PartitionState) -> None:
        if self.state not in sources:
            raise TransitionError(
                f"partition {self.number}: {self.state.name.lower()} -> {state.name.lower()} is not a transition"
            )
        self.state = state
        if signal is not None:
            self._signal(signal)

    def _signal(self, signal: Signal) -> None:
        testsignal.emit(signal, worker=self._owner, partition=self.number)

    def __repr__(self) -> str:
        return f"Partition({self.number}, {self.state.name.lower()})"


_HELD = (PartitionState.CLAIMED, PartitionState.CHECKING, PartitionState.REBASING, PartitionState.READY)
