"""``/healthz``, ``/readyz`` and ``/metrics`` for the sidecar, on a loopback port by default.

A stdlib ``ThreadingHTTPServer`` in a daemon thread: three tiny GET endpoints
need no framework, and a probe must answer while the consumer thread is busy
(a handler call that waits out a retry, a long batch). The server knows
nothing about Kafka: readiness is a callback, so what "ready" means is decided
by the runner, where the consumer state is.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, cast
from urllib.parse import urlsplit

import structlog
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from dedupe_consumer.config import KafkaConnection
from dedupe_consumer.kafka.cluster import ClusterProbe

log = structlog.get_logger("dedupe_consumer.sidecar")


@dataclass(frozen=True, slots=True)
class Readiness:
    ready: bool
    detail: Mapping[str, Any] = field(default_factory=dict)
    """Shown as JSON in the /readyz answer, so a failing probe says why."""


ReadyCheck = Callable[[], Readiness]


class BrokerCheck:
    """Is a broker answering? One DescribeCluster request, remembered for ``cache_s``.

    The consumer's own connection is private to librdkafka, so the check uses a
    small admin client with the same connection and security properties (and
    none of the consumer or producer behaviour ones). Probes come every few
    seconds from several places; the cache keeps them from becoming a request each.
    """

    def __init__(self, connection: KafkaConnection, *, timeout_s: float = 2.0) -> None:
        self._probe = ClusterProbe(connection.config("admin"))  # reach and authenticate only
        self._timeout_s = timeout_s
        self.cache_s = 2.0
        self._lock = threading.Lock()
        self._last: tuple[float, bool, str] | None = None

    def __call__(self) -> tuple[bool, str]:
        with self._lock:
            now = time.monotonic()
            if self._last is not None and now - self._last[0] < self.cache_s:
                return self._last[1], self._last[2]
            result = self._probe.reachable(self._timeout_s)
            self._last = (time.monotonic(), *result)
            return result

    def close(self) -> None:
        """Let the admin client go."""
        with self._lock:
            self._probe.close()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    ready: ReadyCheck
    registry: CollectorRegistry


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Endpoints(BaseHTTPRequestHandler):
    server_version = "dedupe-consumer-sidecar"

    def do_GET(self) -> None:
        server = cast(_Server, self.server)
        path = urlsplit(self.path).path
        if path == "/healthz":  # the process and this thread are alive
            self._answer(200, b"ok\n", "text/plain; charset=utf-8")
        elif path == "/readyz":
            try:
                readiness = server.ready()
            except Exception as exc:  # a broken check must read as "not ready", not hang
                readiness = Readiness(False, {"reasons": [f"readiness check failed: {exc}"]})
            body = json.dumps({"ready": readiness.ready, **readiness.detail}).encode() + b"\n"
            self._answer(200 if readiness.ready else 503, body, "application/json")
        elif path == "/metrics":
            self._answer(200, generate_latest(server.registry), CONTENT_TYPE_LATEST)
        else:
            self._answer(404, b"not found: try /healthz, /readyz or /metrics\n", "text/plain")

    def _answer(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("health_request", client=self.client_address[0], request=format % args)


class HealthServer:
    """Binds at construction (a taken port fails start-up), serves after :meth:`start`."""

    def __init__(
        self, host: str, port: int, *, ready: ReadyCheck, registry: CollectorRegistry
    ) -> None:
        server_cls = _Server6 if ":" in host else _Server  # "::" listens on IPv6
        self._server = server_cls((host, port), _Endpoints)
        self._server.ready = ready
        self._server.registry = registry
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="sidecar-health", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self._server.server_close()
