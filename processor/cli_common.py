"""What the `outbox` commands share: the common options, logging set-up, stopping on signals."""

from __future__ import annotations

import logging
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Annotated, Any, Protocol

import typer
from rich.console import Console

from processor.database import DatabaseUrl, RedactingFilter
from processor.settings import Settings, load_settings


class Stoppable(Protocol):
    def stop(self) -> None: ...


DatabaseOption = Annotated[
    str | None,
    typer.Option(
        "--database-url",
        envvar="OUTBOX_DATABASE_URL",
        help="postgresql:// URL (or SQLAlchemy's +psycopg, +asyncpg, +psycopg2). Unset: an embedded PostgreSQL in the"
        " user's data directory (the `embedded` extra).",
        show_default=False,
    ),
]
LogLevelOption = Annotated[
    str, typer.Option("--log-level", envvar="OUTBOX_LOG_LEVEL", help="DEBUG, INFO, WARNING or ERROR.")
]
JsonOption = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


def setup(database_url: str | None, log_level: str, **overrides: Any) -> tuple[Settings, DatabaseUrl, Console]:
    level = logging.getLevelName(log_level.upper())
    if not isinstance(level, int):
        raise typer.BadParameter(f"unknown log level {log_level!r}", param_hint="--log-level")
    settings = load_settings(database_url=database_url, **overrides)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    db = settings.database()
    handler.addFilter(RedactingFilter(db))
    console = Console(soft_wrap=True)  # long lines (URLs, trigger notes) stay whole in logs and pipes
    return settings, db, console


@contextmanager
def stop_on_signals(worker: Stoppable) -> Iterator[None]:
    """SIGTERM/SIGINT: finish the batch in hand, then return; a second signal aborts it."""

    requested: list[int] = []

    def stop(signum: int) -> None:
        logging.getLogger("processor").info("%s: stopping after the batch in hand", signal.Signals(signum).name)
        worker.stop()

    def handle(signum: int, _frame: FrameType | None) -> None:
        if requested:
            raise KeyboardInterrupt  # the open transaction rolls back with the connection
        requested.append(signum)
        # Not here: the handler runs on the main thread between two bytecodes, maybe while it holds
        # the lock of the very Event (or logging handler) that stop() would take: a deadlock.
        threading.Thread(target=stop, args=(signum,), name="outbox-stop", daemon=True).start()

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
