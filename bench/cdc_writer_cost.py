"""What capture by logical decoding would cost the writers: a measurement for a design decision.

Not a product path. Capture by a PL/pgSQL trigger cannot reach the writer-ratio target on the
2-core bench host (bench/HISTORY.md, "Writer path"); logical decoding is the alternative that writes
no second row in the writer's transaction. This measures, on a scratch cluster of its own, the
writers of bench/run.py's writers group (4 threads, single-variant updates, interleaved windows):

- ``none`` and ``trigger`` with ``wal_level = replica`` (the writers group's own two modes);
- the same with ``wal_level = logical`` (what the setting alone costs);
- with ``wal_level = logical``, no capture trigger, and a logical slot (``test_decoding``) drained
  continuously by one connection on the same machine (what decoding costs when it keeps up on the
  writers' cores; the processor's own work on the changes, as the worker's in the trigger design,
  is not included).

    python bench/cdc_writer_cost.py [PG_BINDIR]     # default /usr/lib/postgresql/15/bin

Needs the PostgreSQL server binaries (Debian: postgresql-15); runs the server as the postgres user
when started as root. About 6 minutes. Prints each round and the medians.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import run as bench  # bench/run.py, beside this file

from processor.database import DatabaseUrl, connect

PORT = 54992
ROUNDS = 3
WINDOW = 10.0  # seconds per mode and round, in 3 interleaved slices
SLOT = "outbox_cdc_bench"


class Cluster:
    """A scratch cluster in a temporary folder, started with a given wal_level."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.folder = Path(tempfile.mkdtemp(prefix="outbox-cdc-bench."))
        self.as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.as_postgres:
            shutil.chown(self.folder, "postgres")
        self._run("initdb", "-D", str(self.folder / "data"), "-A", "trust", "-U", "postgres")
        self.admin = DatabaseUrl.parse(f"postgresql://postgres@127.0.0.1:{PORT}/postgres")

    def _run(self, program: str, *args: str) -> None:
        subprocess.run([*self.as_postgres, str(self.bindir / program), *args], check=True, capture_output=True)

    @contextmanager
    def running(self, wal_level: str) -> Iterator[DatabaseUrl]:
        options = (
            f"-p {PORT} -k {self.folder} -c listen_addresses=127.0.0.1 -c wal_level={wal_level} "
            "-c max_replication_slots=4 -c shared_buffers=128MB -c max_wal_size=1GB"
        )
        data = str(self.folder / "data")
        self._run("pg_ctl", "-D", data, "-o", options, "-l", str(self.folder / "log"), "-w", "start")
        try:
            yield self.admin
        finally:
            self._run("pg_ctl", "-D", data, "-w", "stop", "-m", "fast")

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


@contextmanager
def draining_slot(db: DatabaseUrl) -> Iterator[None]:
    """A logical slot on ``db``, read continuously by one connection until the block ends."""
    stop = threading.Event()

    def drain() -> None:
        with connect(db, application_name="outbox-cdc-bench-decoder") as conn:
            while not stop.is_set():
                changes = conn.execute(
                    "SELECT count(*) FROM pg_logical_slot_get_changes(%s, NULL, 20000)", [SLOT]
                ).fetchone()
                if changes is None or changes[0] == 0:
                    stop.wait(0.01)  # idle poll of the slot

    with connect(db, application_name="outbox-cdc-bench") as conn:
        conn.execute("SELECT pg_create_logical_replication_slot(%s, 'test_decoding')", [SLOT])
    thread = threading.Thread(target=drain, name="decoder")
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        with connect(db, application_name="outbox-cdc-bench") as conn:
            conn.execute("SELECT pg_drop_replication_slot(%s)", [SLOT])


def tx_per_second(writers: bench.Writers, mode: str) -> float:
    window = bench.Window()
    for _ in range(3):
        window += writers.window(mode, WINDOW / 3)
    return float(window.figures()["tx_per_second"] or 0)


def measure(bindir: Path) -> dict[str, list[float]]:
    cluster = Cluster(bindir)
    rates: dict[str, list[float]] = {}
    try:
        for wal_level in ("replica", "logical", "replica", "logical"):  # alternated: drift weighs on both
            with cluster.running(wal_level) as admin, bench.writer_database(admin) as (db, variants):
                writers = bench.Writers(db, variants)
                try:
                    for mode in ("none", "trigger"):
                        writers.window(mode, 3.0)  # warm-up
                    for number in range(ROUNDS):
                        measured = {f"{wal_level}, {m}": tx_per_second(writers, m) for m in ("none", "trigger")}
                        if wal_level == "logical":
                            with draining_slot(db):
                                measured["logical, no trigger, slot decoded meanwhile"] = tx_per_second(writers, "none")
                        for key, value in measured.items():
                            rates.setdefault(key, []).append(value)
                        print(f"round {number + 1}: " + ", ".join(f"{k} {v:,.0f} tx/s" for k, v in measured.items()))
                finally:
                    writers.close()
    finally:
        cluster.remove()
    return rates


def main() -> int:
    bindir = Path(sys.argv[1] if len(sys.argv) > 1 else "/usr/lib/postgresql/15/bin")
    rates = measure(bindir)
    baseline = statistics.median(rates["replica, none"])
    print(f"machine: {os.cpu_count()} cores; command: python bench/cdc_writer_cost.py {bindir}")
    for key, values in rates.items():
        median = statistics.median(values)
        print(f"{key}: {median:,.0f} tx/s (median of {len(values)}), {median / baseline:.3f} of replica, none")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
