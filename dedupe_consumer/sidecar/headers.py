"""How an :class:`~dedupe_consumer.models.Event` becomes the headers of one HTTP POST.

Kafka keys, IDs and header values are arbitrary bytes; HTTP header values are
not. A value is sent as it is when it is UTF-8 without control characters or
edge whitespace (which HTTP stacks reject or strip), and as base64 otherwise,
with a marker saying so, so the receiver always gets the exact bytes back.
Kafka header *names* that are not HTTP tokens are percent-encoded (UTF-8),
which is reversible with ``urllib.parse.unquote``.

The ``Idempotency-Key`` must be unique on its own, because receivers dedupe on
it alone: an ID that cannot travel as it is, *or that starts with* ``:``, is
sent as an RFC 8941 byte sequence, ``:`` + base64 + ``:``. A literal key never
starts with ``:`` and an encoded one always does, so two IDs never share a key
(``" pay-1"`` is ``:IHBheS0x:``, the ID ``IHBheS0x`` is ``IHBheS0x``).
"""

from __future__ import annotations

import base64
import re
from urllib.parse import quote

from dedupe_consumer.models import Event, as_bytes
from dedupe_consumer.sidecar.settings import SidecarSettings

HeaderList = list[tuple[bytes, bytes]]

_SAFE_VALUE = re.compile(
    rb"(?:[\x21-\x7e\x80-\xff](?:[\x20-\x7e\x80-\xff]*[\x21-\x7e\x80-\xff])?)?"
)
"""Empty, or visible ASCII/UTF-8 bytes with inner spaces only: no CTLs, no edge whitespace."""
_TOKEN_CHARS = "!#$&'*+-.^_`|~"
"""Characters of an HTTP token besides letters and digits; '%' is left out: it escapes."""
BASE64 = b"base64"
_SF_BINARY = b":"
"""Starts and ends an RFC 8941 byte sequence; a literal Idempotency-Key never starts with it."""


def header_safe(raw: bytes) -> bool:
    """True when ``raw`` can travel as an HTTP header value unchanged."""
    if _SAFE_VALUE.fullmatch(raw) is None:
        return False
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def http_name(kafka_name: str) -> str:
    """A Kafka header name as the rest of an HTTP header name (reversible)."""
    return quote(kafka_name, safe=_TOKEN_CHARS)


def _b64(raw: bytes) -> bytes:
    return base64.b64encode(raw)


def idempotency_key(event_id: str) -> bytes:
    """The ``Idempotency-Key`` of ``event_id``: injective, header-safe (module docstring)."""
    raw = event_id.encode("utf-8", "surrogatepass")  # a lone surrogate is an ID too
    if header_safe(raw) and raw and not raw.startswith(_SF_BINARY):
        return raw
    return _SF_BINARY + _b64(raw) + _SF_BINARY


def event_id_from_key(key: bytes) -> bytes:
    """The ID bytes behind an ``Idempotency-Key`` (the receiver's side of the rule)."""
    if key.startswith(_SF_BINARY) and key.endswith(_SF_BINARY) and len(key) >= 2:
        return base64.b64decode(key[1:-1], validate=True)
    return key


def request_headers(event: Event, settings: SidecarSettings) -> HeaderList:
    """Every header of the POST that delivers ``event`` (repeats and order kept).

    * ``Idempotency-Key``: :func:`idempotency_key` of the event ID;
    * ``Kafka-Topic``, ``Kafka-Partition``, ``Kafka-Offset``;
    * ``Kafka-Key`` when the message has a key (base64 plus
      ``Kafka-Key-Encoding: base64`` when not header-safe);
    * ``Kafka-Tombstone: true`` when the value is null (the body is then empty);
    * ``Content-Type``: the last ``content-type`` Kafka header, else the setting;
    * ``Authorization: Bearer ...`` when a token is configured;
    * each Kafka header as ``<header_prefix><name>``; values that are not
      header-safe are base64 and their HTTP names listed in ``Kafka-Headers-Base64``.
    """
    out: HeaderList = []
    out.append((b"Idempotency-Key", idempotency_key(event.id)))
    out += [
        (b"Kafka-Topic", event.topic.encode()),
        (b"Kafka-Partition", str(event.partition).encode()),
        (b"Kafka-Offset", str(event.offset).encode()),
    ]
    if event.key is not None:
        if header_safe(event.key):
            out.append((b"Kafka-Key", event.key))
        else:
            out += [(b"Kafka-Key", _b64(event.key)), (b"Kafka-Key-Encoding", BASE64)]
    if event.value is None:
        out.append((b"Kafka-Tombstone", b"true"))

    content_type = settings.content_type.encode()
    forwarded: HeaderList = []
    encoded: list[bytes] = []
    for name, value in event.headers:
        raw = as_bytes(value) or b""  # as_bytes: a header_pairs() shortcut may pass str through
        if name.lower() == "content-type" and raw and header_safe(raw):
            content_type = raw
        http = (settings.header_prefix + http_name(name)).encode()
        if header_safe(raw):
            forwarded.append((http, raw))
        else:
            forwarded.append((http, _b64(raw)))
            encoded.append(http)
    out.append((b"Content-Type", content_type))
    if settings.bearer_token is not None:
        out.append(
            (b"Authorization", b"Bearer " + settings.bearer_token.get_secret_value().encode())
        )
    out += forwarded
    if encoded:
        out.append((b"Kafka-Headers-Base64", b", ".join(dict.fromkeys(encoded))))
    return out
