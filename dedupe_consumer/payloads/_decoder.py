"""One message's payload, opened once: what the ID extractor and the handler both read."""

from __future__ import annotations

import base64
import json
import math
import threading
import uuid
from datetime import date, datetime
from datetime import time as dt_time
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Protocol

from dedupe_consumer.ids import IdExtractor, parse_id_source, reads_payload
from dedupe_consumer.models import SourceMessage, as_bytes
from dedupe_consumer.payloads._cloudevents import CloudEvent, open_cloudevent

if TYPE_CHECKING:
    from dedupe_consumer.config import PayloadSettings


class RecordDecoder(Protocol):
    """Decodes a value's bytes into a record (the Schema Registry formats: see
    :mod:`dedupe_consumer.kafka.schema_registry`)."""

    def decode(self, value: bytes | None, message: SourceMessage) -> Any: ...


_UNSET: Any = object()


class Decoded:
    """A message's payload: its CloudEvent attributes (``id_source = "cloudevents"``)
    and its record, decoded on first use and then kept, so an ID read from a field and
    the handler's payload come from one decoding.

    :meth:`record` is the value as the handler's ``parse`` takes it (bytes, or None)
    when :attr:`raw`; otherwise the decoded record: a dict (Avro, JSON Schema, a
    structured CloudEvent's JSON data) or a protobuf message.
    """

    __slots__ = ("_data", "_decoder", "_message", "_record", "cloudevent", "raw")

    def __init__(
        self,
        message: SourceMessage,
        decoder: RecordDecoder | None,
        cloudevent: CloudEvent | None = None,
        data: Any = _UNSET,
        data_is_bytes: bool = True,
    ) -> None:
        self._message = message
        self._decoder = decoder
        self.cloudevent = cloudevent
        self._data = as_bytes(message.value()) if data is _UNSET else data
        self.raw = decoder is None and data_is_bytes
        """True: the record is the raw bytes (no format decodes them)."""
        self._record: Any = self._data if self.raw or not data_is_bytes else _UNSET

    def content(self) -> bytes | None:
        """What copies of one event must agree on (a different one is a conflict): the
        value, or a structured CloudEvent's data alone: its envelope's other attributes
        (``time`` above all) may differ between two sends of the same event."""
        if self.cloudevent is None or not self.cloudevent.structured:
            return as_bytes(self._message.value())
        data = self._data
        if data is None or isinstance(data, bytes):
            return data
        return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()

    def record(self) -> Any:
        """The decoded record; raises ``InvalidPayload`` (or its ``UnknownSchema``) for a
        record that cannot be decoded, ``SchemaRegistryUnavailableError`` when the
        registry stays unreachable. Decoded once: later calls return the same object."""
        if self._record is _UNSET:
            assert self._decoder is not None
            self._record = self._decoder.decode(self._data, self._message)
        return self._record


class PayloadDecoder:
    """Opens messages as ``[payload]`` and ``dedupe.id_source`` say."""

    def __init__(self, registry: RecordDecoder | None = None, *, cloudevents: bool = False):
        self.registry = registry
        self.cloudevents = cloudevents

    @classmethod
    def from_settings(
        cls,
        payload: PayloadSettings,
        *,
        cloudevents: bool,
        stopping: threading.Event | None = None,
    ) -> PayloadDecoder:
        """``stopping``: the consumer's stop request, which ends a wait for the registry."""
        registry = None
        if payload.format != "raw":
            from dedupe_consumer.kafka.schema_registry import RegistryDecoder

            assert payload.schema_registry_url is not None  # the settings check it
            auth = payload.schema_registry_basic_auth
            registry = RegistryDecoder(
                payload.format,
                payload.schema_registry_url,
                basic_auth=None if auth is None else auth.get_secret_value(),
                ca_location=payload.schema_registry_ca_location,
                protobuf_message=payload.protobuf_message,
                retry_for_s=payload.registry_retry_for.total_seconds(),
                stopping=stopping,
            )
        return cls(registry, cloudevents=cloudevents)

    @property
    def plain(self) -> bool:
        """Nothing to open: the handler's ``parse`` reads the raw value."""
        return self.registry is None and not self.cloudevents

    def open(self, message: SourceMessage) -> Decoded:
        """The message's payload; a CloudEvent's attributes are read now (raising
        ``MissingId`` or ``InvalidPayload``), its record when first asked for."""
        if not self.cloudevents:
            return Decoded(message, self.registry)
        opened = open_cloudevent(message)
        return Decoded(message, self.registry, opened.event, opened.data, opened.data_is_bytes)


def id_reader(id_source: str, payload: PayloadSettings) -> IdExtractor:
    """``id_source``'s extractor, opening the payload itself when the ID is in it: for the
    readers that need only the ID (the topic-scope hop, replay, ``analyze``); the engine
    opens each payload once for the ID and the handler instead."""
    extract = parse_id_source(id_source)
    if not reads_payload(extract):
        return extract
    payloads = PayloadDecoder.from_settings(payload, cloudevents=id_source == "cloudevents")

    def read(message: SourceMessage, decoded: Decoded | None = None, /) -> str:
        return extract(message, payloads.open(message) if decoded is None else decoded)

    return read


def record_json(record: Any) -> bytes:
    """A decoded record as JSON text: protobuf messages by field name, bytes as base64,
    decimals, dates, times and UUIDs as strings (the sidecar's body for a decoded value)."""
    if hasattr(record, "DESCRIPTOR"):
        record = proto_dict(record)
    return json.dumps(
        _finite(record), default=_json_default, separators=(",", ":"), allow_nan=False
    ).encode()


def proto_dict(message: Any) -> dict[str, Any]:
    """A protobuf message's fields by name, those at their default (0, "") included:
    proto3 does not tell an unset scalar from a zero one."""
    from google.protobuf.json_format import MessageToDict

    fields: dict[str, Any] = MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    return fields


def _finite(value: Any) -> Any:
    """``value`` with NaN and the infinities as the strings protobuf's JSON uses: JSON
    has no such numbers."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _json_default(value: object) -> object:
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    if isinstance(value, datetime | date | dt_time):
        return value.isoformat()
    if isinstance(value, Decimal | uuid.UUID):
        return str(value)
    if hasattr(value, "DESCRIPTOR"):
        return proto_dict(value)
    raise TypeError(f"a {type(value).__name__} cannot be written as JSON")
