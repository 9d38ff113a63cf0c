"""The container's health probe: ask a worker's /health over HTTP, with nothing but the standard library.

``python -m processor.probe`` is the image's HEALTHCHECK (and the compose worker's): the port comes
from OUTBOX_METRICS_PORT, the worker is on 127.0.0.1; exit 0 when /health answers 200, else 1 and
the reason on one line. It starts in a few tens of milliseconds; `outbox healthcheck`, the same
probe for people (with --port and --host), loads the whole CLI first (about 0.8 s of CPU), too much
to pay every interval in every container.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request

_REASON_CHARS = 300  # a probe's line stays a line, whatever /health (or whatever answers) sends


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect is not the worker's answer: report it, never follow it to another host."""

    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


def probe_health(host: str, port: int, timeout: float) -> str | None:
    """Ask a worker's /health: None when it answers 200, else the reason, one line."""
    # No proxy from the environment: the worker is on this host or network, never behind one.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirects())
    try:
        with opener.open(f"http://{host}:{port}/health", timeout=timeout):
            return None
    except urllib.error.HTTPError as exc:
        body = exc.read(_REASON_CHARS * 4).decode("utf-8", "replace")
        said = "; ".join(line.strip() for line in body.splitlines() if line.strip()) or str(exc.reason)
        if len(said) > _REASON_CHARS:
            said = said[:_REASON_CHARS] + "..."
        return f"the worker on port {port} is unhealthy ({exc.code}): {said}"
    except (urllib.error.URLError, OSError) as exc:
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        if isinstance(reason, TimeoutError):
            return f"no answer from a worker on port {port} within {timeout:g} s"
        return f"no worker answering on port {port} ({host}: {getattr(reason, 'strerror', None) or reason})"


def main() -> int:
    raw = os.environ.get("OUTBOX_METRICS_PORT", "").strip()
    if not raw.isdigit() or not 0 < int(raw) < 65536:
        print("error: OUTBOX_METRICS_PORT must be the worker's metrics port (1 to 65535)", file=sys.stderr)
        return 1
    port = int(raw)
    problem = probe_health("127.0.0.1", port, timeout=5.0)
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 1
    print(f"ok: the worker on port {port} is healthy")
    return 0


if __name__ == "__main__":
    sys.exit(main())
