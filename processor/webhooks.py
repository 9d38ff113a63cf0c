"""`outbox deliver NAME --webhook URL`: each transition of a subscription as a signed HTTP POST.

The request follows the Standard Webhooks specification (https://www.standardwebhooks.com): a JSON
body (Transition.to_json) and the headers ``webhook-id`` (the transition id: the receiver's
idempotency key, the same on every retry), ``webhook-timestamp`` (Unix seconds) and, with a secret,
``webhook-signature``: ``v1,`` and the base64 HMAC-SHA256 of ``id.timestamp.body`` under the secret
(``whsec_`` and base64). A 2xx answer acknowledges the transition (in the subscription's
transaction); anything else, a timeout or a refused connection raises, and the subscriber retries
it with backoff and parks it after its last attempt. Delivery is at least once, never skipping.

HTTP through the standard library (urllib): one POST with a timeout needs no client library.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from outbox.subscription import Transition
from processor.errors import ConfigurationError, WebhookError

_SECRET_PREFIX = "whsec_"


@dataclass(frozen=True)
class Webhook:
    """Where and how to POST: the URL, the signing key (None: unsigned) and the timeout."""

    url: str
    key: bytes | None = None
    timeout: float = 10.0

    @classmethod
    def parse(cls, url: str, secret: str | None, timeout: float) -> Webhook:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ConfigurationError("the webhook URL must be an http:// or https:// URL")
        if timeout <= 0:
            raise ConfigurationError(f"the webhook timeout must be above 0 seconds (got {timeout})")
        return cls(url, None if not secret else signing_key(secret), timeout)

    def signature(self, message_id: str, timestamp: int, body: bytes) -> str:
        assert self.key is not None
        signed = f"{message_id}.{timestamp}.".encode() + body
        return "v1," + base64.b64encode(hmac.new(self.key, signed, hashlib.sha256).digest()).decode()

    def headers(self, message_id: str, timestamp: int, body: bytes) -> dict[str, str]:
        headers = {
            "content-type": "application/json",
            "user-agent": "pg-outbox-processor",
            "webhook-id": message_id,
            "webhook-timestamp": str(timestamp),
        }
        if self.key is not None:
            headers["webhook-signature"] = self.signature(message_id, timestamp, body)
        return headers

    def post(self, transition: Transition) -> int:
        """POST one transition; return the status of a 2xx answer, raise WebhookError otherwise."""
        body = transition.to_json_text().encode()
        message_id = str(transition.transition_id)
        request = urllib.request.Request(
            self.url, data=body, method="POST", headers=self.headers(message_id, int(time.time()), body)
        )
        try:
            with _OPENER.open(request, timeout=self.timeout) as response:
                return int(response.status)
        except urllib.error.HTTPError as exc:
            with exc:  # the answer's connection is closed, not left to the garbage collector
                detail = exc.read(200).decode(errors="replace").strip()
            raise WebhookError(f"HTTP {exc.code} from the webhook" + (f": {detail}" if detail else "")) from None
        except (urllib.error.URLError, TimeoutError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise WebhookError(f"webhook not reached: {reason}") from None

    def handler(self) -> Any:
        """A Subscriber handler: the POST inside the transaction that acknowledges on a 2xx answer."""

        def deliver(_conn: Any, transition: Transition) -> None:
            self.post(transition)

        return deliver


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect is not an acknowledgement: urllib would follow it as a GET without the body, and
    take that GET's 2xx for a delivery. Raised as an HTTP error instead (retried, then parked)."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_OPENER = urllib.request.build_opener(_NoRedirects)


def signing_key(secret: str) -> bytes:
    """The key of a ``whsec_...`` secret (never echoed in an error: it is a secret)."""
    if not secret.startswith(_SECRET_PREFIX):
        raise ConfigurationError("the webhook secret must start with whsec_ (Standard Webhooks), then base64")
    try:
        key = base64.b64decode(secret[len(_SECRET_PREFIX) :], validate=True)
    except (binascii.Error, ValueError):
        raise ConfigurationError("the webhook secret is not base64 after whsec_") from None
    if len(key) < 16:
        raise ConfigurationError("the webhook secret is too short: use at least 16 random bytes (24 base64 chars)")
    return key
