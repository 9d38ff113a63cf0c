"""An embedded PostgreSQL (pgserver) for when no database is configured.

pgserver and platformdirs come with the `embedded` extra; without it, asking for the embedded
server is a configuration error that says what to install or set.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

from processor.errors import ConfigurationError

log = logging.getLogger(__name__)

NO_DATABASE = (
    "no database configured: set OUTBOX_DATABASE_URL (or --database-url), or install the embedded server: "
    "pip install 'pg-outbox-processor[embedded]'"
)

# Servers started by this process, kept referenced so they run until it exits.
_SERVERS: dict[Path, Any] = {}


def default_data_dir() -> Path:
    try:
        import platformdirs
    except ModuleNotFoundError as exc:
        raise _missing_extra(exc) from None
    return Path(platformdirs.user_data_dir("outbox-processor")) / "pgdata"


def embedded_database_url(data_dir: Path | None = None) -> str:
    """Start (or join) the embedded server for ``data_dir`` and return its URL.

    pgserver initialises the data directory on first use and stops the server when the last
    process using it exits.
    """
    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset (containers, CI); pgserver only
        # keeps a lock file there and falls back to /tmp.
        warnings.simplefilter("ignore")
        try:
            from pgserver import get_server  # type: ignore[attr-defined]  # only this path needs it
        except ModuleNotFoundError as exc:
            raise _missing_extra(exc) from None  # before anything is created on disk
        path = (data_dir or default_data_dir()).expanduser().resolve()
        if path not in _SERVERS:
            path.mkdir(parents=True, exist_ok=True)
            log.info("using the embedded PostgreSQL in %s", path)
            _SERVERS[path] = get_server(path, cleanup_mode="stop")
    uri: str = _SERVERS[path].get_uri()
    return uri


def _missing_extra(exc: ModuleNotFoundError) -> Exception:
    """What to install or set when the embedded extra is missing (another missing module is a bug to show)."""
    return ConfigurationError(NO_DATABASE) if exc.name in {"pgserver", "platformdirs"} else exc
