"""CloudEvents on Kafka: the attributes of an event in binary or structured content mode.

The Kafka protocol binding of CloudEvents puts an event's attributes either in
``ce_*`` headers with the data as the value (binary mode) or in a JSON envelope
that is the whole value, announced by ``content-type: application/cloudevents+json``
(structured mode). The ``cloudevents`` SDK parses both; this module keeps it at the
edge and turns what it raises into this library's outcomes.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from dedupe_consumer.errors import ConfigError
from dedupe_consumer.ids import InvalidPayload, MissingId
from dedupe_consumer.models import SourceMessage, as_bytes, header_pairs

STRUCTURED_CONTENT_TYPE = "application/cloudevents"
"""The media type prefix of structured mode (``+json`` is the format this library reads)."""

_CORE = frozenset(
    {"id", "source", "type", "specversion", "subject", "time", "datacontenttype", "dataschema"}
)


@dataclass(frozen=True, slots=True)
class CloudEvent:
    """The context attributes of a CloudEvent, as ``event.cloudevent`` shows them."""

    id: str
    source: str
    type: str
    specversion: str
    subject: str | None = None
    time: datetime | None = None
    datacontenttype: str | None = None
    dataschema: str | None = None
    extensions: Mapping[str, Any] = field(default_factory=dict)
    """Every other attribute, as the event carries it (``ce_*`` headers or the envelope)."""
    structured: bool = False
    """True when the event came as a structured-mode JSON envelope."""


@dataclass(frozen=True, slots=True)
class OpenedCloudEvent:
    """A CloudEvent and its data: the message value (binary mode), or the envelope's
    ``data`` (parsed JSON) or ``data_base64`` (bytes) in structured mode."""

    event: CloudEvent
    data: Any
    data_is_bytes: bool


def is_structured(message: SourceMessage) -> bool:
    """True when the message announces a structured-mode envelope (its content type)."""
    return _structured(_headers(message))


def _headers(message: SourceMessage) -> dict[str, bytes]:
    """The ``ce_*`` and ``content-type`` headers, names lower-cased, the last one winning."""
    headers: dict[str, bytes] = {}
    for name, header in header_pairs(message):
        lower = name.lower()
        if header is not None and (lower.startswith("ce_") or lower == "content-type"):
            headers[lower] = header
    return headers


def _structured(headers: dict[str, bytes]) -> bool:
    content_type = headers.get("content-type")
    return content_type is not None and content_type.lower().startswith(_STRUCTURED)


_STRUCTURED = STRUCTURED_CONTENT_TYPE.encode()


def open_cloudevent(message: SourceMessage) -> OpenedCloudEvent:
    """The CloudEvent a message carries, in either content mode.

    Raises :class:`MissingId` when ``id`` or ``source`` is absent or empty (the
    event has no identity), and :class:`InvalidPayload` for anything else the spec
    forbids (no ``type``, a bad ``time``, an envelope that is not JSON).
    """
    binding, json_format = _sdk()
    value = as_bytes(message.value())
    headers = _headers(message)
    structured = _structured(headers)
    if structured:
        # Checked before the SDK reads it: the SDK invents an id (and a time) that an
        # event lacks, and an invented id would make every copy of it a new event.
        envelope = _envelope(value)
        _require_identity(envelope.get("id"), envelope.get("source"), "the envelope")
        _check_base64(envelope.get("data_base64"))
        has_time = "time" in envelope
        raw = binding.KafkaMessage(headers={}, key=None, value=value or b"")
        reader = binding.from_structured
    else:
        if not any(name.startswith("ce_") for name in headers):
            raise MissingId(
                "not a CloudEvent: no ce_* headers (binary mode) and no content-type "
                f"{STRUCTURED_CONTENT_TYPE}+json (structured mode)"
            )
        _require_identity(headers.get("ce_id"), headers.get("ce_source"), "the ce_ headers")
        has_time = "ce_time" in headers
        # The data stays ours: an empty value asks the SDK for the attributes alone.
        raw = binding.KafkaMessage(headers=headers, key=None, value=b"")
        reader = binding.from_binary
    try:
        parsed = reader(raw, json_format)
    except Exception as bad:  # whatever the SDK raises, the input is at fault
        mode = "structured" if structured else "binary"
        raise InvalidPayload(f"not a valid CloudEvent ({mode} mode): {bad}") from bad
    attributes = dict(parsed.get_attributes())
    time = attributes.get("time") if has_time else None  # never the SDK's "now"
    event = CloudEvent(
        id=str(attributes["id"]),
        source=str(attributes["source"]),
        type=str(attributes.get("type", "")),
        specversion=str(attributes.get("specversion", "")),
        subject=_text(attributes.get("subject")),
        time=time if isinstance(time, datetime) else None,
        datacontenttype=_text(attributes.get("datacontenttype")),
        dataschema=_text(attributes.get("dataschema")),
        extensions={k: v for k, v in attributes.items() if k not in _CORE},
        structured=structured,
    )
    if not structured:
        return OpenedCloudEvent(event, value, True)
    data = parsed.get_data()
    return OpenedCloudEvent(event, data, isinstance(data, bytes | None))


@functools.cache
def _sdk() -> tuple[Any, Any]:
    """The SDK's Kafka binding and a JSON format (an optional extra, imported on first use)."""
    try:
        from cloudevents.core.bindings import kafka as binding
        from cloudevents.core.formats.json import JSONFormat
    except ImportError as missing:
        raise ConfigError(
            "dedupe.id_source = 'cloudevents' needs the cloudevents SDK: "
            "pip install 'dedupe-consumer[cloudevents]'"
        ) from missing
    return binding, JSONFormat()


def _envelope(value: bytes | None) -> dict[str, Any]:
    if value is None:
        raise InvalidPayload("a structured CloudEvent with no value (the envelope is absent)")
    try:
        envelope = json.loads(value)
    except (ValueError, UnicodeDecodeError, RecursionError) as bad:
        raise InvalidPayload(f"the CloudEvent envelope is not JSON ({bad})") from bad
    if not isinstance(envelope, dict):
        raise InvalidPayload(
            f"the CloudEvent envelope is a JSON {type(envelope).__name__}, not an object"
        )
    return envelope


def _check_base64(data: object) -> None:
    """The SDK decodes ``data_base64`` leniently: "!!!!" would become empty data."""
    if isinstance(data, str):
        try:
            base64.b64decode(data, validate=True)
        except binascii.Error as bad:
            raise InvalidPayload(f"the CloudEvent's data_base64 is not base64 ({bad})") from bad


def _require_identity(event_id: object, source: object, where: str) -> None:
    for name, present in (("id", event_id), ("source", source)):
        if present is None or present in (b"", ""):
            raise MissingId(f"CloudEvent without {name!r} in {where}")


def _text(value: object) -> str | None:
    return None if value is None else str(value)
