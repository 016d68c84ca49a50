"""Topic scope (``dedupe.scope = "topic"``): one success per ID across a topic's partitions.

With the default partition scope, one success per ID holds per topic-partition:
it relies on every producer putting an ID on the same partition, which two
partitioners (Java's murmur2, librdkafka's CRC32), a topic that gained
partitions or a re-publisher keyed by something else all defeat quietly.

Topic scope puts every copy of an ID on one partition itself. A hop
(:class:`dedupe_consumer.kafka.repartition.Repartitioner`) reads each source
topic ``T`` in the consumer group and writes every message, byte for byte with
its headers and timestamp, to ``T``'s *by-id topic*, on the partition
:func:`id_partition` names; the re-produce and the source offsets commit in one
Kafka transaction. The engine then consumes the by-id topics, in the group
:func:`stage_group`, as it consumes any topic: the same dedupe, per by-id
partition, now holds per topic.

The hop appends one header, :data:`ORIGIN_HEADER`, with where the message was
read; the handler's :class:`~dedupe_consumer.Event` shows those coordinates and
the message's own headers, without it (:func:`split_origin`).

This module is the part without Kafka: names, the partition of an ID, the
origin header. See ``docs/scope.md`` for when to choose which scope.
"""

from __future__ import annotations

from collections.abc import Sequence

from dedupe_consumer.config import Settings
from dedupe_consumer.errors import ConfigError
from dedupe_consumer.ids import IdExtractor, MissingId, hash_id
from dedupe_consumer.models import SourceMessage
from dedupe_consumer.partitioners import java_partition
from dedupe_consumer.store.changelog_codec import internal_topic

ORIGIN_HEADER = "dedupe.origin"
"""Appended by the hop: ``<partition>/<offset>/<timestamp ms>/<topic>`` of the source
message (UTF-8; the timestamp ``-1`` when it had none). The by-id topics stamp messages
with their append time, so their retention counts from the hop, not from the source's
timestamps: the source's is kept here for the handler."""

_BY_ID_SUFFIX = "dedupe-by-id"
_STAGE_SUFFIX = ".by-id"

Origin = tuple[str, int, int, int | None]
"""Where a message was read: topic, partition, offset, and its timestamp (ms) there."""


def by_id_topic(group_id: str, topic: str) -> str:
    """The by-id topic of source ``topic`` in group ``group_id`` (named like the changelog)."""
    return internal_topic(group_id, topic, _BY_ID_SUFFIX)


def is_by_id_topic(name: str) -> bool:
    """Whether ``name`` is a by-id topic (its suffix is ours)."""
    return name.endswith("." + _BY_ID_SUFFIX)


def stage_group(group_id: str) -> str:
    """The group that dedupes the by-id topics: the hop keeps ``group_id`` itself, so the
    source offsets a partition-scope consumer committed are where the hop starts."""
    return group_id + _STAGE_SUFFIX


def stage_settings(settings: Settings) -> Settings:
    """``settings`` for the dedupe stage: the by-id topics, in :func:`stage_group`, read
    committed (what an aborted hop transaction wrote is never seen)."""
    kafka = settings.kafka
    isolation = kafka.consumer.get("isolation.level", "read_committed")
    if isolation != "read_committed":
        raise ConfigError(
            f"kafka.consumer isolation.level = {isolation!r} with dedupe.scope = 'topic': the "
            "dedupe stage must read the by-id topics read_committed, or it would handle what "
            "an aborted hop transaction wrote; remove the property"
        )
    return settings.model_copy(
        update={
            "kafka": kafka.model_copy(
                update={
                    "group_id": stage_group(kafka.group_id),
                    "topics": [by_id_topic(kafka.group_id, t) for t in kafka.topics],
                    "consumer": {**kafka.consumer, "isolation.level": "read_committed"},
                    # The by-id topics hold the only copy of what the hop moved (its source
                    # offsets are committed): a new stage group starts at their beginning.
                    # kafka.auto_offset_reset is where the hop starts on the source.
                    "auto_offset_reset": "earliest",
                }
            )
        }
    )


def id_partition(event_id: str, partitions: int) -> int:
    """The by-id partition of ``event_id``: what a Java producer keyed by the ID picks
    (murmur2 of its UTF-8 bytes), so a Java or Kafka Streams job can write there too."""
    return java_partition(event_id.encode(), partitions)


def route_id(extract: IdExtractor, on_missing_id: str, message: SourceMessage) -> str | None:
    """The event ID the dedupe stage will find in ``message`` (``on_missing_id = "hash"``
    included), or None when it will find none (it applies ``on_missing_id`` then)."""
    try:
        return extract(message)
    except MissingId:
        if on_missing_id != "hash":
            return None
        try:
            return hash_id(message)
        except MissingId:
            return None
    except Exception:  # unreadable: the stage dead-letters it with the reason
        return None


def by_id_partition(
    extract: IdExtractor, on_missing_id: str, message: SourceMessage, partitions: int
) -> int:
    """Where the hop puts ``message`` in a by-id topic of ``partitions``: its ID's
    partition; without an ID (the stage applies ``on_missing_id``), any will do."""
    event_id = route_id(extract, on_missing_id, message)
    if event_id is None:
        return (message.partition() or 0) % partitions
    return id_partition(event_id, partitions)


def origin_header(message: SourceMessage) -> tuple[str, bytes]:
    """The header the hop appends to ``message``'s copy: where and when it was read."""
    kind, stamp = message.timestamp()
    origin = encode_origin(
        message.topic() or "",
        message.partition() or 0,
        message.offset() or 0,
        stamp if kind else None,
    )
    return ORIGIN_HEADER, origin


def encode_origin(topic: str, partition: int, offset: int, timestamp_ms: int | None) -> bytes:
    stamp = -1 if timestamp_ms is None or timestamp_ms < 0 else timestamp_ms
    return f"{partition}/{offset}/{stamp}/{topic}".encode()


def split_origin(
    headers: Sequence[tuple[str, bytes | None]],
) -> tuple[tuple[tuple[str, bytes | None], ...], Origin | None]:
    """The message's own headers and where the hop read it, from a by-id message's headers.

    Only the last header counts (the hop appends it): one the producer sent is the
    message's own. Without a readable one: the headers as they are, and None.
    """
    if not headers or headers[-1][0] != ORIGIN_HEADER:
        return tuple(headers), None
    raw = headers[-1][1]
    try:
        partition, offset, stamp, topic = (raw or b"").decode().split("/", 3)
        ms = int(stamp)
        origin = (topic, int(partition), int(offset), None if ms < 0 else ms)
    except (UnicodeDecodeError, ValueError):
        return tuple(headers), None
    return tuple(headers[:-1]), origin
