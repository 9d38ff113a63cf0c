"""What the worker waits for between polls: its poll interval, a stop request, or a notification.

With ``OUTBOX_WAKEUP=notify`` the active worker LISTENs on its own session, and writers notify when
they commit once ``outbox migrate --wakeup notify`` created the trigger for it
(schema/migrations/0003_notify_wakeup.sql), so the worker starts its next batch as soon as events
are committed rather than after its poll interval. Polling stays the safety net: a notification
that is never sent (no trigger, a writer with triggers disabled, ``verify --repair``) or that is
lost with a connection only delays work until the next poll, it never loses any.

A stop request must end a wait at once, also one on the connection's socket: ``wake`` writes to a
socket pair that every wait selects on (PEP 475 retries an interrupted ``select`` after the signal
handler ran, so a handler calling ``Worker.stop`` is seen too).
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import threading
import time
from collections import Counter
from enum import StrEnum
from typing import Any

import psycopg

# The store is imported where it is used: outbox.subscriber waits with this class too, and the
# application's package must not import the processor's store (and with it the fold) to do so.
Connection = psycopg.Connection[Any]

log = logging.getLogger(__name__)


class Wake(StrEnum):
    """Why a wait ended."""

    STOP = "stop"
    NOTIFY = "notify"
    TIMEOUT = "timeout"  # the poll interval elapsed


class Waiter:
    """The worker's wait between polls; ``wakes`` counts why each wait ended."""

    def __init__(self, stopping: threading.Event) -> None:
        self._stopping = stopping
        self._conn: Connection | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self.wakes: Counter[Wake] = Counter()
        self.notifications = 0  # received (several may end one wait)

    def listen(self, conn: Connection) -> None:
        """LISTEN on ``conn``; from now on a wait also ends when a notification arrives on it.

        Call it on the active worker's session before its first fetch, so that what commits after
        that fetch notifies. Not on a standby's: nobody would read its notifications.
        """
        from processor import store

        store.wakeup_listen(conn)
        self.attach(conn)
        if not store.wakeup_trigger_enabled(conn):
            log.warning(
                "OUTBOX_WAKEUP=notify, but writers do not notify (no outbox_wakeup_notify trigger on "
                "jobs_variants): run `outbox migrate --wakeup notify`; polling meanwhile"
            )

    def attach(self, conn: Connection) -> None:
        """Wait on ``conn`` from now on: a wait also ends when a notification arrives on it (LISTEN is the caller's)."""
        if self._wake_r is None:
            self._wake_r, self._wake_w = socket.socketpair()
            self._wake_r.setblocking(False)
            self._wake_w.setblocking(False)
        self._conn = conn

    def wake(self) -> None:
        """End the current wait now (Worker.stop: from any thread, or from a signal handler)."""
        wake_w = self._wake_w
        if wake_w is None:
            return
        with contextlib.suppress(OSError):  # full (a wake-up is pending anyway) or already closed
            wake_w.send(b"\0")

    def wait(self, seconds: float) -> Wake:
        """Wait up to ``seconds``: until stop, or a notification when listening; say which."""
        wake = self._wait(seconds)
        self.wakes[wake] += 1
        return wake

    def close(self) -> None:
        """Release the socket pair (the LISTEN ends with its session)."""
        self._conn = None
        for sock in (self._wake_r, self._wake_w):
            if sock is not None:
                sock.close()
        self._wake_r = self._wake_w = None

    def _wait(self, seconds: float) -> Wake:
        conn, wake_r = self._conn, self._wake_r
        if conn is None or conn.closed or wake_r is None:
            return Wake.STOP if self._stopping.wait(seconds) else Wake.TIMEOUT
        deadline = time.monotonic() + seconds
        while not self._stopping.is_set():
            # Notifications that came with the replies to the last batch's statements are kept by
            # psycopg and come first: they may be for events committed after that batch's fetch.
            if self._drain(conn):
                return Wake.NOTIFY
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return Wake.TIMEOUT
            # Readable connection: a notification, or the server closing it (the next drain raises
            # OperationalError and the worker reconnects), or anything else (wait on).
            ready, _, _ = select.select([conn.fileno(), wake_r.fileno()], [], [], remaining)
            if wake_r.fileno() in ready:
                self._clear(wake_r)
        return Wake.STOP

    def _drain(self, conn: Connection) -> int:
        """Take every notification received so far, without blocking; how many."""
        received = sum(1 for _ in conn.notifies(timeout=0))
        self.notifications += received
        return received

    @staticmethod
    def _clear(wake_r: socket.socket) -> None:
        try:
            while wake_r.recv(64):
                pass
        except OSError:
            pass  # drained (would block), or closed
