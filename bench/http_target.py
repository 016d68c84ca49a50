"""A local HTTP endpoint for the sidecar row: answers each POST in a fixed time, counts deliveries.

It stands in for the application behind ``dedupe-consumer sidecar``: every
request is answered ``200`` after ``delay_s`` (2 ms in the benchmark, a fast
local service), and each POST is counted under its ``Idempotency-Key`` (the
event ID), so the row can say whether every unique ID arrived exactly once.

It is an asyncio server on its own thread, not ``http.server``: one thread per
connection and the GIL would make the target, rather than the sidecar, the
limit once the sidecar keeps dozens of requests in flight. It speaks just
enough HTTP/1.1 for a client that sends ``Content-Length`` bodies over
keep-alive connections (aiohttp and httpx both do); anything else is
answered 400.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter


class HttpTarget:
    """``with HttpTarget(0.002) as target:`` serves on ``target.url`` until the block ends."""

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s
        self.deliveries: Counter[str] = Counter()
        """POSTs per ``Idempotency-Key``."""
        self.unkeyed = 0
        """POSTs without an ``Idempotency-Key`` (the sidecar always sends one)."""
        self.first_at: float | None = None
        """``time.perf_counter()`` when the first POST arrived."""
        self.bad_requests = 0
        self.url = ""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="http-target")
        self._server: asyncio.Server | None = None

    def __enter__(self) -> HttpTarget:
        self._thread.start()
        started = asyncio.run_coroutine_threadsafe(self._start(), self._loop)
        port = started.result(timeout=10)
        self.url = f"http://127.0.0.1:{port}/events"
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    async def _start(self) -> int:
        self._server = await asyncio.start_server(self._connection, "127.0.0.1", 0)
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def _stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while await self._request(reader, writer):
                pass
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass  # the client closed the connection (or sent garbage): nothing to answer
        finally:
            writer.close()

    async def _request(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Answer one request; False when the connection is to be closed."""
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        request_line, *header_lines = head.split("\r\n")
        method = request_line.split(" ", 1)[0]
        headers: dict[str, str] = {}
        for line in header_lines:
            name, _, value = line.partition(":")
            if name:
                headers[name.strip().lower()] = value.strip()
        if "transfer-encoding" in headers or not headers.get("content-length", "0").isdigit():
            self.bad_requests += 1
            writer.write(
                b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            )
            await writer.drain()
            return False
        length = int(headers.get("content-length", "0"))
        if length:
            await reader.readexactly(length)
        if method == "POST":
            if self.first_at is None:
                self.first_at = time.perf_counter()
            key = headers.get("idempotency-key")
            if key is None:
                self.unkeyed += 1
            else:
                self.deliveries[key] += 1
        await asyncio.sleep(self.delay_s)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        return headers.get("connection", "").lower() != "close"
