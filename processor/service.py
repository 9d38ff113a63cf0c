"""The worker inside an application's own process: ``processor.WorkerService``.

>>> service = processor.WorkerService(database_url="postgresql://app:secret@db/app", batch_size=1000)
>>> with service:                    # runs in a thread of its own; leaving the block stops it
...     serve_requests(health=service.health)
>>> await service.run_async()        # asyncio: the same thread, awaited; cancel the task to stop it

It runs the same ``processor.worker.Worker`` as `outbox run`, so standby, partition sharing and
takeover work alike in any mix of services and `outbox run` processes (docs/design.md: "Scaling out").
Stopping it (leaving the block, ``stop()``, cancelling the task) finishes the batch in hand, which
commits or rolls back as a whole, releases its partitions and closes its connection.

Settings are keyword arguments named as the fields of ``processor.settings.Settings``
(``database_url``, ``batch_size``, ``partition``, ``partitions``, ``pipeline_steps``,
``failure_policy``, ...), each falling back to its ``OUTBOX_*`` variable. The database URL is
required: an application's worker never starts the embedded server. It installs no signal handler
and configures no logging (the application owns both); its log lines and its health never carry
the password. `outbox run` runs on this class too, so /metrics and /health are served the same way.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import asdict, dataclass
from enum import StrEnum
from types import TracebackType
from typing import Any
from wsgiref.simple_server import WSGIServer

import psycopg

from outbox.errors import ArgumentTypeError, LifecycleError
from processor.background import Background, StartsInBackground
from processor.database import DatabaseUrl, redact
from processor.errors import ConfigurationError, OutboxError
from processor.metrics import WorkerMetrics, serve
from processor.settings import Settings, load_settings
from processor.worker import Worker, WorkerStats

log = logging.getLogger(__name__)

NO_DATABASE = (
    "no database URL: pass WorkerService(database_url=...) or set OUTBOX_DATABASE_URL "
    "(a worker inside an application never starts the embedded server)"
)
# Settings a service does not take: it never starts the embedded server.
_NOT_FOR_A_SERVICE = frozenset({"embedded_data_dir"})


class WorkerState(StrEnum):
    """Where a ``WorkerService`` is in its life."""

    NEW = "new"  # created, not started
    STARTING = "starting"  # connecting for the first time: checking the schema, claiming partitions
    CONNECTING = "connecting"  # without a session (lost, or refused at start): reconnecting with backoff
    STANDBY = "standby"  # connected, holding no partition: other workers hold them all
    ACTIVE = "active"  # connected, consuming the partitions it holds
    STOPPING = "stopping"  # asked to stop: finishing the batch in hand
    STOPPED = "stopped"  # returned: its partitions released, its connection closed
    FAILED = "failed"  # died of an error (``last_error``; re-raised by join, `with` and run_async)


@dataclass(frozen=True, slots=True)
class WorkerHealth:
    """A snapshot of a ``WorkerService``, taken by ``health()`` (safe from any thread)."""

    state: WorkerState
    connected: bool  # a session to the database is up
    partitions: tuple[int, ...]  # held, start-up checks done (empty: a standby)
    schema_problems: tuple[str, ...]  # found at the last check: a product trigger missing, a legacy writer
    problems: tuple[str, ...]  # what /health answers 503 with, one per line; empty: healthy
    events: int  # events applied by this worker
    batches: int  # batches committed
    jobs_changed: int  # job states it changed
    dead_letters: int  # events it parked as dead letters
    last_error: str | None  # why it last lost its session, or what it failed on (password removed)

    @property
    def ok(self) -> bool:
        """Healthy: /health answers 200. The one rule for both: nothing in ``problems``."""
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        """A JSON object (for an application's own health endpoint): plain strings, lists and numbers."""
        data = asdict(self)
        data.update(state=self.state.value, ok=self.ok)
        data.update((name, list(data[name])) for name in ("partitions", "schema_problems", "problems"))
        return data


class WorkerService(StartsInBackground):
    """The outbox worker, run by an application: in a thread (``with``, ``start``), in the calling
    thread (``run``) or awaited (``run_async``, ``async with``); one run per service."""

    def __init__(self, *, metrics_port: int | None = None, **settings: Any) -> None:
        """Settings as keywords (``processor.settings.Settings``'s fields), else from ``OUTBOX_*``.

        ``metrics_port``: also serve Prometheus /metrics and /health on this port while running, as
        `outbox run --metrics-port` does (0: a free port, see ``metrics_port``). Only when given here:
        the application owns its ports, so OUTBOX_METRICS_PORT is not read.
        """
        unknown = sorted(set(settings) - (set(Settings.model_fields) - _NOT_FOR_A_SERVICE))
        if unknown:
            raise ArgumentTypeError(
                f"WorkerService() got unknown settings: {', '.join(unknown)} (see processor.settings)"
            )
        loaded = load_settings(as_keywords=True, **settings)
        if loaded.database_url is None:
            raise ConfigurationError(NO_DATABASE)
        self._setup(loaded, loaded.database(), metrics_port)

    @classmethod
    def from_settings(cls, settings: Settings, db: DatabaseUrl, *, metrics_port: int | None = None) -> WorkerService:
        """A service for settings already loaded and a database already resolved (`outbox run`, whose
        database may be the embedded server)."""
        service = cls.__new__(cls)
        service._setup(settings, db, metrics_port)
        return service

    def _setup(self, settings: Settings, db: DatabaseUrl, metrics_port: int | None) -> None:
        if metrics_port is not None and not 0 <= metrics_port <= 65535:
            raise ConfigurationError(f"metrics_port {metrics_port} is out of range (0 to 65535)")
        self.settings = settings
        self._db = db
        self._metrics = WorkerMetrics() if metrics_port is not None else None
        self._port = metrics_port
        self._worker = Worker(settings, db, metrics=self._metrics)
        self._server: WSGIServer | None = None
        self._refresh_stop = threading.Event()
        self._lock = threading.Lock()  # one run per service
        self._started = False
        self._ended = False
        self._error: str | None = None  # what it died of, one line, password removed
        self._background: Background | None = None

    # ----- running

    def run(self, *, until_idle: bool = False) -> WorkerStats:
        """Run the worker in the calling thread until ``stop()`` (with ``until_idle``: until nothing more
        can be processed now); raise what it died of. A lost database is reconnected to, never raised."""
        self._begin()
        return self._run(until_idle)

    def start(self, *, until_idle: bool = False) -> None:
        """Run the worker in a background thread; ``stop()``, then ``join()`` (or use ``with``)."""
        self._begin()
        self._background = Background(
            lambda: self._run(until_idle), name="outbox-worker", on_error=lambda _exc: self._log_failure()
        )
        self._background.start()

    def stop(self) -> None:
        """Ask the worker to finish the batch in hand, release its partitions and return.

        From any thread; from a signal handler only while the worker runs in another thread (``start``,
        ``with``, ``run_async``): see processor.cli_common.stop_on_signals for ``run``.
        """
        self._worker.stop()

    def join(self, timeout: float | None = None) -> WorkerStats:
        """Wait for the background thread to end; re-raise the error the worker died of.

        TimeoutError if it still runs after ``timeout`` seconds (then it goes on running).
        """
        if self._background is None:
            raise LifecycleError("this WorkerService was not started in the background (start, with, run_async)")
        self._background.join(timeout)
        return self._worker.stats

    async def run_async(self, *, until_idle: bool = False) -> WorkerStats:
        """Run the worker in a thread of its own and await its end; raise what it died of.

        Cancelling the task asks the worker to stop, waits until it has (the batch in hand committed
        or rolled back, its partitions released, its connection closed), then raises CancelledError.
        """
        self.start(until_idle=until_idle)
        background = self._background
        assert background is not None
        try:
            await background.wait()
        except asyncio.CancelledError:
            self.stop()
            await background.outlast()
            raise
        background.raise_error()
        return self._worker.stats

    async def __aenter__(self) -> WorkerService:
        self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
        background = self._background
        assert background is not None
        cancelled = await background.outlast()  # the loop stays free meanwhile
        if cancelled and exc is None:
            raise asyncio.CancelledError
        if exc is None:
            background.raise_error()

    def _begin(self) -> None:
        with self._lock:
            if self._started:
                raise LifecycleError("this WorkerService has already been started; create another")
            self._open_metrics()
            self._started = True

    def _run(self, until_idle: bool) -> WorkerStats:
        try:
            return self._worker.run(until_idle=until_idle)
        except BaseException as exc:
            self._error = self._describe(exc)
            raise
        finally:
            self._ended = True
            self._close_metrics()

    def _describe(self, exc: BaseException) -> str:
        text = str(exc).strip()
        line = text.splitlines()[0] if text else ""
        if isinstance(exc, psycopg.Error):  # named as the driver's (DatabaseUnavailableError: OperationalError)
            name = next(c for c in type(exc).__mro__ if c.__module__.startswith("psycopg")).__name__
            line = f"{name}: {line}" if line else name
        elif not isinstance(exc, OutboxError):  # the product's errors are written to be read alone
            line = f"{type(exc).__name__}: {line}" if line else type(exc).__name__
        return redact(line, self._db)

    def _log_failure(self) -> None:
        log.error("the outbox worker stopped on an error: %s", self._error)

    # ----- health

    def health(self) -> WorkerHealth:
        """A snapshot of the worker now (any thread)."""
        worker = self._worker
        state = self._state()
        if state is WorkerState.NEW:
            problems: tuple[str, ...] = ("the worker is not started",)
        elif state is WorkerState.STOPPED:
            problems = ("the worker is stopped",)
        elif state is WorkerState.FAILED:
            problems = (f"the worker failed: {self._error}",)
        else:
            problems = tuple(worker.health_problems())
        stats = worker.stats
        return WorkerHealth(
            state=state,
            connected=worker.connected.is_set(),
            partitions=worker.partitions,
            schema_problems=tuple(worker.schema_problems),
            problems=problems,
            events=stats.events,
            batches=stats.batches,
            jobs_changed=stats.jobs_changed,
            dead_letters=stats.dead_letters,
            last_error=self._error or worker.last_error,
        )

    def _state(self) -> WorkerState:
        worker = self._worker
        if self._error is not None:
            return WorkerState.FAILED
        if self._ended:
            return WorkerState.STOPPED
        if not self._started:
            return WorkerState.NEW
        if worker.stopping:
            return WorkerState.STOPPING
        if worker.ready.is_set():
            return WorkerState.ACTIVE if worker.partitions else WorkerState.STANDBY
        return WorkerState.CONNECTING if worker.sessions or worker.last_error else WorkerState.STARTING

    @property
    def metrics_port(self) -> int | None:
        """The port /metrics and /health are served on (the one bound, for ``metrics_port=0``); None: none now."""
        if self._ended:
            return None
        server = self._server
        return int(server.server_port) if server is not None else self._port

    @property
    def worker(self) -> Worker:
        """The ``processor.worker.Worker`` underneath (`outbox run`'s statistics, tests); not a stable interface."""
        return self._worker

    def __repr__(self) -> str:
        return f"<WorkerService {self._db.redacted()} {self._state()}>"

    # ----- /metrics and /health

    def _open_metrics(self) -> None:
        if self._metrics is None or self._port is None:
            return
        try:
            self._server = serve(self._metrics, self._port, health=self.health)
        except OSError as exc:
            raise OutboxError(f"cannot serve metrics on port {self._port}: {exc.strerror}") from None
        threading.Thread(
            target=self._metrics.refresh_from_database,
            args=(self._db, self._refresh_stop),
            name="outbox-metrics-refresh",
            daemon=True,
        ).start()

    def _close_metrics(self) -> None:
        self._refresh_stop.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


__all__ = ["WorkerHealth", "WorkerService", "WorkerState"]
