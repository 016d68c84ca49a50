"""OpenTelemetry tracing, optional: one span per decided event (``[tracing]``, extra ``otel``).

This module never imports OpenTelemetry itself, so the package imports and runs
without it; the implementation (:mod:`dedupe_consumer.observability._otel`) is
imported by :func:`start_tracing` only when ``tracing.enabled`` is true. Off, the
engine holds ``None`` instead of an :class:`EventTracing` and pays one ``is not
None`` check per event; the log processor :func:`add_trace_ids` and
:func:`current_trace_headers` (the sidecar's) check one module-level counter.

What the engine asks of a tracer is :class:`EventTracing`: a span per event
(a child of the message's W3C ``traceparent`` header when it has one), made
current around the handler call, ended with the decision.
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from dedupe_consumer.errors import ConfigError

if TYPE_CHECKING:
    from dedupe_consumer.config import TracingSettings
    from dedupe_consumer.models import SourceMessage

MISSING_OTEL = (
    "tracing.enabled = true needs OpenTelemetry, which the core install leaves out: "
    "pip install 'dedupe-consumer[otel]' (or set tracing.enabled = false)"
)

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"

_live = 0
"""How many tracers are open in this process: logs and the sidecar look only then."""


class EventSpan(Protocol):
    """One event's span, as the engine holds it (an OpenTelemetry ``Span``)."""

    def is_recording(self) -> bool: ...


class EventTracing(Protocol):
    """What the engine asks of a tracer (see :mod:`dedupe_consumer.observability._otel`)."""

    def start(self, message: SourceMessage, offset: int, event_id: str | None) -> EventSpan:
        """A span for one event, its parent the message's ``traceparent`` (if any)."""

    def current(self, span: EventSpan) -> object:
        """Make ``span`` the current span; returns the token for :meth:`restore`."""

    def restore(self, token: object) -> None:
        """Undo :meth:`current`."""

    def in_span(self, span: EventSpan, call: Callable[[Any], object]) -> Callable[[Any], object]:
        """``call`` running with ``span`` current wherever it runs (a worker thread, the
        event loop, a coroutine awaited later)."""

    def traceparent(self, span: EventSpan) -> str | None:
        """``span`` as a W3C ``traceparent`` value (None: not a valid span)."""

    def end(
        self,
        span: EventSpan,
        decision: str,
        *,
        retries: int = 0,
        reason: str | None = None,
        error: str | None = None,
        first_offset: int | None = None,
        policy: str | None = None,
    ) -> None:
        """Set the decision and what goes with it, then end ``span``."""

    def flush(self) -> None:
        """Export what was ended (a provider made here); never raises."""

    def close(self) -> None:
        """Flush, and shut down a provider made here; never raises."""


def start_tracing(settings: TracingSettings, *, group_id: str | None = None) -> EventTracing:
    """The tracer ``settings`` ask for: the process's global TracerProvider when it has
    one (an application that set up OpenTelemetry itself), else one made here from
    ``exporter``, ``endpoint``, ``service_name`` and ``sample_ratio``.

    Raises :class:`ConfigError` when the ``otel`` extra is not installed."""
    try:
        from dedupe_consumer.observability import _otel
    except ModuleNotFoundError as missing:
        if not (missing.name or "").startswith("opentelemetry"):
            raise
        raise ConfigError(MISSING_OTEL) from None
    return _opened(_otel.from_settings(settings, group_id=group_id))


def for_provider(provider: object, *, group_id: str | None = None) -> EventTracing:
    """A tracer on ``provider`` (an OpenTelemetry ``TracerProvider``), which stays the
    caller's: :meth:`EventTracing.close` does not shut it down. For tests and for
    applications that keep their provider out of the global one."""
    try:
        from dedupe_consumer.observability import _otel
    except ModuleNotFoundError as missing:
        if not (missing.name or "").startswith("opentelemetry"):
            raise
        raise ConfigError(MISSING_OTEL) from None
    return _opened(_otel.OtelTracing(provider, owned=False, group_id=group_id))


def _opened(tracing: EventTracing) -> EventTracing:
    """Count ``tracing`` in until its ``close`` (see :func:`_closed`)."""
    global _live
    _live += 1
    return tracing


def _closed() -> None:
    global _live
    _live = max(0, _live - 1)


def tracing_on() -> bool:
    """Whether a tracer is open in this process."""
    return _live > 0


def add_trace_ids(
    logger: Any, name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """A structlog processor: ``trace_id`` and ``span_id`` (hex, as the W3C header
    writes them) of the current span, while tracing is on and a span is current."""
    if _live <= 0 or "trace_id" in event_dict:
        return event_dict
    from dedupe_consumer.observability import _otel

    ids = _otel.current_ids()
    if ids is not None:
        event_dict["trace_id"], event_dict["span_id"] = ids
    return event_dict


def current_trace_headers() -> Sequence[tuple[str, str]]:
    """``traceparent`` (and ``tracestate``) of the current span, to send on; empty while
    tracing is off or no span is current."""
    if _live <= 0:
        return ()
    from dedupe_consumer.observability import _otel

    return _otel.current_headers()
