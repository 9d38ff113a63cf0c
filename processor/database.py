"""Database URLs (parsing, redaction) and the processor's connections."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, quote_plus

import psycopg
from sqlalchemy import Engine, create_engine
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from processor.errors import ConfigurationError

_ACCEPTED_DRIVERS = {"postgresql", "postgres", "postgresql+psycopg"}

# TCP keepalives detect a dead server or network within about 30 s, even while the worker waits.
_KEEPALIVES: dict[str, Any] = {"keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 4}


@dataclass(frozen=True)
class DatabaseUrl:
    """A PostgreSQL URL, given as ``postgresql://`` or ``postgresql+psycopg://``."""

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
        if url.drivername not in _ACCEPTED_DRIVERS:
            raise ConfigurationError(
                f"database URL scheme {url.drivername!r} is not supported; use postgresql:// or postgresql+psycopg://"
            )
        if url.port is not None and not 0 < url.port < 65536:
            raise ConfigurationError(f"database URL port {url.port} is out of range")
        if url.password == "":
            url = url.set(password=None)  # "user:@host" has no password; do not show one as ***
        return cls(url.set(drivername="postgresql+psycopg"))

    @property
    def password(self) -> str | None:
        return self.url.password if isinstance(self.url.password, str) else None

    def redacted(self) -> str:
        """The URL with its password replaced by ***, safe for logs and output."""
        return self.url.render_as_string(hide_password=True)

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
        return create_engine(self.url, **kwargs)


def connect(
    db: DatabaseUrl, *, application_name: str, autocommit: bool = True, connect_timeout: int = 10
) -> psycopg.Connection[Any]:
    """Open a psycopg connection; errors come back with the password removed."""
    try:
        return psycopg.connect(
            **db.connect_kwargs(),
            application_name=application_name,
            autocommit=autocommit,
            connect_timeout=connect_timeout,
            **_KEEPALIVES,
        )
    except psycopg.Error as exc:
        raise type(exc)(redact(str(exc), db)) from None


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
