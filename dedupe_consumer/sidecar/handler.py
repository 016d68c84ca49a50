"""``HttpForwardHandler``: an ``async def`` :class:`~dedupe_consumer.Handler` that POSTs each event.

The sidecar is not a second consumer loop: it is this handler driven by the
ordinary :class:`~dedupe_consumer.DedupeConsumer`, so deduplication, the
watermark, dead letters and commit-after-persist are the library's, tested
once. Its ``setup``, ``handle`` and ``teardown`` are ``async def``: the engine
runs them on its one event loop with up to ``processing.concurrency`` POSTs in
flight, each on a keep-alive connection of its own (the sidecar's default
concurrency is 32, see :class:`~dedupe_consumer.sidecar.settings.SidecarAppSettings`), over
one aiohttp session. One call to
:meth:`HttpForwardHandler.handle` is one attempt:

* a 2xx answer means delivered;
* a permanent answer (``sidecar.permanent_statuses`` minus
  ``retryable_statuses``, by default 4xx except 408/429) raises
  :class:`PermanentError`: the engine dead-letters the event with the status
  and the start of the body in ``dlq.error.message``;
* anything else (5xx, 408, 429, no answer) raises :class:`RetryableError`: the
  engine calls the handler again for the *same* event after its backoff, so the
  event's key (or, with ``ordering = "partition"``, its partition) waits and its
  order is kept; other keys go on meanwhile. The engine's wait ends at once on
  SIGTERM, and then only the events decided so far are persisted and committed.

A 2xx answer with a ``Kafka-Reply-Topic`` header is a *response*: its body is
produced to that topic (keyed by ``Kafka-Reply-Key`` when given, else the event's
key) in the transaction that commits the event, so exactly once, and stored with
the event's ID record; with ``processing.reply_on_duplicate`` a duplicate gets it
again without a POST (see :mod:`dedupe_consumer.responses`). A body over
``dedupe.max_response_bytes`` dead-letters the event (``response-too-large``).

A ``Retry-After`` answer is honoured up to ``retry_backoff_max``: it goes to
the engine as :attr:`RetryableError.retry_after`, which waits it out like any
backoff (holding only the event's key, ended at once by a stop or a revocation).
"""

from __future__ import annotations

import contextlib
import re
import ssl
import time
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

import aiohttp
import structlog
from prometheus_client import CollectorRegistry

from dedupe_consumer import __version__
from dedupe_consumer.errors import PermanentError, RetryableError
from dedupe_consumer.handler import Handler
from dedupe_consumer.models import Event
from dedupe_consumer.observability.tracing import current_trace_headers
from dedupe_consumer.payloads import record_json
from dedupe_consumer.sidecar.headers import request_headers
from dedupe_consumer.sidecar.metrics import SidecarMetrics
from dedupe_consumer.sidecar.settings import SidecarSettings
from dedupe_consumer.store.base import Response

log = structlog.get_logger("dedupe_consumer.sidecar")

_DELAY_SECONDS = re.compile(r"[0-9]+")
"""RFC 9110 ``delay-seconds``: ASCII digits only."""
SNIPPET_CHARS = 500
"""How much of an error answer's body goes into the dead letter."""
REPLY_TOPIC = "Kafka-Reply-Topic"
REPLY_KEY = "Kafka-Reply-Key"
VALUE_FORMAT = "Kafka-Value-Format"
"""The request header naming the format a JSON body was decoded from (avro, ...)."""
"""Answer headers: the body is the event's response, sent to this topic with this key."""
_MOST_READ = 512 * 1024 + 1
"""A response body is read up to one byte over the largest ``dedupe.max_response_bytes``
(a larger one is refused by the engine all the same, without holding all of it)."""


def retry_after_s(value: str | None, now: datetime | None = None) -> float | None:
    """``Retry-After`` as seconds from now: delay-seconds or an HTTP-date; None if unusable.

    Only ASCII is HTTP: ``str.isdigit()`` also accepts digits like ``"\u00b2"`` that
    ``float()`` then rejects, which would turn a permanent answer into retries.
    """
    if value is None:
        return None
    text = value.strip()
    if not text.isascii():
        return None
    if _DELAY_SECONDS.fullmatch(text):
        return float(text)
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


async def _snippet(response: aiohttp.ClientResponse) -> str:
    """At most :data:`SNIPPET_CHARS` characters of the body, without reading all of it."""
    body = b""
    # A broken or slow body still leaves the status.
    with contextlib.suppress(aiohttp.ClientError, TimeoutError):
        body = await response.content.read(4 * SNIPPET_CHARS)  # UTF-8: <= 4 bytes a char
    text = body.decode("utf-8", errors="replace").strip()
    return text[:SNIPPET_CHARS] if text else "(empty body)"


async def _body(response: aiohttp.ClientResponse) -> bytes:
    """The body, or its first :data:`_MOST_READ` bytes when it is longer."""
    body = bytearray()
    async for chunk in response.content.iter_chunked(65536):
        body += chunk
        if len(body) >= _MOST_READ:
            return bytes(body[:_MOST_READ])
    return bytes(body)


class HttpForwardHandler(Handler):
    """POST each unique event to ``settings.target_url``; see the module docstring.

    ``connections`` is how many keep-alive connections the handler keeps to the
    target; the runner passes ``processing.concurrency``, so every call in flight
    has one. They are one aiohttp session's pool: about 0.5 ms of CPU per POST on
    a 2-core machine (the benchmark's HTTP target included), where httpx took
    about 2.3 ms and was the sidecar's ceiling.
    """

    def __init__(
        self,
        settings: SidecarSettings,
        *,
        metrics: SidecarMetrics | None = None,
        connections: int = 1,
        decoded: str | None = None,
    ) -> None:
        """``decoded``: the ``payload.format`` the values are decoded from ('avro',
        'protobuf', 'json-schema'): the body is then the decoded record as JSON
        (``Content-Type: application/json``, ``Kafka-Value-Format: <format>``), so the
        target needs no registry. None: the value's bytes, as they are."""
        if connections < 1:
            raise ValueError(f"connections must be at least 1, not {connections}")
        self.settings = settings
        self.metrics = metrics or SidecarMetrics(CollectorRegistry())
        self.connections = connections
        self.decoded = decoded
        self._session: aiohttp.ClientSession | None = None

    async def setup(self) -> None:  # type: ignore[override]
        """The session for the whole run, on the engine's event loop.

        ``trust_env=False``: the target is local, and a cluster-wide
        ``HTTP_PROXY`` must not send events through a proxy. TLS verifies
        against the system's trust store.
        """
        timeout = self.settings.timeout.total_seconds()
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                limit=self.connections, ssl=ssl.create_default_context()
            ),
            # Each of connecting (a pooled connection included), sending and every read of
            # the answer within the timeout; no limit on the exchange as a whole.
            timeout=aiohttp.ClientTimeout(
                total=None, connect=timeout, sock_connect=timeout, sock_read=timeout
            ),
            trust_env=False,
            headers={"User-Agent": f"dedupe-consumer/{__version__} sidecar"},
            skip_auto_headers=("Accept-Encoding",),
            auto_decompress=False,
        )

    async def teardown(self) -> None:  # type: ignore[override]
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def handle(self, event: Event) -> Response | None:
        """One attempt; see the module docstring. Returns the response, if any."""
        session = self._session
        if session is None:
            raise RuntimeError("HttpForwardHandler.setup() was not awaited")
        started = time.monotonic()
        delivered = False
        answer: Response | None = None
        replying = False
        # aiohttp writes header text as UTF-8: header-safe values are UTF-8 (or base64).
        headers = [
            (name.decode("utf-8"), value.decode("utf-8"))
            for name, value in request_headers(event, self.settings)
        ]
        body = event.value or b""
        if self.decoded is not None and event.payload is not None:
            body = record_json(event.payload)
            headers = [(n, v) for n, v in headers if n != "Content-Type"]
            headers += [("Content-Type", "application/json"), (VALUE_FORMAT, self.decoded)]
        # With tracing on: the event's span as the request's parent (W3C traceparent).
        headers += current_trace_headers()
        try:
            async with session.post(
                self.settings.target_url,
                data=body,
                headers=headers,
                allow_redirects=False,
            ) as response:
                status = response.status
                if 200 <= status < 300:
                    delivered = True  # the status line decides; the body cannot undo it
                    reply_topic = response.headers.get(REPLY_TOPIC)
                    if reply_topic is not None:
                        replying = True
                        reply_key = response.headers.get(REPLY_KEY)
                        answer = Response(
                            await _body(response),
                            reply_topic,
                            None if reply_key is None else reply_key.encode(),
                        )
                    # Read to the end (the connection is reused), a chunk at a time.
                    async for _ in response.content.iter_chunked(65536):
                        pass
                else:
                    reason = f" {response.reason}" if response.reason else ""
                    message = f"HTTP {status}{reason}: {await _snippet(response)}"
                    retry_after = retry_after_s(response.headers.get("Retry-After"))
        except (aiohttp.ClientError, TimeoutError) as failure:
            if not delivered:  # refused, reset, timed out: no answer
                # Retryable, all of them: a timed-out POST may have taken effect, which
                # the Idempotency-Key covers; and one that can never be sent ends as
                # retries-exhausted, so no transient fault is dead-lettered on the spot.
                self._observe("error", started)
                raise RetryableError(f"no answer: {type(failure).__name__}: {failure}") from failure
            if replying and answer is None:  # a response that never arrived whole
                self._observe("error", started)
                raise RetryableError(
                    f"the response body broke off: {type(failure).__name__}: {failure}"
                ) from failure
            log.debug("answer_body_unreadable", event_id=event.id, error=str(failure))
        self._observe(str(status), started)
        if delivered:
            return answer
        if self.settings.is_permanent(status):
            raise PermanentError(message)
        raise RetryableError(message, retry_after=retry_after)

    def _observe(self, status: str, started: float) -> None:
        self.metrics.requests.labels(status).inc()
        self.metrics.request_seconds.observe(time.monotonic() - started)
