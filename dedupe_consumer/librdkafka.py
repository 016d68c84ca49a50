"""librdkafka property scopes, for the one connection config every client shares.

From librdkafka's CONFIGURATION.md: a property is global (``*``, any client),
consumer-only (``C``) or producer-only (``P``). ``KafkaSettings.connection()``
gives every client the ``[kafka.consumer]`` properties that are neither, so a
producer or admin client connects exactly as the main consumer does, including
global properties this list has never heard of.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

CONSUMER_ONLY = frozenset(
    {
        "group.id",
        "group.instance.id",
        "partition.assignment.strategy",
        "session.timeout.ms",
        "heartbeat.interval.ms",
        "group.protocol.type",
        "group.protocol",
        "group.remote.assignor",
        "coordinator.query.interval.ms",
        "max.poll.interval.ms",
        "enable.auto.commit",
        "auto.commit.enable",
        "auto.commit.interval.ms",
        "enable.auto.offset.store",
        "queued.min.messages",
        "queued.max.messages.kbytes",
        "fetch.wait.max.ms",
        "fetch.queue.backoff.ms",
        "fetch.message.max.bytes",
        "max.partition.fetch.bytes",
        "fetch.max.bytes",
        "fetch.min.bytes",
        "fetch.error.backoff.ms",
        "offset.store.method",
        "offset.store.path",
        "offset.store.sync.interval.ms",
        "isolation.level",
        "enable.partition.eof",
        "check.crcs",
        "auto.offset.reset",
        "consume.callback.max.messages",
    }
)
"""librdkafka's consumer-only properties (scope ``C`` in its CONFIGURATION.md)."""
PRODUCER_ONLY = frozenset(
    {
        "transactional.id",
        "transaction.timeout.ms",
        "enable.idempotence",
        "enable.gapless.guarantee",
        "queue.buffering.max.messages",
        "queue.buffering.max.kbytes",
        "queue.buffering.max.ms",
        "linger.ms",
        "message.send.max.retries",
        "retries",
        "queue.buffering.backpressure.threshold",
        "compression.codec",
        "compression.type",
        "compression.level",
        "batch.num.messages",
        "batch.size",
        "delivery.report.only.error",
        "sticky.partitioning.linger.ms",
        "request.required.acks",
        "acks",
        "request.timeout.ms",
        "message.timeout.ms",
        "delivery.timeout.ms",
        "queuing.strategy",
        "produce.offset.report",
        "partitioner",
    }
)
"""librdkafka's producer-only properties (scope ``P``): never taken from [kafka.consumer]."""


DURABLE_PRODUCER: Final[Mapping[str, str | bool]] = {"enable.idempotence": True, "acks": "all"}
"""Set last on every producer the library makes (dead letters, changelog, the hop): a
record acknowledged by the partition leader alone is lost when that broker dies before
a follower copied it, and a retry after a leader change must not write it twice."""

_ALL_ACKS: Final = frozenset({"all", "-1"})
_TRUE: Final = frozenset({"true", "1"})


def weakened_durability(properties: Mapping[str, object]) -> list[str]:
    """The producer properties in ``properties`` that would weaken :data:`DURABLE_PRODUCER`,
    each as ``key = value``: ``acks`` (or its alias ``request.required.acks``) other than
    ``all``/``-1``, ``enable.idempotence`` false."""
    found = [
        f"{key} = {properties[key]!r}"
        for key in ("acks", "request.required.acks")
        if key in properties and str(properties[key]).strip().lower() not in _ALL_ACKS
    ]
    idempotence = properties.get("enable.idempotence")
    if idempotence is not None and str(idempotence).strip().lower() not in _TRUE:
        found.append(f"enable.idempotence = {idempotence!r}")
    return found
