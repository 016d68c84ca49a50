"""Responses: what ``handle`` returns, kept with its ID record and sent as replies.

A handler may answer an event: ``handle`` returns bytes, text, a pydantic model
or a :class:`~dedupe_consumer.store.Response` (which may also name the reply's
topic and key). The answer is stored in the event's ID record (so it moves with
the partition in the changelog and expires with the ID), given to
``Handler.on_duplicate`` when a duplicate comes, and sent as a *reply*:

* to the response's own topic, else the request's ``reply-to`` header
  (``processing.reply_to_header``), else ``processing.reply_topic``; with none of
  them it is stored and not sent;
* keyed by the response's key, else the request's key; with the request's
  ``correlation-id`` header (``processing.correlation_header``) copied;
* as an output (``event.emit``): in the transaction that commits the event, so
  exactly once. With ``processing.reply_on_duplicate`` a duplicate request gets the
  stored response again, byte for byte, in the transaction that commits *its* offset.
"""

from __future__ import annotations

from collections.abc import Callable

from pydantic import BaseModel

from dedupe_consumer.config import ProcessingSettings
from dedupe_consumer.effects import Effects, OutputError, check_topic
from dedupe_consumer.models import Event
from dedupe_consumer.store.base import Response

__all__ = ["Response", "ResponseRefused", "as_response", "check_reply_to", "send_reply"]


class ResponseRefused(ValueError):
    """A response that cannot be stored: too large (``too_large``: dead-lettered as
    ``response-too-large``) or malformed (``permanent-error``). Never retried: the
    handler has run, and would answer the same."""

    def __init__(self, message: str, *, too_large: bool = False) -> None:
        super().__init__(message)
        self.too_large = too_large


def as_response(result: object, limit: int, limit_name: str) -> Response | None:
    """What ``handle`` returned, as a :class:`Response`; None for None and for what is
    not a response (other types are not stored: the engine warns once). ``limit``:
    the most bytes it may take, which ``limit_name`` sets."""
    if result is None or isinstance(result, bool):
        return None
    try:
        if isinstance(result, Response):
            response = _checked(result)
        elif isinstance(result, bytes | bytearray | memoryview):
            response = Response(bytes(result))
        elif isinstance(result, str):
            response = Response(result.encode())
        elif isinstance(result, BaseModel):
            response = Response(result.model_dump_json().encode())
        else:
            return None
    except ResponseRefused:
        raise
    except Exception as unencodable:  # lone surrogates, a model that cannot dump
        raise ResponseRefused(
            f"the handler's response cannot be encoded: {type(unencodable).__name__}: {unencodable}"
        ) from None
    if response.size > limit:
        raise ResponseRefused(
            f"the handler's response is {response.size} bytes (value, reply topic and key), "
            f"over {limit} bytes ({limit_name}): it is kept with the event's ID record, so "
            "it must stay small; return less (an ID or a status, not a document) or raise "
            "the setting",
            too_large=True,
        )
    return response


def _checked(response: Response) -> Response:
    value, topic, key = response
    if isinstance(value, str):
        value = value.encode()
    if isinstance(key, str):
        key = key.encode()
    if not isinstance(value, bytes) or not (key is None or isinstance(key, bytes)):
        raise ResponseRefused(
            "Response(value, topic, key): value must be bytes or str, key bytes, str or "
            f"None, not {type(value).__name__} and {type(key).__name__}"
        )
    if topic is not None and (not isinstance(topic, str) or not topic):
        raise ResponseRefused(f"Response.topic must be a non-empty string or None, not {topic!r}")
    return Response(value, topic, key)


def _header_topic(event: Event, processing: ProcessingSettings) -> str | None:
    raw = event.header(processing.reply_to_header)
    if raw is None:
        return None
    try:
        return raw.decode()
    except UnicodeDecodeError:
        raise OutputError(
            f"the request's {processing.reply_to_header!r} header is not UTF-8 text: "
            "no topic to reply to"
        ) from None


def check_reply_to(
    event: Event,
    processing: ProcessingSettings,
    refused: frozenset[str],
    topic_limit: Callable[[str], int | None] | None,
) -> None:
    """Before the handler is called: the request's reply-to header, when it has one,
    names a topic an output may go to (not ``refused``: the dead-letter topic and the
    topics this consumer reads) and that exists (``topic_limit``: never creates it, a
    requester does not choose what this consumer creates). Raises :class:`OutputError`."""
    topic = _header_topic(event, processing)
    if topic is None:
        return
    check_topic(topic, refused)
    if topic_limit is not None and topic_limit(topic) is None:
        raise OutputError(
            f"the request's {processing.reply_to_header!r} header names topic {topic!r}, "
            "which does not exist (a reply-to topic is never created by this consumer)"
        )


def send_reply(
    response: Response, event: Event, effects: Effects, processing: ProcessingSettings
) -> bool:
    """Emit ``response`` as the reply to ``event`` (see the module docstring); False when
    it has nowhere to go. Raises :class:`OutputError` like ``event.emit``."""
    topic = response.topic or _header_topic(event, processing) or processing.reply_topic
    if topic is None:
        return False
    name = processing.correlation_header
    correlation = event.header(name)
    headers = [] if correlation is None else [(name, correlation)]
    key = event.key if response.key is None else response.key
    effects.emit(topic, response.value, key, headers)
    return True
