"""Database URLs (parsing, redaction) and the processor's connections."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, quote_plus, unquote

import psycopg
from sqlalchemy import Engine, create_engine
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from processor.errors import ConfigurationError, DatabaseUnavailableError
from processor.store.session import backend_pid

# The schemes of a PostgreSQL URL an application may already have (SQLAlchemy's, with its driver).
# The product opens its own connections with psycopg whatever the URL names: only the server, the
# credentials and the libpq parameters are read from it.
_ACCEPTED_DRIVERS = {
    "postgresql",
    "postgres",
    "postgresql+psycopg",
    "postgresql+psycopg_async",
    "postgresql+psycopg2",
    "postgresql+psycopg2cffi",
    "postgresql+asyncpg",
    "postgresql+pg8000",
}
# Parameters of the application's driver, not libpq's: they tune that driver only, and are left out.
_DRIVER_ONLY_PARAMETERS = {
    "prepared_statement_cache_size",  # asyncpg (SQLAlchemy's dialect)
    "statement_cache_size",
    "max_cached_statement_lifetime",
    "max_cacheable_statement_size",
    "command_timeout",
    "async_fallback",
}
# asyncpg's ?ssl= is libpq's sslmode (same values, and true/false).
_ASYNCPG_SSL = {"true": "require", "false": "disable"}
_LIBPQ_PARAMETERS = frozenset(option.keyword.decode() for option in psycopg.pq.Conninfo.get_defaults())

# TCP keepalives detect a dead server or network within about 30 s, even while the worker waits;
# tcp_user_timeout drops a connection whose sent data stays unacknowledged for 30 s.
_KEEPALIVES: dict[str, Any] = {
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 4,
    "tcp_user_timeout": 30_000,
}


@dataclass(frozen=True)
class DatabaseUrl:
    """A PostgreSQL URL: ``postgresql://``, or SQLAlchemy's with any PostgreSQL driver (``+asyncpg``, ...)."""

    url: URL

    @classmethod
    def parse(cls, raw: str) -> DatabaseUrl:
        try:
            url = make_url(raw.strip())
        except ArgumentError:
            # Never echo the input: it may hold a password.
            raise ConfigurationError(
                "database URL is not a URL; expected postgresql://user:password@host:port/dbname"
            ) from None
        except ValueError:  # the port is not a number
            raise ConfigurationError(
                "database URL port is not a number; expected postgresql://user:password@host:port/dbname"
                " (several hosts: postgresql://user:password@/dbname?host=h1:5432&host=h2:5432)"
            ) from None
        if url.host and "@" in url.host:  # "user:p@ss@host": the first @ ended the user-info part
            raise ConfigurationError("database URL has an @ in its password or user name: percent-encode it (@ is %40)")
        if url.drivername not in _ACCEPTED_DRIVERS:
            raise ConfigurationError(
                f"database URL scheme {url.drivername!r} is not supported; use postgresql:// (or postgresql+psycopg,"
                " +asyncpg, +psycopg2: the product connects with psycopg whichever the URL names)"
            )
        url = url.set(query=_libpq_parameters(url))
        if url.host and "%" in url.host:  # a unix socket directory, percent-encoded as libpq's docs show
            url = url.set(host=unquote(url.host))
        if url.port is not None and not 0 < url.port < 65536:
            raise ConfigurationError(f"database URL port {url.port} is out of range")
        if url.password == "":
            # "user:@host" has no password; do not show one as *** (URL.set cannot unset a field).
            url = URL.create(url.drivername, url.username, None, url.host, url.port, url.database, url.query)
        return cls(url.set(drivername="postgresql+psycopg"))

    @property
    def password(self) -> str | None:
        """The password, from the user-info part or from a ``?password=`` parameter."""
        if isinstance(self.url.password, str) and self.url.password:
            return self.url.password
        query = self.url.query.get("password")
        return (query if isinstance(query, str) else query[-1]) if query else None

    def redacted(self) -> str:
        """The URL with its password (wherever it is given) replaced by ***, safe for logs and output."""
        url = self.url
        if "password" in url.query:
            url = url.update_query_dict({"password": "***"})
        return url.render_as_string(hide_password=True)

    def sqlalchemy(self) -> URL:
        return self.url

    def connect_kwargs(self) -> dict[str, Any]:
        """libpq parameters; passing them apart avoids re-encoding the password into a URL."""
        params: dict[str, Any] = {
            "host": self.url.host,
            "port": self.url.port,
            "user": self.url.username,
            "password": self.password,
            "dbname": self.url.database,
        }
        for key, value in self.url.query.items():
            params[key] = value if isinstance(value, str) else value[-1]
        return {key: value for key, value in params.items() if value not in (None, "")}

    def create_engine(self, **kwargs: Any) -> Engine:
        """A SQLAlchemy engine (psycopg) connecting with ``connect_kwargs``: the one reading of the URL."""
        return create_engine(URL.create("postgresql+psycopg"), connect_args=self.connect_kwargs(), **kwargs)


def _libpq_parameters(url: URL) -> dict[str, str | tuple[str, ...]]:
    """The URL's query as libpq parameters: another driver's translated or left out, anything else refused."""
    query: dict[str, str | tuple[str, ...]] = {}
    for key, value in url.query.items():
        if key == "host" and url.host is None:
            query.update(_hosts(value if isinstance(value, tuple) else (value,)))
        elif key == "ssl" and url.drivername == "postgresql+asyncpg":
            mode = value if isinstance(value, str) else value[-1]
            query["sslmode"] = _ASYNCPG_SSL.get(mode.lower(), mode)
        elif key in _LIBPQ_PARAMETERS:
            query[key] = value
        elif key not in _DRIVER_ONLY_PARAMETERS:
            raise ConfigurationError(
                f"database URL parameter {key!r} is not a libpq connection parameter"
                " (https://www.postgresql.org/docs/current/libpq-connect.html#LIBPQ-PARAMKEYWORDS)"
            )
    return query


def _hosts(hosts: tuple[str, ...]) -> dict[str, str]:
    """SQLAlchemy's several hosts (``?host=h1:5432&host=h2:5433``) as libpq's (``host=h1,h2 port=5432,5433``)."""
    names, ports = [], []
    for entry in hosts:
        name, _, port = entry.rpartition(":")
        if entry.startswith("/") or not port.isdigit() or not name or name.endswith(":"):  # a socket, no port, IPv6
            name, port = entry, ""
        names.append(name.strip("[]"))
        ports.append(port)
    params = {"host": ",".join(names)}
    if any(ports):
        params["port"] = ",".join(ports)  # an empty entry: that host's default port
    return params


def connect_params(db: DatabaseUrl, *, application_name: str, connect_timeout: int = 10) -> dict[str, Any]:
    """libpq parameters of the product's connections (sync and asyncio alike)."""
    # The URL's own parameters (?connect_timeout=5, ?keepalives_idle=...) override these defaults.
    params = {"connect_timeout": connect_timeout, **_KEEPALIVES, **db.connect_kwargs()}
    params["application_name"] = application_name
    return params


def connect(
    db: DatabaseUrl, *, application_name: str, autocommit: bool = True, connect_timeout: int = 10
) -> psycopg.Connection[Any]:
    """Open a psycopg connection; errors come back with the password removed."""
    params = connect_params(db, application_name=application_name, connect_timeout=connect_timeout)
    try:
        return psycopg.connect(**params, autocommit=autocommit)
    except psycopg.OperationalError as exc:  # down, refused, or these credentials refused: still an OperationalError
        raise DatabaseUnavailableError(redact(str(exc), db)) from None
    except psycopg.Error as exc:
        raise type(exc)(redact(str(exc), db)) from None


# Server errors that end the session while it is busy (not only FATAL ones: psycopg maps these
# classes to errors that do not derive from OperationalError).
_SESSION_ENDED = {
    "25P03",  # idle_in_transaction_session_timeout
    "57P01",  # admin_shutdown (pg_terminate_backend, a fast shutdown)
    "57P02",  # crash_shutdown
    "57P03",  # cannot_connect_now
    "57P05",  # idle_session_timeout
}


def session_lost(exc: BaseException) -> bool:
    """Whether ``exc`` means this session is gone, so that a new connection may succeed.

    A lost connection (OperationalError, a closed connection), or the server ending the session:
    any FATAL error, and the session timeouts, whatever class psycopg gives them. A worker frozen
    in its batch past OUTBOX_SESSION_TIMEOUT gets IdleInTransactionSessionTimeout (SQLSTATE 25P03,
    an InternalError) when it resumes; it must reconnect as a standby, not exit.
    """
    if isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError):
        return True
    if not isinstance(exc, psycopg.Error):
        return False
    if exc.sqlstate in _SESSION_ENDED or exc.diag.severity_nonlocalized in ("FATAL", "PANIC"):
        return True
    pgconn = exc.pgconn
    return pgconn is not None and pgconn.status == psycopg.pq.ConnStatus.BAD


def redact(text: str, db: DatabaseUrl | None) -> str:
    """Remove the password (raw and URL-encoded) from a message."""
    password = db.password if db else None
    if not password:
        return text
    for form in {password, quote(password, safe=""), quote_plus(password)}:
        text = text.replace(form, "***")
    return text


class RedactingFilter(logging.Filter):
    """Scrub a password from every log record that passes through a handler."""

    def __init__(self, db: DatabaseUrl | None) -> None:
        super().__init__()
        self.db = db

    def filter(self, record: logging.LogRecord) -> bool:
        if self.db is not None and self.db.password:
            record.msg = redact(record.getMessage(), self.db)
            record.args = None
            if record.exc_info and record.exc_info[1] is not None:
                record.exc_text = redact(logging.Formatter().formatException(record.exc_info), self.db)
                record.exc_info = None
        return True


def check_direct_session(conn: psycopg.Connection[Any]) -> None:
    """Refuse a connection whose server session is not its own: one that goes through a pooler.

    The consumer lock is a session advisory lock, so the worker needs a server session (backend)
    that lives exactly as long as its connection. Behind a transaction-pooling proxy (PgBouncer
    ``pool_mode=transaction``) the lock lands on whichever server connection ran that transaction
    and stays there after the worker is gone, and two workers can be active at once.

    Detection: at connect, PostgreSQL sends the client its backend pid (BackendKeyData, which
    libpq reports as ``conn.info.backend_pid``); ``pg_backend_pid()`` is the backend that really
    runs the session. On a direct connection (TCP or unix socket) they are always equal. A pooler
    does not forward the real one (in transaction pooling there is no single backend to forward, and
    it needs its own key to route cancel requests): PgBouncer, in every pool mode, sends random
    bytes (measured with PgBouncer 1.18: announced 2021990061, real 22319). That is exactly "the
    session is not ours", in one query, with no false positive. As a second check, the backend pid is read in two
    transactions: if it changed, the connection is pooled per transaction whatever the proxy
    announced.

    Not used, on purpose:
    - comparing ``inet_client_addr()/inet_client_port()`` with the local socket's address. It
      differs behind any 1:1 TCP forwarder that keeps the session intact and is fine (docker-proxy
      for a published container port, as testcontainers uses; an SSH tunnel; Kubernetes or cloud
      NAT), so it would refuse good set-ups; and it sees nothing when both hops use unix sockets.
    - ``server_version`` and the other ParameterStatus values: PgBouncer passes the server's through
      (it reported "15.20 (Debian ...)" as the server does).
    - only ``pg_backend_pid()`` changing between transactions: a lone client of PgBouncer usually
      gets the same server connection back, so on its own it rarely shows anything.

    A session-pooling proxy also fails the first check, since it too sends its own key; whether it
    is allowed is the caller's decision (``OUTBOX_ALLOW_SESSION_PROXY=1``: skip this check).

    Runs at most two short queries; in autocommit mode each is its own transaction. On a connection
    that is not in autocommit mode and was idle, the transaction it opens is rolled back.
    """
    was_idle = conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    try:
        announced = conn.info.backend_pid
        first = backend_pid(conn)
        if announced != first:
            raise ConfigurationError(
                f"the database connection goes through a connection pooler such as PgBouncer (the backend pid"
                f" announced at connect, {announced}, is not the session's, {first}); {_POOLER_ADVICE}"
            )
        if conn.autocommit:
            second = backend_pid(conn)
            if second != first:
                raise ConfigurationError(
                    f"the database connection goes through a transaction-pooling proxy (two transactions ran in"
                    f" backend pids {first} and {second}); {_POOLER_ADVICE}"
                )
    finally:
        if was_idle and not conn.autocommit and conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            conn.rollback()


_POOLER_ADVICE = (
    "transaction pooling breaks the consumer's session advisory lock (two workers could both be active);"
    " connect directly to PostgreSQL, or through a session-pooling proxy with OUTBOX_ALLOW_SESSION_PROXY=1"
)
