"""A PostgreSQL server owned by one test, which the test may stop, start and crash at will.

Built from PostgreSQL binaries (initdb, pg_ctl): OUTBOX_TEST_PG_BINDIR, else the system's
PostgreSQL 15 when the tests run against a server of their own (OUTBOX_TEST_DATABASE_URL), else
the ones the embedded server ships (pgserver), so that a machine with nothing but Python has them
too. Tests run as root in CI and postgres refuses to run as root, so the binaries then run as the
``postgres`` OS user (runuser), or as the ``pgserver`` one the embedded server creates. The server
listens on 127.0.0.1 on a free port with password authentication (scram-sha-256) for the superuser
``outbox_admin``, whose password holds the characters a URL must encode (@#:/). Without a test
database, the whole session runs on such a server (tests/fix_database.py), so that the tests that
need TCP (a proxy, PgBouncer) and matching client tools (pg_dump) work there too.
Register with ``-p tests.reliability.fix_server`` (or ``pytest_plugins``).
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

import pytest

from processor.database import DatabaseUrl

SYSTEM_BINDIR = Path("/usr/lib/postgresql/15/bin")


def bundled_bindir() -> Path:
    """The binaries the embedded server (pgserver) ships."""
    from pgserver._commands import POSTGRES_BIN_PATH  # type: ignore[import-not-found]

    return Path(POSTGRES_BIN_PATH)


def pg_bindir() -> Path:
    """Where the test servers' binaries come from (see the module's docstring)."""
    explicit = os.environ.get("OUTBOX_TEST_PG_BINDIR")
    if explicit:
        return Path(explicit)
    if os.environ.get("OUTBOX_TEST_DATABASE_URL") and (SYSTEM_BINDIR / "postgres").is_file():
        return SYSTEM_BINDIR
    return bundled_bindir()


def server_os_user() -> str | None:
    """The OS user a test server runs as: None (this one) unless running as root."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "pgserver"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    from pgserver.utils import ensure_user_exists  # type: ignore[import-not-found]

    ensure_user_exists("pgserver")  # as the embedded server itself does
    return "pgserver"


PG_BINDIR = pg_bindir()
ADMIN_ROLE = "outbox_admin"
_PG_CTL_TIMEOUT = 60  # seconds; pg_ctl -w itself waits up to this for start or stop


def make_password(tag: str = "") -> str:
    """A password with every character that must be URL-encoded, around a token found nowhere else.

    Searching output for the token finds the password in any encoding (raw, %-encoded, +-encoded).
    """
    return f"p@ss#{tag}{secrets.token_hex(8)}:w/rd"


def password_forms(password: str) -> set[str]:
    """The password as it could leak: raw, URL-encoded both ways, and its unique core."""
    from urllib.parse import quote_plus

    core = password.split("#", 1)[1].split(":", 1)[0]
    return {password, quote(password, safe=""), quote(password), quote_plus(password), core}


def url_with_password(port: int, password: str, database: str = "postgres") -> DatabaseUrl:
    return DatabaseUrl.parse(f"postgresql://{ADMIN_ROLE}:{quote(password, safe='')}@127.0.0.1:{port}/{database}")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class OwnedServer:
    """A private PostgreSQL cluster in a temporary folder; ``url`` connects as ``outbox_admin``."""

    def __init__(
        self,
        base: Path,
        *,
        run_as: str | None,
        bindir: Path | None = None,
        host_auth: str = "scram-sha-256",
        max_connections: int = 50,
    ) -> None:
        self.base = base
        self.host_auth = host_auth
        self.max_connections = max_connections
        self.bindir = bindir or PG_BINDIR
        self.data_dir = base / "data"
        self.log_path = base / "postgres.log"
        self.port = _free_port()
        self.password = make_password()
        self.url = url_with_password(self.port, self.password)
        assert self.url.password == self.password, "the URL must decode back to the password"
        self._run_as = run_as
        self.restarts = 0

    # Commands run as the server's OS user, from a folder it can read.
    def _run(self, *args: str, timeout: float = _PG_CTL_TIMEOUT) -> subprocess.CompletedProcess[str]:
        command = [str(self.bindir / args[0]), *args[1:]]
        if self._run_as is not None:
            command = ["runuser", "-u", self._run_as, "--", *command]
        result = subprocess.run(command, cwd=self.base, capture_output=True, text=True, timeout=timeout, check=False)
        if result.returncode != 0:
            raise RuntimeError(
                f"{args[0]} {' '.join(args[1:2])} failed ({result.returncode}): "
                f"{result.stderr.strip() or result.stdout.strip()}\n{self.log_tail()}"
            )
        return result

    def init(self) -> None:
        pwfile = self.base / "pwfile"
        pwfile.write_text(self.password + "\n", encoding="utf-8")
        self._own(pwfile)
        pwfile.chmod(0o600)
        try:
            self._run(
                "initdb", "-D", str(self.data_dir), "-U", ADMIN_ROLE, f"--pwfile={pwfile}",
                "--auth-local=trust", f"--auth-host={self.host_auth}", "-E", "UTF8", "--locale=C", "--no-sync",
            )  # fmt: skip
        finally:
            pwfile.unlink()
        with (self.data_dir / "postgresql.conf").open("a", encoding="utf-8") as conf:
            conf.write(
                f"\nlisten_addresses = '127.0.0.1'\nport = {self.port}\n"
                f"unix_socket_directories = '{self.data_dir}'\npassword_encryption = 'scram-sha-256'\n"
                f"max_connections = {self.max_connections}\nlogging_collector = off\n"
            )
        # Unix sockets (only the server's OS user can reach them) trust; TCP needs the password.
        (self.data_dir / "pg_hba.conf").write_text(
            f"local all all trust\nhost all all 127.0.0.1/32 {self.host_auth}\n", encoding="utf-8"
        )

    def _own(self, path: Path) -> None:
        if self._run_as is not None:
            entry = pwd.getpwnam(self._run_as)
            os.chown(path, entry.pw_uid, entry.pw_gid)

    def start(self) -> float:
        """Start and wait until it accepts connections; returns that moment (time.monotonic())."""
        self._run("pg_ctl", "start", "-D", str(self.data_dir), "-l", str(self.log_path), "-w", "-t", "60")
        return time.monotonic()

    def first_start(self, attempts: int = 3) -> None:
        """Start for the first time; if another process took the free port meanwhile, take another."""
        for attempt in range(attempts):
            try:
                self.start()
                return
            except RuntimeError as exc:
                if "could not bind" not in str(exc) or attempt == attempts - 1:
                    raise
            self.port = _free_port()
            self.url = url_with_password(self.port, self.password)
            with (self.data_dir / "postgresql.conf").open("a", encoding="utf-8") as conf:
                conf.write(f"port = {self.port}\n")  # the last setting wins

    def stop(self, mode: str = "fast") -> None:
        """Stop the server: ``fast`` (clean), or ``immediate`` (a crash: recovery at the next start)."""
        self._run("pg_ctl", "stop", "-D", str(self.data_dir), "-m", mode, "-w", "-t", "60")

    def restart(self, mode: str = "immediate") -> float:
        """Stop in ``mode`` and start again; returns when it accepts connections (time.monotonic())."""
        self.stop(mode)
        back = self.start()
        self.restarts += 1
        return back

    @property
    def running(self) -> bool:
        command = [str(self.bindir / "pg_ctl"), "status", "-D", str(self.data_dir)]
        if self._run_as is not None:
            command = ["runuser", "-u", self._run_as, "--", *command]
        return subprocess.run(command, cwd=self.base, capture_output=True, check=False).returncode == 0

    def log_tail(self, lines: int = 20) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])


def skip_reason(bindir: Path | None = None) -> str | None:
    bindir = bindir or PG_BINDIR
    for binary in ("initdb", "pg_ctl", "postgres"):
        if not (bindir / binary).is_file():
            return f"PostgreSQL binaries not found: {bindir / binary} is missing"
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        return "running as root and runuser is missing (postgres refuses to run as root)"
    return None


@contextmanager
def running_server(
    bindir: Path | None = None, *, host_auth: str = "scram-sha-256", max_connections: int = 50
) -> Iterator[OwnedServer]:
    """A running PostgreSQL server in a temporary folder; stopped and removed on the way out.

    ``host_auth``: how TCP connections from 127.0.0.1 authenticate (``trust``, as a local server
    set up for tests does, lets the tests' own roles log in without a password).
    """
    run_as = server_os_user()
    # Under /tmp: the server's OS user must be able to reach it (pytest's tmp_path is root-only).
    base = Path(tempfile.mkdtemp(prefix="outbox-own-pg-", dir="/tmp" if run_as else None))
    if run_as:
        base.chmod(0o755)
    server = OwnedServer(base, run_as=run_as, bindir=bindir, host_auth=host_auth, max_connections=max_connections)
    try:
        server._own(base)  # the data folder and the log belong to the server's OS user
        server.init()
        server.first_start()
        yield server
    finally:
        try:
            if server.data_dir.exists() and server.running:
                server.stop("immediate")  # nothing to keep: crash-stop is the fastest
        finally:
            shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def own_server() -> Iterator[OwnedServer]:
    """A running PostgreSQL server for this test alone; stopped and removed at teardown."""
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    with running_server() as server:
        yield server
