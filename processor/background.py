"""A blocking loop in a thread of its own: the `with` forms of ``WorkerService`` and ``outbox.Subscriber``.

The thread keeps the error it died of and ``join`` re-raises it in the caller; asyncio code awaits
its end without blocking its loop (a future the thread resolves when it ends). Stopping the loop is
its owner's business (``stop()``): this module only runs it and waits for it.

The thread is a daemon: an application that exits without stopping it loses only the batch (or
transition) in hand, which rolls back with its connection, as after a crash.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Any, Self

from outbox.errors import StillRunningError


class Background:
    """One run of ``target`` in a daemon thread named ``name``; ``on_error`` sees the error it dies of."""

    def __init__(
        self, target: Callable[[], object], *, name: str, on_error: Callable[[BaseException], None] | None = None
    ) -> None:
        self._target = target
        self._on_error = on_error
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._ended = threading.Event()
        self._lock = threading.Lock()  # orders "ended" against the callbacks of asyncio waiters
        self._callbacks: list[Callable[[], None]] = []
        self.error: BaseException | None = None

    def start(self) -> None:
        self._thread.start()

    @property
    def ended(self) -> bool:
        return self._ended.is_set()

    def join(self, timeout: float | None = None) -> None:
        """Wait for the thread to end; re-raise the error it died of. TimeoutError if it is still running."""
        if not self._ended.wait(timeout):
            raise StillRunningError(f"{self._thread.name} still running after {timeout:g} s")
        self._thread.join()  # it ends right after: only the callbacks are left
        self.raise_error()

    def raise_error(self) -> None:
        if self.error is not None:
            raise self.error

    async def wait(self) -> None:
        """Until the thread ends (the loop stays free). Cancelling this wait leaves the thread running."""
        loop = asyncio.get_running_loop()
        ended: asyncio.Future[None] = loop.create_future()

        def resolve() -> None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
                loop.call_soon_threadsafe(_set_done, ended)

        with self._lock:
            if self._ended.is_set():
                return
            self._callbacks.append(resolve)
        await ended

    async def outlast(self) -> bool:
        """Until the thread ends, whatever cancels this task meanwhile; whether anything tried to."""
        cancelled = False
        while not self._ended.is_set():
            try:
                await self.wait()
            except asyncio.CancelledError:
                cancelled = True
        return cancelled

    def _main(self) -> None:
        try:
            self._target()
        except BaseException as exc:
            self.error = exc
            if self._on_error is not None:
                self._on_error(exc)
        finally:
            with self._lock:
                self._ended.set()
                callbacks, self._callbacks = self._callbacks, []
            for callback in callbacks:
                callback()


class StartsInBackground:
    """The ``with`` form of a loop that ``start()``s in the background: leaving the block stops it
    (``stop()``: the work in hand is finished or rolled back) and joins it, re-raising what it died
    of; when the block itself raised, that error goes on (the loop's was logged, and is in health())."""

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def join(self, timeout: float | None = None) -> Any:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
        if exc is None:
            self.join()
        else:
            with contextlib.suppress(Exception):
                self.join()


def _set_done(future: asyncio.Future[None]) -> None:
    if not future.done():  # cancelled by its waiter meanwhile
        future.set_result(None)
