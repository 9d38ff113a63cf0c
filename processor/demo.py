"""`outbox demo`: drive jobs through the pipeline from concurrent writers while the worker runs."""

from __future__ import annotations

import random
import statistics
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field

import sqlalchemy
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

import outbox
from processor import store, subscriptions
from processor.batch import BatchResult
from processor.database import DatabaseUrl, connect
from processor.settings import Settings
from processor.store import QUERIES
from processor.worker import Worker, application_name


@dataclass(frozen=True)
class DemoOptions:
    jobs: int = 200
    min_variants: int = 3
    max_variants: int = 12
    writers: int = 8
    fail_rate: float = 0.05
    seed: int | None = None


@dataclass
class DemoReport:
    jobs: int
    jobs_done: int
    jobs_stuck: int
    updates_written: int
    events_processed: int
    seconds: float
    latencies: list[float] = field(repr=False)
    # A subscription reacting to jobs becoming done or failed (outbox.Subscriber): one reaction per
    # job finished, and the time from the variant update that finished it to the handler's call.
    reactions: int = 0
    reaction_latencies: list[float] = field(default_factory=list, repr=False)

    @property
    def events_per_second(self) -> float:
        return self.events_processed / self.seconds if self.seconds else 0.0

    def summary(self) -> dict[str, float | int]:
        return {
            "jobs": self.jobs,
            "jobs_done": self.jobs_done,
            "jobs_stuck": self.jobs_stuck,
            "variant_updates_written": self.updates_written,
            "events_processed": self.events_processed,
            "seconds": round(self.seconds, 3),
            "events_per_second": round(self.events_per_second, 1),
            **{f"latency_p{q}_ms": round(self.latency_ms(q), 1) for q in (50, 95, 99)},
            "latency_max_ms": round(self.latency_ms(100), 1),
            "reactions": self.reactions,
            **{f"reaction_latency_p{q}_ms": round(self.latency_ms(q, self.reaction_latencies), 1) for q in (50, 99)},
        }

    def latency_ms(self, q: float, latencies: list[float] | None = None) -> float:
        latencies = self.latencies if latencies is None else latencies
        if len(latencies) < 2:
            return 1000 * max(latencies, default=0.0)
        cuts = statistics.quantiles(latencies, n=100, method="inclusive")
        return 1000 * (max(latencies) if q >= 100 else cuts[int(q) - 1])


class _Walk:
    """The transitions one variant goes through: running then done at each step, failing sometimes."""

    def __init__(
        self, job_id: uuid.UUID, variant_id: uuid.UUID, steps: tuple[str, ...], fail_rate: float, rng: random.Random
    ):
        self.job_id = job_id
        self.variant_id = variant_id
        self.moves: deque[tuple[str, str]] = deque()
        for step in steps:
            self.moves.append(("running", step))
            if rng.random() < fail_rate:  # fail, then retried: the job goes back to running
                self.moves.extend([("failed", step), ("running", step)])
            self.moves.append(("done", step))


def run_demo(
    settings: Settings, db: DatabaseUrl, steps: tuple[str, ...], options: DemoOptions, console: Console
) -> DemoReport:
    rng = random.Random(options.seed)
    engine = db.create_engine(pool_size=options.writers + 3, max_overflow=0)
    latencies: list[float] = []
    applied = [0]
    last_write: dict[uuid.UUID, float] = {}  # each job's last variant update, committed at (wall clock)
    reactions: dict[uuid.UUID, float] = {}  # job -> seconds from that update to the handler's call

    def react(_conn: object, transition: outbox.Transition) -> None:
        reactions.setdefault(transition.job_id, time.time() - last_write.get(transition.job_id, time.time()))

    with connect(db, application_name=application_name("demo")) as conn:
        # From now: a demo run again on the same database reacts to its own jobs only.
        try:
            subscriptions.create(conn, "outbox-demo", from_start=False, to_statuses=["done", "failed"])
        except subscriptions.SubscriptionError:
            subscriptions.reset(conn, "outbox-demo", "now")
    subscriber = outbox.Subscriber("outbox-demo", engine, react, poll_interval=0.5)
    subscriber_thread = threading.Thread(target=subscriber.run, name="outbox-subscriber", daemon=True)

    def on_batch(result: BatchResult) -> None:
        applied[0] += result.events
        latencies.extend(result.latencies)

    worker = Worker(settings, db, on_batch=on_batch)
    worker_errors: list[BaseException] = []

    def work() -> None:
        try:
            worker.run()
        except BaseException as exc:
            worker_errors.append(exc)

    worker_thread = threading.Thread(target=work, name="outbox-worker", daemon=True)

    started = time.monotonic()
    worker_thread.start()
    subscriber_thread.start()
    try:
        job_ids, walks = _create_jobs(engine, options, steps, rng)
        pending: deque[_Walk] = deque(walks)
        rng.shuffle(pending)
        total_updates = sum(len(w.moves) for w in walks)
        written = [0]
        lock = threading.Lock()
        writer_errors: list[BaseException] = []

        def writer(index: int) -> None:
            try:
                with engine.connect() as conn:
                    while True:
                        with lock:
                            if not pending:
                                return
                            walk = pending.popleft()
                        status, step = walk.moves.popleft()
                        with conn.begin():
                            # Half the writers use the Python API, half plain SQL (the trigger path).
                            if index % 2:
                                outbox.update_variant(conn, walk.variant_id, status=status, step=step)
                            else:
                                conn.exec_driver_sql(
                                    QUERIES["demo_variant_update"],
                                    {"variant_id": walk.variant_id, "status": status, "step": step},
                                )
                        with lock:
                            last_write[walk.job_id] = time.time()
                            written[0] += 1
                            if walk.moves:
                                pending.append(walk)
            except BaseException as exc:
                writer_errors.append(exc)

        writers = [threading.Thread(target=writer, args=(i,), daemon=True) for i in range(options.writers)]
        for thread in writers:
            thread.start()

        with (
            Progress(
                TextColumn("{task.description:<22}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=console,
                transient=False,
            ) as progress,
            connect(db, application_name=application_name("demo")) as watch,
        ):
            t_updates = progress.add_task("variant updates", total=total_updates)
            t_events = progress.add_task("events applied", total=total_updates + len(walks))
            t_done = progress.add_task("jobs done", total=len(job_ids))
            final = steps[-1]
            deadline: float | None = None
            while True:
                writers_busy = any(t.is_alive() for t in writers)
                # Known before the summary is read, so that the last summary follows the last batch.
                drained = not writers_busy and store.work_pending(watch, settings.partition) == 0
                summary = watch.execute(
                    QUERIES["demo_jobs_summary"], {"final_step": final, "job_ids": job_ids}
                ).fetchone()
                assert summary is not None
                progress.update(t_updates, completed=written[0])
                progress.update(t_events, completed=applied[0])
                progress.update(t_done, completed=summary[0])
                if drained:
                    break
                if not writers_busy:
                    # The worker drains in well under a second here; give up loudly if it does not.
                    deadline = deadline or time.monotonic() + 120
                    if worker_errors:
                        raise worker_errors[0]
                    if time.monotonic() > deadline or not worker_thread.is_alive():
                        raise RuntimeError("the worker did not drain the outbox")
                time.sleep(0.1)  # screen refresh, not synchronisation
            seconds = time.monotonic() - started
            if writer_errors:
                raise writer_errors[0]
            done, stuck, total = summary
            t_reactions = progress.add_task("reactions (done/failed)", total=done)
            deadline = time.monotonic() + 60
            while len(reactions) < done and time.monotonic() < deadline and subscriber_thread.is_alive():
                progress.update(t_reactions, completed=len(reactions))
                time.sleep(0.05)  # screen refresh, not synchronisation
            progress.update(t_reactions, completed=len(reactions))
        return DemoReport(
            total, done, stuck, written[0], applied[0], seconds, latencies, len(reactions), list(reactions.values())
        )
    finally:
        subscriber.stop()
        if subscriber_thread.is_alive():
            subscriber_thread.join(timeout=30)
        worker.stop()
        if worker_thread.is_alive():
            worker_thread.join(timeout=30)
        engine.dispose()


def _create_jobs(
    engine: sqlalchemy.Engine, options: DemoOptions, steps: tuple[str, ...], rng: random.Random
) -> tuple[list[uuid.UUID], list[_Walk]]:
    job_ids: list[uuid.UUID] = []
    walks: list[_Walk] = []
    for _ in range(options.jobs):
        count = rng.randint(options.min_variants, options.max_variants)
        with engine.begin() as conn:  # one transaction per job, as an application would
            job_id, variant_ids = outbox.create_job(conn, variants=count)
        job_ids.append(job_id)
        walks.extend(_Walk(job_id, v, steps, options.fail_rate, rng) for v in variant_ids)
    return job_ids, walks


def render_report(report: DemoReport, console: Console) -> None:
    table = Table(title="outbox demo", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(justify="right")
    table.add_row("jobs", f"{report.jobs}")
    table.add_row("jobs done", f"{report.jobs_done}")
    table.add_row("jobs stuck", f"{report.jobs_stuck}", style="red" if report.jobs_stuck else "green")
    table.add_row("variant updates written", f"{report.updates_written}")
    table.add_row("events processed", f"{report.events_processed}")
    table.add_row("elapsed", f"{report.seconds:.2f} s")
    table.add_row("events/s", f"{report.events_per_second:,.0f}")
    for q in (50, 95, 99):
        table.add_row(f"commit-to-job-state latency p{q}", f"{report.latency_ms(q):.1f} ms")
    table.add_row("commit-to-job-state latency max", f"{report.latency_ms(100):.1f} ms")
    table.add_row("reactions to done/failed", f"{report.reactions}",
                  style="green" if report.reactions == report.jobs_done else "red")  # fmt: skip
    for q in (50, 99):
        table.add_row(f"commit-to-reaction latency p{q}", f"{report.latency_ms(q, report.reaction_latencies):.1f} ms")
    console.print(table)
