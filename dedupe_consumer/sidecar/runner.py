"""Sidecar mode, wired: ``[sidecar]`` settings → handler → DedupeConsumer → health server.

There is one engine and one loop: the sidecar is the library's
:class:`~dedupe_consumer.DedupeConsumer` running an
:class:`~dedupe_consumer.sidecar.handler.HttpForwardHandler`. Delivery retries
are the engine's retries: ``sidecar.max_retries``, ``retry_backoff`` and
``retry_backoff_max`` are copied onto ``[processing]``, whose retry loop waits on
the stop event and, on SIGTERM, persists and commits only the events already
decided, so an event whose retries were cut short is delivered after restart.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from datetime import timedelta
from urllib.parse import urlsplit

import structlog

from dedupe_consumer._durations import format_duration
from dedupe_consumer.consumer import DedupeConsumer
from dedupe_consumer.errors import ConfigError
from dedupe_consumer.models import BatchStats, TopicPartition
from dedupe_consumer.observability import Metrics
from dedupe_consumer.sidecar.handler import HttpForwardHandler
from dedupe_consumer.sidecar.health import BrokerCheck, HealthServer, Readiness
from dedupe_consumer.sidecar.metrics import SidecarMetrics
from dedupe_consumer.sidecar.settings import SidecarAppSettings, SidecarSettings

log = structlog.get_logger("dedupe_consumer.sidecar")

RETRY_KEYS = ("max_retries", "retry_backoff", "retry_backoff_max")
"""``[sidecar]`` keys that replace the ``[processing]`` keys of the same name."""


def _shown(value: object) -> str:
    return format_duration(value) if isinstance(value, timedelta) else repr(value)


def sidecar_settings(
    settings: SidecarAppSettings,
) -> tuple[SidecarAppSettings, SidecarSettings]:
    """The settings the engine runs with in sidecar mode, and the ``[sidecar]`` section.

    Raises ConfigError when there is no ``[sidecar]`` section, or when
    ``[processing]`` explicitly sets a retry key to another value than
    ``[sidecar]`` does: one of them would be silently ignored.
    """
    sidecar = settings.sidecar
    if sidecar is None:
        raise ConfigError(
            "the sidecar command needs a [sidecar] section with at least "
            'target_url = "http://127.0.0.1:8080/events" (see config/sidecar.toml)'
        )
    if settings.observability.metrics_port is not None:
        raise ConfigError(
            f"observability.metrics_port = {settings.observability.metrics_port}: the sidecar "
            "serves /metrics with its probes on sidecar.listen_host:sidecar.listen_port "
            f"({sidecar.listen_host}:{sidecar.listen_port}); remove metrics_port from "
            "[observability] (set sidecar.listen_host = '0.0.0.0' to let Prometheus scrape a pod)"
        )
    processing = settings.processing
    mapped = {key: getattr(sidecar, key) for key in RETRY_KEYS}
    clashes = [
        f"processing.{key} = {_shown(getattr(processing, key))} but sidecar.{key} = {_shown(value)}"
        for key, value in mapped.items()
        if key in processing.model_fields_set and getattr(processing, key) != value
    ]
    if clashes:
        raise ConfigError(
            "in sidecar mode the [sidecar] retry keys drive delivery retries; remove these "
            "from [processing] or make them equal:\n  - " + "\n  - ".join(clashes)
        )
    effective = settings.model_copy(update={"processing": processing.model_copy(update=mapped)})
    return effective, sidecar


def redacted(url: str) -> str:
    """``url`` without credentials or query, for logs."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


class Sidecar:
    """One sidecar process: the consumer on the calling thread, probes on a daemon thread.

    The consumer is the library's, unchanged; the sidecar registers hooks on it:

    * assignment hooks keep :attr:`assigned`, the partitions owned now, for
      ``/readyz`` (under a lock: the probe runs on another thread than the one that
      assigns);
    * a stop hook interrupts the handler's ``Retry-After`` wait.
    """

    def __init__(self, settings: SidecarAppSettings) -> None:
        effective, sidecar = sidecar_settings(settings)
        self.settings = effective
        self.sidecar = sidecar
        self.metrics = Metrics()
        self.handler = HttpForwardHandler(
            sidecar,
            metrics=SidecarMetrics(self.metrics.registry),
            connections=effective.processing.concurrency,
            decoded=None if effective.payload.format == "raw" else effective.payload.format,
        )
        self.consumer = DedupeConsumer(self.handler, effective, metrics=self.metrics)
        self._lock = threading.Lock()
        self._assigned: frozenset[TopicPartition] = frozenset()
        self.consumer.on_assign(self._gained)  # after the restore: ready means "deciding"
        self.consumer.on_revoke(self._gone)
        self.consumer.on_lost(self._gone)
        self.broker = BrokerCheck(settings.kafka.connection())
        try:
            self.health = HealthServer(
                sidecar.listen_host,
                sidecar.listen_port,
                ready=self.readiness,
                registry=self.metrics.registry,
            )
        except OSError as exc:
            raise ConfigError(
                f"sidecar.listen_host/listen_port: cannot listen on "
                f"{sidecar.listen_host}:{sidecar.listen_port}: {exc}"
            ) from None

    @property
    def assigned(self) -> frozenset[TopicPartition]:
        with self._lock:
            return self._assigned

    def _gained(self, tps: Sequence[TopicPartition]) -> None:
        with self._lock:
            self._assigned = self._assigned | set(tps)

    def _gone(self, tps: Sequence[TopicPartition]) -> None:
        with self._lock:
            self._assigned = self._assigned - set(tps)

    def readiness(self) -> Readiness:
        """Ready = not stopping, at least one partition assigned, a broker answering."""
        reasons: list[str] = []
        if self.consumer.stopping:
            reasons.append("stopping")
        partitions = sorted(str(tp) for tp in self.assigned)
        if not partitions:
            reasons.append("no partitions assigned")
        reachable, broker = self.broker()
        if not reachable:
            reasons.append(f"broker {broker}")
        return Readiness(
            not reasons, {"partitions": partitions, "broker": broker, "reasons": reasons}
        )

    def run(self, *, install_signal_handlers: bool = True) -> BatchStats:
        """Serve the probes and consume until stopped (SIGTERM/SIGINT or :meth:`stop`)."""
        self.health.start()
        log.info(
            "sidecar_started",
            target=redacted(self.sidecar.target_url),
            probes=f"http://{self.sidecar.listen_host}:{self.health.port}",
            max_retries=self.sidecar.max_retries,
        )
        try:
            return self.consumer.run(install_signal_handlers=install_signal_handlers)
        finally:
            self.health.close()
            self.broker.close()

    def stop(self) -> None:
        self.consumer.stop()
