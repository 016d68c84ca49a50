"""The OpenTelemetry side of :mod:`dedupe_consumer.observability.tracing` (extra ``otel``).

Imported only when tracing is on. Spans follow OpenTelemetry's messaging
semantic conventions for a consumer's *process* span: kind ``CONSUMER``, named
``process <topic>``, with ``messaging.system = "kafka"``,
``messaging.destination.name``, ``messaging.destination.partition.id``,
``messaging.kafka.offset``, ``messaging.message.id`` (the event ID),
``messaging.consumer.group.name`` and ``messaging.operation.type = "process"``;
plus ``dedupe.decision`` and ``dedupe.retries``. The parent is the context of the
message's W3C ``traceparent``/``tracestate`` headers (the W3C propagator,
whatever ``OTEL_PROPAGATORS`` says: the header is what producers write).
"""

from __future__ import annotations

import inspect
import os
import socket
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, cast
from urllib.parse import urlsplit

import structlog
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from dedupe_consumer.config import TracingSettings
from dedupe_consumer.errors import ConfigError
from dedupe_consumer.models import SourceMessage, header_pairs
from dedupe_consumer.observability import tracing as _state
from dedupe_consumer.observability.tracing import EventSpan
from dedupe_consumer.redaction import redact

log = structlog.get_logger("dedupe_consumer.tracing")

_W3C = TraceContextTextMapPropagator()
_ROOT = Context()
"""The parent of a message without a ``traceparent``: a new trace, never whatever span
happens to be current on the thread."""
_DEFAULT_SERVICE = "dedupe-consumer"
_PROBE_TIMEOUT_S = 0.5


class OtelTracing:
    """:class:`~dedupe_consumer.observability.tracing.EventTracing` on a TracerProvider."""

    def __init__(self, provider: Any, *, owned: bool, group_id: str | None = None) -> None:
        """``owned``: made here, so shut down by :meth:`close`."""
        self.provider = provider
        self.owned = owned
        self._tracer = provider.get_tracer("dedupe_consumer")
        self._group = group_id
        self._closed = False

    def start(self, message: SourceMessage, offset: int, event_id: str | None) -> trace.Span:
        carrier: dict[str, str] = {}
        for name, value in header_pairs(message):
            lowered = name.lower()
            if value is not None and lowered in (_state.TRACEPARENT, _state.TRACESTATE):
                carrier[lowered] = value.decode("latin-1")
        parent = _W3C.extract(carrier) if carrier else _ROOT
        topic = message.topic() or ""
        attributes: dict[str, str | int] = {
            "messaging.system": "kafka",
            "messaging.operation.type": "process",
            "messaging.operation.name": "process",
            "messaging.destination.name": topic,
            "messaging.destination.partition.id": str(message.partition()),
            "messaging.kafka.offset": offset,
        }
        if event_id is not None:
            # A JSON ID may hold a lone surrogate ("\ud800"): OTLP needs UTF-8, so escape it.
            attributes["messaging.message.id"] = event_id.encode(
                "utf-8", "backslashreplace"
            ).decode("utf-8")
        if self._group is not None:
            attributes["messaging.consumer.group.name"] = self._group
        return cast(
            trace.Span,
            self._tracer.start_span(
                f"process {topic}", context=parent, kind=SpanKind.CONSUMER, attributes=attributes
            ),
        )

    def current(self, span: EventSpan) -> object:
        return otel_context.attach(trace.set_span_in_context(cast(trace.Span, span)))

    def restore(self, token: object) -> None:
        otel_context.detach(token)  # type: ignore[arg-type]

    def in_span(self, span: EventSpan, call: Callable[[Any], object]) -> Callable[[Any], object]:
        ctx = trace.set_span_in_context(cast(trace.Span, span))
        if inspect.iscoroutinefunction(call):  # stays one (inspect looks through partial)
            return partial(_awaited_in, ctx, call)
        return partial(_called_in, ctx, call)

    def traceparent(self, span: EventSpan) -> str | None:
        return _traceparent(cast(trace.Span, span).get_span_context())

    def end(
        self,
        event_span: EventSpan,
        decision: str,
        *,
        retries: int = 0,
        reason: str | None = None,
        error: str | None = None,
        first_offset: int | None = None,
        policy: str | None = None,
    ) -> None:
        span = cast(trace.Span, event_span)
        span.set_attribute("dedupe.decision", decision)
        span.set_attribute("dedupe.retries", retries)
        if first_offset is not None:
            span.set_attribute("dedupe.first_offset", first_offset)
        if policy is not None:
            span.set_attribute("dedupe.uncertain.policy", policy)
        if reason is not None:
            span.set_attribute("dedupe.dead_letter.reason", reason)
            if error is not None:
                span.set_attribute("error.type", error)
            span.set_status(Status(StatusCode.ERROR, f"dead-lettered: {reason}"))
        span.end()

    def flush(self) -> None:
        if not self.owned:
            return
        try:
            self.provider.force_flush()
        except Exception as failed:  # tracing never stops the consumer
            log.warning("tracing_flush_failed", error=f"{type(failed).__name__}: {failed}")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        _state._closed()
        if not self.owned:
            return
        try:
            self.provider.shutdown()  # flushes the batch processor first
        except Exception as failed:
            log.warning("tracing_shutdown_failed", error=f"{type(failed).__name__}: {failed}")


def _called_in(ctx: Context, call: Callable[[Any], object], arg: object) -> object:
    token = otel_context.attach(ctx)
    try:
        result = call(arg)
    finally:
        otel_context.detach(token)
    if result is not None and inspect.isawaitable(result):  # awaited elsewhere, later
        return _awaiting_in(ctx, result)
    return result


async def _awaited_in(
    ctx: Context, call: Callable[[Any], Awaitable[object]], arg: object
) -> object:
    token = otel_context.attach(ctx)
    try:
        return await call(arg)
    finally:
        otel_context.detach(token)


async def _awaiting_in(ctx: Context, awaitable: Awaitable[object]) -> object:
    token = otel_context.attach(ctx)
    try:
        return await awaitable
    finally:
        otel_context.detach(token)


def _traceparent(ctx: trace.SpanContext) -> str | None:
    if not ctx.is_valid:
        return None
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


def current_ids() -> tuple[str, str] | None:
    """``(trace_id, span_id)`` of the current span, hex; None when there is none."""
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return None
    return f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}"


def current_headers() -> list[tuple[str, str]]:
    carrier: dict[str, str] = {}
    _W3C.inject(carrier)
    return list(carrier.items())


def from_settings(settings: TracingSettings, *, group_id: str | None = None) -> OtelTracing:
    """See :func:`dedupe_consumer.observability.tracing.start_tracing`."""
    given = trace.get_tracer_provider()
    if not isinstance(given, trace.ProxyTracerProvider):  # the application's own set-up
        log.info("tracing_started", provider=type(given).__name__, owner="application")
        return OtelTracing(given, owned=False, group_id=group_id)
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    service = settings.service_name or os.environ.get("OTEL_SERVICE_NAME") or _DEFAULT_SERVICE
    provider = TracerProvider(
        resource=Resource.create({SERVICE_NAME: service}),
        sampler=ParentBased(TraceIdRatioBased(settings.sample_ratio)),
    )
    endpoint: str | None = None
    if settings.exporter == "otlp":
        endpoint, key = _endpoint(settings)
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ModuleNotFoundError as missing:
            if not (missing.name or "").startswith("opentelemetry"):
                raise
            raise ConfigError(_state.MISSING_OTEL) from None
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
        _probe(endpoint, key)
    elif settings.exporter == "console":
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    log.info(
        "tracing_started",
        exporter=settings.exporter,
        endpoint=None if endpoint is None else redact(endpoint),
        service_name=service,
        sample_ratio=settings.sample_ratio,
    )
    return OtelTracing(provider, owned=True, group_id=group_id)


def _endpoint(settings: TracingSettings) -> tuple[str, str]:
    """The traces URL and the key (setting or variable) it came from; a malformed one
    from the environment is a :class:`ConfigError` like one from the file, and so is
    an ``OTEL_*`` variable asking for OTLP over gRPC (every export would fail)."""
    for variable in ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
        protocol = os.environ.get(variable, "").strip().lower()
        if protocol and protocol != "http/protobuf":
            raise ConfigError(
                f"{variable} = {protocol!r}: tracing exports OTLP over HTTP (protobuf) only; "
                "unset it or set 'http/protobuf', and point tracing.endpoint at the "
                "collector's OTLP/HTTP traces URL (port 4318)"
            )
    if settings.endpoint is not None:
        return settings.endpoint, "tracing.endpoint"
    for variable, suffix in (
        ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", ""),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "/v1/traces"),
    ):
        value = os.environ.get(variable, "").strip()
        if value:
            url = value.rstrip("/") + suffix if suffix else value
            try:
                TracingSettings.model_validate({"endpoint": url})
            except ValueError:
                raise ConfigError(
                    f"{variable} = {redact(value)!r} is not an http:// or https:// URL: set it "
                    "to the "
                    "collector's OTLP/HTTP URL (e.g. 'http://127.0.0.1:4318'), or unset it and "
                    "set tracing.endpoint"
                ) from None
            return url, variable
    return "http://localhost:4318/v1/traces", "tracing.endpoint"


def _probe(endpoint: str, key: str) -> None:
    """One warning at start-up when nothing answers at ``endpoint`` (spans are dropped
    meanwhile; the consumer runs all the same: a collector may start later)."""
    parts = urlsplit(endpoint)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname or "", port), _PROBE_TIMEOUT_S):
            return
    except OSError as unreachable:
        log.warning(
            "tracing_endpoint_unreachable",
            endpoint=redact(endpoint),
            key=key,
            error=str(unreachable),
            consequence="spans are dropped until a collector answers there; start one, or "
            f"point {key} at the collector's OTLP/HTTP traces URL (port 4318)",
        )
