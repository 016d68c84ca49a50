"""The sidecar's ``async def`` handler on its own event loop, and its default concurrency.

No broker: the handler is driven as the engine drives an ``async def`` handler
(``setup``, then ``handle`` calls in flight together on one loop, then
``teardown``) against a real HTTP endpoint on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from dedupe_consumer import ConfigError
from dedupe_consumer.errors import RetryableError
from dedupe_consumer.models import Event
from dedupe_consumer.sidecar.handler import HttpForwardHandler
from dedupe_consumer.sidecar.runner import sidecar_settings
from dedupe_consumer.sidecar.settings import (
    SIDECAR_CONCURRENCY,
    SidecarAppSettings,
    SidecarSettings,
)

BASE: dict[str, Any] = {
    "kafka": {"bootstrap_servers": "127.0.0.1:1", "group_id": "g", "topics": ["t"]},
    "sidecar": {"target_url": "http://127.0.0.1:8080/events"},
}
GUARD_S = 30.0
"""Only against a hang: every wait below ends long before it when the code is right."""

Answer = Callable[[str], tuple[int, dict[str, str]]]
"""Idempotency-Key -> status and extra headers (called on the server's request thread)."""


class Endpoint:
    """A threaded local HTTP endpoint; ``answer`` decides, ``keys`` records arrivals."""

    def __init__(self, answer: Answer) -> None:
        self.keys: list[str] = []
        self.lock = threading.Lock()
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", "0")))
                key = self.headers.get("Idempotency-Key", "")
                with endpoint.lock:
                    endpoint.keys.append(key)
                status, extra = answer(key)
                self.send_response(status)
                for name, value in extra.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        class Server(ThreadingHTTPServer):
            request_queue_size = 128  # a burst of concurrent connects is not dropped
            daemon_threads = True

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/events"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def arrived(self) -> list[str]:
        with self.lock:
            return list(self.keys)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


@pytest.fixture
def endpoints() -> Iterator[Callable[[Answer], Endpoint]]:
    made: list[Endpoint] = []

    def make(answer: Answer) -> Endpoint:
        made.append(Endpoint(answer))
        return made[-1]

    yield make
    for endpoint in made:
        endpoint.close()


def event(event_id: str, attempt: int = 1) -> Event:
    return Event(event_id, "t", 0, 0, None, b"{}", (), None, attempt=attempt)


def handler_for(url: str, connections: int = 1, **settings: Any) -> HttpForwardHandler:
    return HttpForwardHandler(
        SidecarSettings.model_validate({"target_url": url, **settings}), connections=connections
    )


def test_calls_are_in_flight_together_on_one_loop_up_to_the_connections(
    endpoints: Callable[[Answer], Endpoint],
) -> None:
    """8 calls whose answers wait for each other: they only finish if all 8 are sent at once."""
    barrier = threading.Barrier(8, timeout=GUARD_S)

    def together(key: str) -> tuple[int, dict[str, str]]:
        barrier.wait()  # raises BrokenBarrierError (no answer) if fewer than 8 arrive
        return 200, {}

    target = endpoints(together)
    handler = handler_for(target.url, connections=8)
    threads: set[int] = set()

    async def run() -> None:
        await handler.setup()
        try:

            async def one(n: int) -> None:
                threads.add(threading.get_ident())
                await handler.handle(event(f"e-{n}"))

            await asyncio.wait_for(asyncio.gather(*(one(n) for n in range(8))), GUARD_S)
        finally:
            await handler.teardown()

    asyncio.run(run())
    assert sorted(target.arrived()) == sorted(f"e-{n}" for n in range(8))
    assert len(threads) == 1  # one event loop thread, no thread per call
    assert handler.metrics.requests.labels("200")._value.get() == 8


def test_a_retry_after_answer_goes_to_the_engine_as_the_wait_it_asks_for(
    endpoints: Callable[[Answer], Endpoint],
) -> None:
    """503 + Retry-After: the handler does not wait itself; the engine's backoff does
    (capped at retry_backoff_max, holding only the key, ended by a stop)."""
    target = endpoints(lambda key: (503, {"Retry-After": "3600"}))
    handler = handler_for(target.url, retry_backoff_max="600s")

    async def run() -> RetryableError:
        await handler.setup()
        try:
            with pytest.raises(RetryableError, match="HTTP 503") as raised:
                await asyncio.wait_for(handler.handle(event("e-1")), GUARD_S)
            return raised.value
        finally:
            await handler.teardown()

    assert asyncio.run(run()).retry_after == 3600
    assert target.arrived() == ["e-1"]


def test_handle_without_setup_is_an_error_not_a_silent_success() -> None:
    handler = handler_for("http://127.0.0.1:9/events")
    with pytest.raises(RuntimeError, match="setup"):
        asyncio.run(handler.handle(event("e-1")))


def test_one_session_with_a_connection_per_call_closed_by_teardown() -> None:
    handler = handler_for("http://127.0.0.1:9/events", connections=5)

    async def run() -> None:
        await handler.setup()
        session = handler._session
        assert session is not None and session.connector is not None
        assert session.connector.limit == 5  # a keep-alive connection per call in flight
        await handler.teardown()
        assert session.closed
        assert handler._session is None

    asyncio.run(run())
    with pytest.raises(ValueError, match="at least 1"):
        handler_for("http://127.0.0.1:9/events", connections=0)


def test_calls_beyond_the_connections_wait_for_one(
    endpoints: Callable[[Answer], Endpoint],
) -> None:
    """More calls than connections (the engine never does this) queue instead of failing."""
    target = endpoints(lambda key: (200, {}))
    handler = handler_for(target.url, connections=2)

    async def run() -> None:
        await handler.setup()
        try:
            calls = (handler.handle(event(f"e-{n}")) for n in range(6))
            await asyncio.wait_for(asyncio.gather(*calls), GUARD_S)
        finally:
            await handler.teardown()

    asyncio.run(run())
    assert sorted(target.arrived()) == [f"e-{n}" for n in range(6)]


# -- the sidecar's default concurrency ---------------------------------------------------------


def test_sidecar_concurrency_defaults_to_32_and_an_explicit_value_is_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DEDUPE_PROCESSING__CONCURRENCY", raising=False)
    processing = {"dead_letter_topic": "t.dlq"}
    assert SIDECAR_CONCURRENCY == 32
    default = SidecarAppSettings.load(**BASE, processing=processing)
    assert default.processing.concurrency == 32
    assert default.processing.ordering == "key"
    effective, _ = sidecar_settings(default)
    assert effective.processing.concurrency == 32  # the retry mapping keeps it

    one = SidecarAppSettings.load(**BASE, processing={**processing, "concurrency": 1})
    assert one.processing.concurrency == 1

    config = tmp_path / "sidecar.toml"
    config.write_text(
        "[kafka]\nbootstrap_servers = '127.0.0.1:1'\ngroup_id = 'g'\ntopics = ['t']\n"
        "[processing]\ndead_letter_topic = 't.dlq'\nconcurrency = 1\n"
        "[sidecar]\ntarget_url = 'http://127.0.0.1:8080/events'\n"
    )
    assert SidecarAppSettings.from_toml(config).processing.concurrency == 1
    config.write_text(config.read_text().replace("concurrency = 1\n", ""))
    assert SidecarAppSettings.from_toml(config).processing.concurrency == 32

    shipped = Path(__file__).resolve().parents[2] / "config" / "sidecar.toml"
    assert SidecarAppSettings.from_toml(shipped).processing.concurrency == 32

    monkeypatch.setenv("DEDUPE_PROCESSING__CONCURRENCY", "1")
    assert SidecarAppSettings.from_toml(config).processing.concurrency == 1
    assert SidecarAppSettings.load(**BASE, processing=processing).processing.concurrency == 1
    monkeypatch.setenv("DEDUPE_PROCESSING__CONCURRENCY", "0")
    with pytest.raises(ConfigError, match=r"processing\.concurrency"):  # still validated
        SidecarAppSettings.load(**BASE, processing=processing)


def test_core_settings_keep_concurrency_1(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the sidecar's settings change the default: a user's sync handler is not threaded."""
    from dedupe_consumer.config import Settings

    monkeypatch.delenv("DEDUPE_PROCESSING__CONCURRENCY", raising=False)
    settings = Settings.load(kafka=BASE["kafka"], processing={"dead_letter_topic": "t.dlq"})
    assert settings.processing.concurrency == 1
