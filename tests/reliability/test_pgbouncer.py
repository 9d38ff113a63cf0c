"""Through PgBouncer: refused in transaction pooling, one active consumer in session pooling.

Each test starts its own PgBouncer (config in tmp_path, 127.0.0.1 on a free port, auth_type=any)
in front of the test's database on the session's server. PgBouncer refuses to run as root, so as
root it is started with ``-u postgres`` (it reads its config before switching user and logs to
stderr, which goes to a file opened here). Skipped when pgbouncer is not installed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import outbox
from processor.database import DatabaseUrl, check_direct_session, connect
from processor.errors import ConfigurationError
from tests.fix_database import subprocess_env
from tests.helpers import (
    JOB_WRITES_AUDIT,
    WorkerProcess,
    assert_only_worker_applies,
    consumer_os_pid,
    pending_work,
    wait_for,
)
from tests.reliability.fix_server import server_os_user

PGBOUNCER = shutil.which("pgbouncer") or next(
    (path for path in ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer") if os.access(path, os.X_OK)), None
)

pytestmark = pytest.mark.skipif(
    PGBOUNCER is None, reason="pgbouncer is not installed (apt-get install -y pgbouncer); these tests need it"
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
    except OSError:
        return False
    return True


class PgBouncer:
    """One pgbouncer process in front of one database; stop() at teardown."""

    def __init__(self, target: DatabaseUrl, workdir: Path, pool_mode: str) -> None:
        self.port = _free_port()
        self.log_path = workdir / f"pgbouncer-{pool_mode}.log"
        server = target.connect_kwargs()
        backend = " ".join(
            f"{key}={value}"
            for key, value in {
                "host": server.get("host", "127.0.0.1"),
                "port": server.get("port", 5432),
                "dbname": server["dbname"],
                "user": server.get("user", "postgres"),
                "password": server.get("password"),
            }.items()
            if value is not None
        )
        config = workdir / f"pgbouncer-{pool_mode}.ini"
        config.write_text(
            f"[databases]\n{server['dbname']} = {backend}\n\n"
            "[pgbouncer]\n"
            f"listen_addr = 127.0.0.1\nlisten_port = {self.port}\nunix_socket_dir =\n"
            f"auth_type = any\npool_mode = {pool_mode}\n"
            # Defaults, spelled out: session pooling relies on DISCARD ALL (which releases advisory
            # locks) when a client leaves, so that a standby can take the consumer lock.
            "server_reset_query = DISCARD ALL\n"
            "ignore_startup_parameters = extra_float_digits,options\n",
            encoding="utf-8",
        )
        config.chmod(0o644)
        command = [str(PGBOUNCER)]
        run_as = server_os_user()
        if run_as is not None:
            command += ["-u", run_as]  # "PgBouncer should not run as root"
        command.append(str(config))
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT)
        self.url = DatabaseUrl(target.url.set(host="127.0.0.1", port=self.port, query={}))
        deadline = time.monotonic() + 10
        while not _accepts(self.port):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"pgbouncer did not start: {self.log_path.read_text(errors='replace')}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


@pytest.fixture
def pgbouncer(db: DatabaseUrl, tmp_path: Path) -> Iterator[Callable[[str], PgBouncer]]:
    """Start pgbouncer in a pool mode in front of ``db``; every one started is stopped at teardown."""
    started: list[PgBouncer] = []

    def start(pool_mode: str) -> PgBouncer:
        bouncer = PgBouncer(db, tmp_path, pool_mode)
        started.append(bouncer)
        return bouncer

    yield start
    for bouncer in started:
        bouncer.stop()


class TcpForwarder:
    """A 1:1 TCP forwarder (what docker-proxy or an SSH tunnel does): the session stays the client's."""

    def __init__(self, host: str, port: int) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.target = (host, port)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            source.close()  # each socket is the source of exactly one pump

    def close(self) -> None:
        self.listener.close()


def _addresses(conn: Any) -> tuple[Any, Any]:
    """(the client address the server sees, the client socket's own address): for the printout."""
    seen = conn.execute("SELECT inet_client_addr(), inet_client_port()").fetchone()
    sock = socket.socket(fileno=os.dup(conn.pgconn.socket))  # a dup: closing it leaves libpq's fd open
    try:
        local = sock.getsockname()
    finally:
        sock.close()
    return (str(seen[0]) if seen[0] else None, seen[1]), local or "unix socket"


def test_check_direct_session_passes_direct_connections_and_refuses_pgbouncer(db, pgbouncer):
    figures = []
    with connect(db, application_name="outbox-tests") as conn:
        check_direct_session(conn)  # direct TCP
        real = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        figures.append(("direct TCP", conn.info.backend_pid, real, *_addresses(conn)))

    server = db.connect_kwargs()
    socket_dir = "/var/run/postgresql"
    if server.get("host") in ("127.0.0.1", "localhost") and Path(socket_dir, f".s.PGSQL.{server['port']}").exists():
        with connect(DatabaseUrl(db.url.set(query={"host": socket_dir})), application_name="outbox-tests") as conn:
            assert conn.info.host.startswith("/")
            check_direct_session(conn)  # direct unix socket
            real = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
            figures.append(("direct unix socket", conn.info.backend_pid, real, *_addresses(conn)))

    # Not in autocommit mode: checked, and the connection is left idle as it was.
    with connect(db, application_name="outbox-tests", autocommit=False) as conn:
        check_direct_session(conn)
        assert conn.info.transaction_status == conn.info.transaction_status.IDLE

    # A 1:1 TCP forwarder changes the addresses but not the session: not a pooler, not refused.
    forwarder = TcpForwarder(str(server.get("host", "127.0.0.1")), int(server.get("port", 5432)))
    try:
        with connect(DatabaseUrl(db.url.set(host="127.0.0.1", port=forwarder.port)), application_name="t") as conn:
            check_direct_session(conn)
            seen, local = _addresses(conn)
            assert seen[1] != local[1]  # why the address comparison is not used to refuse
            real = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
            figures.append(("1:1 TCP forwarder", conn.info.backend_pid, real, seen, local))
    finally:
        forwarder.close()

    for mode in ("transaction", "session"):
        bouncer = pgbouncer(mode)
        with connect(bouncer.url, application_name="outbox-tests") as conn:
            real = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
            figures.append((f"pgbouncer {mode}", conn.info.backend_pid, real, *_addresses(conn)))
            with pytest.raises(ConfigurationError) as refused:
                check_direct_session(conn)
        message = str(refused.value)
        assert "\n" not in message
        assert "pooler" in message and "transaction pooling" in message
        assert "OUTBOX_ALLOW_SESSION_PROXY=1" in message

    print(f"\n{'connection':<20} {'announced pid':>13} {'real pid':>10}  server sees client / client socket")
    for name, announced, real, seen, local in figures:
        print(f"{name:<20} {announced:>13} {real:>10}  {seen} / {local}")
    print(f"refusal: {message}")


def test_the_worker_refuses_to_start_through_transaction_pooling(db, pgbouncer, tmp_path):
    bouncer = pgbouncer("transaction")
    engine = db.create_engine()
    try:
        with engine.begin() as conn:
            _, variants = outbox.create_job(conn, variants=2)
            outbox.update_variant(conn, variants[0], status="running", step="ingest")
    finally:
        engine.dispose()
    with connect(db, application_name="observer") as conn:
        before = pending_work(conn)
        assert before > 0

        started = time.monotonic()
        result = subprocess.run(
            [sys.executable, "-m", "processor.cli", "run", "--until-idle"],
            env=subprocess_env(bouncer.url),
            capture_output=True,
            text=True,
            timeout=60,
        )
        elapsed = time.monotonic() - started
        output = result.stdout + result.stderr
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]

        assert result.returncode == 1, output
        assert len(errors) == 1, output
        assert "pool" in errors[0], output
        assert "Traceback" not in output
        assert pending_work(conn) == before  # nothing applied
        print(f"\nrefused in {elapsed:.2f} s, exit {result.returncode}: {errors[0]}")


def test_session_pooling_with_the_opt_in_keeps_one_active_consumer(db, engine, pgbouncer, tmp_path):
    bouncer = pgbouncer("session")
    env = subprocess_env(bouncer.url, OUTBOX_ALLOW_SESSION_PROXY="1", OUTBOX_STANDBY_INTERVAL="0.1")
    with connect(db, application_name="observer") as conn:
        conn.execute(JOB_WRITES_AUDIT)
        first = WorkerProcess(env, tmp_path / "first.log")
        second = None
        try:
            wait_for(lambda: consumer_os_pid(conn) == first.pid, what="the first worker to take the lock")
            applied_first = assert_only_worker_applies(conn, engine, first, done_jobs=20)

            second = WorkerProcess(env, tmp_path / "second.log")
            wait_for(lambda: "standby" in second.output(), what="the second worker to stand by")
            assert_only_worker_applies(conn, engine, first, done_jobs=40)
            assert consumer_os_pid(conn) == first.pid

            first.signal(signal.SIGKILL)
            killed_at = time.monotonic()
            first.wait()
            # PgBouncer resets the server connection with DISCARD ALL, which releases the lock.
            wait_for(lambda: consumer_os_pid(conn) == second.pid, what="the standby to take over")
            takeover = time.monotonic() - killed_at
            applied_second = assert_only_worker_applies(conn, engine, second, done_jobs=60)

            print(
                f"\nthrough pgbouncer (session): 20 jobs applied in {applied_first:.2f} s by the first worker,"
                f" standby took over {takeover:.2f} s after SIGKILL, then 20 jobs in {applied_second:.2f} s"
            )
        except BaseException:
            for worker in (first, second):
                if worker is not None:
                    print(f"\n--- {worker.log_path.name}\n{worker.output()[-3000:]}")
            print(f"\n--- pgbouncer\n{bouncer.log_path.read_text(errors='replace')[-3000:]}")
            raise
        finally:
            first.kill()
            if second is not None:
                second.signal(signal.SIGTERM)
                assert second.wait(timeout=30) == 0
