"""The sidecar on aiohttp: what the HTTP target can make it do (found by review).

No broker: HttpForwardHandler against raw sockets on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from dedupe_consumer.models import Event
from dedupe_consumer.sidecar.handler import HttpForwardHandler
from dedupe_consumer.sidecar.settings import SidecarSettings

Reply = Callable[[socket.socket], None]


@pytest.fixture
def raw_target() -> Iterator[Callable[[Reply], str]]:
    """A TCP server that reads one request head and lets ``reply`` write anything back."""
    sockets: list[socket.socket] = []

    def make(reply: Reply) -> str:
        server = socket.socket()
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        sockets.append(server)

        def serve() -> None:
            while True:
                try:
                    conn, _ = server.accept()
                except OSError:
                    return

                def one(conn: socket.socket = conn) -> None:
                    data = b""
                    while b"\r\n\r\n" not in data:
                        chunk = conn.recv(65536)
                        if not chunk:
                            return
                        data += chunk
                    try:
                        reply(conn)
                    except OSError:
                        pass
                    finally:
                        conn.close()

                threading.Thread(target=one, daemon=True).start()

        threading.Thread(target=serve, daemon=True).start()
        return f"http://127.0.0.1:{server.getsockname()[1]}/events"

    yield make
    for server in sockets:
        server.close()


def event() -> Event:
    return Event("e1", "t", 0, 0, None, b"{}", (), None)


async def one_attempt(url: str, **settings: Any) -> str:
    handler = HttpForwardHandler(
        SidecarSettings.model_validate({"target_url": url, **settings}), connections=1
    )
    await handler.setup()
    try:
        await handler.handle(event())
        return "delivered"
    except Exception as failure:
        return f"{type(failure).__name__}: {failure}"
    finally:
        await handler.teardown()


BODY_MIB = 64


def test_a_large_2xx_body_is_drained_not_buffered(raw_target: Callable[[Reply], str]) -> None:
    """httpx's aiter_raw() drained a 2xx body chunk by chunk; ``await response.read()``
    keeps all of it (twice, while joining) per call in flight: 32 calls to a target
    that echoes or streams a large body hold 32 such bodies."""

    def big(conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (BODY_MIB << 20))
        chunk = b"x" * (1 << 20)
        for _ in range(BODY_MIB):
            conn.sendall(chunk)

    url = raw_target(big)
    tracemalloc.start()
    try:
        outcome = asyncio.run(one_attempt(url, timeout="30s"))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert outcome == "delivered"
    assert peak < 16 << 20, f"a {BODY_MIB} MiB answer body took {peak >> 20} MiB"


def test_timeout_is_per_phase_as_the_setting_says(raw_target: Callable[[Reply], str]) -> None:
    """sidecar.timeout: 'the limit on each of connect, send and wait for the answer' (as
    httpx.Timeout(t) applied it). aiohttp's ClientTimeout(total=t) caps the whole
    exchange instead: an answer whose head arrives in pieces, each well within the
    timeout, fails once their sum passes it."""

    def trickle(conn: socket.socket) -> None:
        for part in (
            b"HTTP/1.1 200 OK\r\n",
            b"A: b\r\n",
            b"C: d\r\n",
            b"Content-Length: 0\r\n\r\n",
        ):
            conn.sendall(part)
            time.sleep(0.4)

    url = raw_target(trickle)
    assert asyncio.run(one_attempt(url, timeout="1s")) == "delivered"
