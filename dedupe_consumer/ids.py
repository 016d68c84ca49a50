"""Event-ID extraction: where an event's identity comes from.

The ID is what "at most once" is counted against, so a strategy must never
invent one silently: when the configured place holds nothing usable it raises
:class:`MissingId`, and the engine applies ``on_missing_id``.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from dedupe_consumer.models import DeadLetterReason, SourceMessage, as_bytes, header_pairs

if TYPE_CHECKING:
    from dedupe_consumer.payloads import Decoded

ID_SOURCE_FORMS = (
    "'header:<name>', 'key', 'json:/json/pointer', 'field:/path' (a field of the decoded "
    "record: payload.format), 'cloudevents' (source and id) or 'hash'"
)
MAX_ID_BYTES = 512
"""IDs are RocksDB keys, counted in UTF-8 bytes; a longer one is almost always a wrong id_source."""
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
"""C0/C1 control characters: an ID travels into log lines, HTTP headers and dead-letter headers."""


class MissingId(Exception):
    """The message has no usable event ID; ``str(exc)`` says why."""

    reason: DeadLetterReason = DeadLetterReason.MISSING_ID
    """The dead-letter reason (``dlq.reason``) when ``on_missing_id = "dead-letter"``."""


class InvalidId(MissingId):
    """An ID is there but cannot be stored: not UTF-8, over the byte limit, or has controls."""

    reason = DeadLetterReason.INVALID_ID


class InvalidPayload(MissingId):
    """``id_source = "json:..."`` and the value is not JSON: the payload is wrong, not its ID."""

    reason = DeadLetterReason.INVALID_PAYLOAD


class UnknownSchema(InvalidPayload):
    """``payload.format`` is a Schema Registry format and the registry does not know the
    schema ID the record names."""

    reason = DeadLetterReason.UNKNOWN_SCHEMA


class IdExtractor(Protocol):
    """Reads an event's ID from its message, or from its opened payload (``decoded``:
    given by the caller when :func:`reads_payload` says the extractor needs it)."""

    def __call__(self, message: SourceMessage, decoded: Decoded | None = None, /) -> str: ...


def parse_id_source(spec: str) -> IdExtractor:
    """Turn an ``id_source`` setting into an extractor; ``ValueError`` names the accepted forms."""
    if spec == "key":
        return key_id
    if spec == "hash":
        return hash_id
    if spec == "cloudevents":
        return cloudevent_id
    if spec.startswith("header:") and len(spec) > len("header:"):
        return HeaderId(spec.removeprefix("header:"))
    if spec.startswith("json:"):
        return JsonPointerId(parse_json_pointer(spec.removeprefix("json:")))
    if spec.startswith("field:"):
        return FieldId(parse_json_pointer(spec.removeprefix("field:"), form="field:/order/id"))
    raise ValueError(f"unknown id_source {spec!r}: use {ID_SOURCE_FORMS}")


def reads_payload(extract: IdExtractor) -> bool:
    """True when ``extract`` needs the opened payload (``field:``, ``cloudevents``)."""
    return extract is cloudevent_id or isinstance(extract, FieldId)


def _checked(raw: bytes | str | None, where: str) -> str:
    """The ID as text, only if it can be stored: UTF-8, 1..MAX_ID_BYTES bytes, no controls."""
    if raw is None:
        raise MissingId(f"{where} is absent")
    if isinstance(raw, bytes):
        data = raw
        try:
            text = raw.decode()
        except UnicodeDecodeError as exc:
            raise InvalidId(f"{where} is not UTF-8") from exc
    else:
        text = raw
        try:
            data = raw.encode()
        except UnicodeEncodeError as exc:  # a lone surrogate, e.g. JSON "\ud800"
            raise InvalidId(f"{where} is not valid Unicode (a lone surrogate)") from exc
    if not data:
        raise MissingId(f"{where} is empty")
    if len(data) > MAX_ID_BYTES:
        raise InvalidId(
            f"{where} is {len(data)} bytes long in UTF-8, over the limit of {MAX_ID_BYTES} bytes"
        )
    if _CONTROL.search(text) is not None:
        raise InvalidId(f"{where} contains control characters")
    return text


def key_id(message: SourceMessage, decoded: Decoded | None = None, /) -> str:
    return _checked(message.key(), "message key")


def hash_id(message: SourceMessage, decoded: Decoded | None = None, /) -> str:
    """sha256 of the raw value: identical payloads are the same event."""
    value = as_bytes(message.value())
    if value is None:
        raise MissingId("message value is absent, nothing to hash")
    return hashlib.sha256(value).hexdigest()


@dataclass(frozen=True, slots=True)
class HeaderId:
    name: str

    def __call__(self, message: SourceMessage, decoded: Decoded | None = None, /) -> str:
        found: bytes | None = None
        present = False
        for key, value in header_pairs(message):
            if key == self.name:
                found, present = value, True
        return _checked(found if present else None, f"header {self.name!r}")


def parse_json_pointer(pointer: str, form: str = "json:/payment/id") -> tuple[str, ...]:
    """RFC 6901: ``/a/b~1c`` is ``("a", "b/c")``."""
    if not pointer.startswith("/"):
        raise ValueError(f"bad JSON pointer {pointer!r}: it must start with '/', e.g. {form!r}")
    return tuple(p.replace("~1", "/").replace("~0", "~") for p in pointer[1:].split("/"))


@dataclass(frozen=True, slots=True)
class JsonPointerId:
    path: tuple[str, ...]

    def __call__(self, message: SourceMessage, decoded: Decoded | None = None, /) -> str:
        where = "json:/" + "/".join(self.path)
        value = message.value()
        if value is None:
            raise MissingId(f"{where}: message value is absent")
        try:
            node: object = json.loads(value)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise InvalidPayload(f"{where}: the value is not JSON ({exc})") from exc
        for part in self.path:
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                raise MissingId(f"{where} is absent")
        if isinstance(node, bool) or not isinstance(node, str | int):
            raise MissingId(f"{where} is a {type(node).__name__}, not a string or integer")
        return _checked(str(node), where)


@dataclass(frozen=True, slots=True)
class FieldId:
    """A field of the decoded record (``payload.format``, or a CloudEvent's JSON data):
    nested records, lists by index, protobuf messages; a null union branch is absent."""

    path: tuple[str, ...]

    def __call__(self, message: SourceMessage, decoded: Decoded | None = None, /) -> str:
        where = "field:/" + "/".join(self.path)
        if decoded is None:
            raise TypeError(f"id_source {where!r} reads the decoded payload: pass it")
        if decoded.raw:
            raise InvalidPayload(
                f"{where}: the value is not a decoded record (payload.format is 'raw' and "
                "it is not a structured CloudEvent's JSON data)"
            )
        node: object = decoded.record()
        for part in self.path:
            node = _child(node, part)
            if node is _ABSENT:
                raise MissingId(f"{where} is absent")
        if isinstance(node, uuid.UUID):
            node = str(node)
        if node is None:
            raise MissingId(f"{where} is null")
        if isinstance(node, bool) or not isinstance(node, str | int | bytes):
            raise MissingId(f"{where} is a {type(node).__name__}, not a string or integer")
        return _checked(node if isinstance(node, str | bytes) else str(node), where)


_ABSENT = object()


def _child(node: object, part: str) -> object:
    if isinstance(node, Mapping):
        return node.get(part, _ABSENT)
    if isinstance(node, Sequence) and not isinstance(node, str | bytes):
        if not (part.isascii() and part.isdigit()):  # int() takes "²" and "٣" too
            return _ABSENT
        index = int(part)
        return node[index] if index < len(node) else _ABSENT
    descriptor = getattr(node, "DESCRIPTOR", None)  # a protobuf message
    fields = getattr(descriptor, "fields_by_name", None)
    if fields is None or part not in fields:
        return _ABSENT
    field = fields[part]
    if getattr(field, "has_presence", False) and not node.HasField(part):  # type: ignore[attr-defined]
        return _ABSENT
    return getattr(node, part)


def cloudevent_id(message: SourceMessage, decoded: Decoded | None = None, /) -> str:
    """A CloudEvent's identity: its ``source`` and ``id`` together (the spec makes the
    pair unique), as the JSON array ``["<source>","<id>"]``: unambiguous whatever
    either contains."""
    if decoded is None or decoded.cloudevent is None:
        raise MissingId("not read as a CloudEvent (id_source = 'cloudevents')")
    event = decoded.cloudevent
    source = _checked(event.source, "CloudEvent source")
    event_id = _checked(event.id, "CloudEvent id")
    # json.dumps([source, event_id], ensure_ascii=False, separators=(",", ":")), faster
    pair = f"[{_json_string(source)},{_json_string(event_id)}]"
    return _checked(pair, "CloudEvent (source, id)")


_json_string = json.encoder.encode_basestring
"""A str as a JSON string literal, non-ASCII kept (C-accelerated)."""
