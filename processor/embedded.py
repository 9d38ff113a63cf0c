"""An embedded PostgreSQL (pgserver) for when no database is configured."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import platformdirs

log = logging.getLogger(__name__)

# Servers started by this process, kept referenced so they run until it exits.
_SERVERS: dict[Path, Any] = {}


def default_data_dir() -> Path:
    return Path(platformdirs.user_data_dir("outbox-processor")) / "pgdata"


def embedded_database_url(data_dir: Path | None = None) -> str:
    """Start (or join) the embedded server for ``data_dir`` and return its URL.

    pgserver initialises the data directory on first use and stops the server when the last
    process using it exits.
    """
    path = (data_dir or default_data_dir()).expanduser().resolve()
    if path not in _SERVERS:
        path.mkdir(parents=True, exist_ok=True)
        log.info("using the embedded PostgreSQL in %s", path)
        with warnings.catch_warnings():
            # platformdirs warns when XDG_RUNTIME_DIR is unset (containers, CI); pgserver only
            # keeps a lock file there and falls back to /tmp.
            warnings.simplefilter("ignore")
            from pgserver import get_server  # type: ignore[attr-defined]  # only this path needs it

            _SERVERS[path] = get_server(path, cleanup_mode="stop")
    uri: str = _SERVERS[path].get_uri()
    return uri
