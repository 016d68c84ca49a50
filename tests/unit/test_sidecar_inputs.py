"""Sidecar inputs from outside: a target's ``Retry-After`` and the ``target_url`` setting."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dedupe_consumer import ConfigError
from dedupe_consumer.errors import PermanentError
from dedupe_consumer.models import Event
from dedupe_consumer.sidecar.handler import HttpForwardHandler, retry_after_s
from dedupe_consumer.sidecar.settings import SidecarAppSettings, SidecarSettings

BASE: dict[str, Any] = {
    "kafka": {"bootstrap_servers": "127.0.0.1:1", "group_id": "g", "topics": ["t"]},
    "processing": {"dead_letter_topic": "t.dlq"},
}
NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        ("120", 120.0),
        (" 7 ", 7.0),
        ("0", 0.0),
        ("Thu, 01 Jan 2026 12:00:30 GMT", 30.0),
        ("Thu, 01 Jan 2026 11:00:00 GMT", 0.0),  # in the past: no extra wait
    ],
)
def test_retry_after_accepts_ascii_seconds_and_http_dates(header: str, seconds: float) -> None:
    assert retry_after_s(header, now=NOW) == seconds


@pytest.mark.parametrize(
    "header",
    [
        "\u00b2",  # superscript two: str.isdigit() is True, int() raises
        "\u0663",  # Arabic-Indic three: int() accepts it, HTTP does not
        "\uff11\uff12",  # fullwidth digits
        "1\u00b2",
        "-5",
        "1.5",
        "soon",
        "",
        "Thu, 01 Jan 2026 12:00:\u00b30 GMT",
    ],
)
def test_retry_after_ignores_anything_but_ascii_digits_and_http_dates(header: str) -> None:
    assert retry_after_s(header, now=NOW) is None


@given(st.text())
def test_retry_after_never_raises(header: str) -> None:
    seconds = retry_after_s(header, now=NOW)
    assert seconds is None or seconds >= 0


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://127.0.0.1:99999/events", "port"),
        ("http://127.0.0.1:0/events", "port"),
        ("http://127.0.0.1:http/events", "port"),
        ("ftp://127.0.0.1/events", "http:// or https://"),
        ("http:///events", "host"),
        ("127.0.0.1:8080", "http:// or https://"),
    ],
)
def test_target_url_is_validated_naming_the_key(url: str, why: str) -> None:
    with pytest.raises(ConfigError) as bad:
        SidecarAppSettings.load(**BASE, sidecar={"target_url": url})
    message = str(bad.value)
    assert "sidecar.target_url" in message
    assert why in message
    assert "1..65535" in message or why != "port"


@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1:8080/events", "https://example.com/e", "http://[::1]:65535/", "http://h/"],
)
def test_good_target_urls_load(url: str) -> None:
    settings = SidecarAppSettings.load(**BASE, sidecar={"target_url": url})
    assert settings.sidecar is not None
    assert settings.sidecar.target_url == url


@pytest.fixture
def answering_400() -> Iterator[str]:
    """A local endpoint answering every POST ``400`` with ``Retry-After: \u00b2`` (UTF-8)."""

    class Endpoint(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", "0")))
            self.send_response(400)
            self.send_header("Retry-After", "\u00b2".encode().decode("latin-1"))
            self.send_header("Content-Length", "3")
            self.end_headers()
            self.wfile.write(b"bad")

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Endpoint)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/events"
    server.shutdown()
    server.server_close()


def test_a_400_with_a_unicode_digit_retry_after_is_still_permanent(answering_400: str) -> None:
    handler = HttpForwardHandler(SidecarSettings.model_validate({"target_url": answering_400}))

    async def attempt() -> None:
        await handler.setup()
        try:
            event = Event("e-1", "t", 0, 0, None, b"{}", (), None)
            with pytest.raises(PermanentError, match="HTTP 400"):
                await handler.handle(event)
        finally:
            await handler.teardown()

    asyncio.run(attempt())
