"""Webhook requests as the Standard Webhooks specification has them, checked by its reference library."""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import uuid

import pytest
from standardwebhooks.webhooks import Webhook as ReferenceWebhook

from outbox.subscription import Transition
from processor.errors import ConfigurationError
from processor.webhooks import Webhook

SECRET = "whsec_" + base64.b64encode(os.urandom(24)).decode()
TRANSITION = Transition(
    42, uuid.uuid4(), 1, "running", "segment", "done", "iou_eval", "processor", dt.datetime.now(dt.UTC)
)


def test_a_signed_request_verifies_with_the_reference_library():
    hook = Webhook.parse("https://example.com/hook", SECRET, 5)
    body = TRANSITION.to_json_text().encode()
    headers = hook.headers(str(TRANSITION.transition_id), int(dt.datetime.now(dt.UTC).timestamp()), body)
    assert headers["webhook-id"] == "42" and headers["content-type"] == "application/json"
    payload = ReferenceWebhook(SECRET).verify(body, headers)
    assert payload == json.loads(body)
    assert payload["to_status"] == "done" and payload["job_id"] == str(TRANSITION.job_id)
    # Another secret, or a changed body, does not verify.
    other = "whsec_" + base64.b64encode(os.urandom(24)).decode()
    with pytest.raises(Exception, match="signature"):
        ReferenceWebhook(other).verify(body, headers)
    with pytest.raises(Exception, match="signature"):
        ReferenceWebhook(SECRET).verify(body.replace(b"done", b"fail"), headers)


def test_without_a_secret_no_signature_is_sent():
    hook = Webhook.parse("http://127.0.0.1:8080/", None, 5)
    assert "webhook-signature" not in hook.headers("1", 0, b"{}")


@pytest.mark.parametrize(
    ("url", "secret", "timeout", "message"),
    [
        ("ftp://example.com/", None, 5, "http:// or https://"),
        ("https://", None, 5, "http:// or https://"),
        ("https://example.com/", None, 0, "above 0 seconds"),
        ("https://example.com/", "supersecretvalue1234", 5, "must start with whsec_"),
        ("https://example.com/", "whsec_not base64!!", 5, "not base64"),
        ("https://example.com/", "whsec_" + base64.b64encode(b"short").decode(), 5, "too short"),
    ],
)
def test_bad_webhook_settings_are_refused_without_echoing_the_secret(url, secret, timeout, message):
    with pytest.raises(ConfigurationError, match=message) as raised:
        Webhook.parse(url, secret, timeout)
    assert secret is None or secret not in str(raised.value)


def test_a_redirect_is_not_taken_for_a_delivery():
    """urllib would follow a 302 as a GET without the body, and take its 200 for a delivery."""
    import http.server
    import threading

    from processor.webhooks import WebhookError

    seen: list[tuple[str, str]] = []

    class Receiver(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            seen.append(("POST", self.path))
            self.rfile.read(int(self.headers["content-length"]))
            if self.path == "/moved":
                self.send_response(302)
                self.send_header("location", "/landing")
            else:
                self.send_response(204)
            self.end_headers()

        def do_GET(self) -> None:
            seen.append(("GET", self.path))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        with pytest.raises(WebhookError, match="HTTP 302"):
            Webhook.parse(f"{base}/moved", SECRET, 5).post(TRANSITION)
        assert Webhook.parse(f"{base}/hook", SECRET, 5).post(TRANSITION) == 204
    finally:
        server.shutdown()
        server.server_close()
    assert seen == [("POST", "/moved"), ("POST", "/hook")]
