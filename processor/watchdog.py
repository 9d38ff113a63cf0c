"""Cut a connection whose call has been blocked too long: a half-open network never errors by itself.

TCP keepalives and tcp_user_timeout catch a dead peer, and statement_timeout a slow query, but a
middlebox that keeps the TCP connection up while forwarding nothing leaves a call waiting forever.
The watchdog shuts the socket down after a deadline, so the call fails, and the worker reconnects.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg

log = logging.getLogger(__name__)


class CallWatchdog:
    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self._lock = threading.Lock()
        self._conn: psycopg.Connection[Any] | None = None
        self._since = 0.0
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="outbox-watchdog", daemon=True)
        self._thread.start()

    @contextmanager
    def guard(self, conn: psycopg.Connection[Any]) -> Iterator[None]:
        """Watch the calls made on ``conn`` inside this block."""
        with self._lock:
            self._conn, self._since = conn, time.monotonic()
        try:
            yield
        finally:
            with self._lock:
                self._conn = None

    def stop(self) -> None:
        self._stopped.set()

    def _watch(self) -> None:
        while not self._stopped.wait(min(0.5, self.deadline / 4)):
            with self._lock:
                if self._conn is not None and time.monotonic() - self._since > self.deadline:
                    log.warning("no answer from the database for %.0f s; dropping the connection", self.deadline)
                    _shut_down(self._conn)
                    self._conn = None


def _shut_down(conn: psycopg.Connection[Any]) -> None:
    try:
        fd = os.dup(conn.pgconn.socket)  # a duplicate: psycopg still owns (and closes) the original
    except (psycopg.Error, OSError):
        return  # already closed
    sock = socket.socket(fileno=fd)
    try:
        sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked call with an error
    except OSError:
        pass
    finally:
        sock.close()
