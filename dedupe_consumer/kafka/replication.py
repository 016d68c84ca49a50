"""How durable the library's own writes are: its topics' replication and its producers' acks.

Every topic the library creates (the changelog, the dead-letter topic, the by-id
topics of topic scope, output topics of ``processing.create_output_topics``) gets
:func:`replication_factor`: three replicas, or as many as the cluster has brokers
when it has fewer. Not the broker's ``default.replication.factor``: Kafka's own
default for it is 1, and a changelog or dead-letter topic with one replica loses
acknowledged records with that one broker's disk.

Every producer of the library's writes with ``acks=all`` and idempotence
(:data:`dedupe_consumer.librdkafka.DURABLE_PRODUCER`): a dead letter or a changelog
record acknowledged by the leader alone is lost when that leader dies before a
follower copied it, and a retry after a leader change must not write it twice.
``KafkaSettings`` refuses a ``[kafka.producer]`` that would weaken either.
"""

from __future__ import annotations

from typing import Any, Final

import structlog

__all__ = ["MAX_REPLICATION_FACTOR", "replication_factor", "warn_if_under_replicated"]

log = structlog.get_logger(__name__)

MAX_REPLICATION_FACTOR: Final = 3
"""Replicas of a topic the library creates, on a cluster of at least this many brokers."""


def replication_factor(metadata: Any) -> int:
    """Replicas for a new topic on the cluster ``metadata`` describes (a confluent-kafka
    ``ClusterMetadata``): ``min(3, brokers)``; -1 (the broker's default) when the
    metadata names no broker.

    ``brokers`` counts the live brokers and those that hold a replica of any topic: the
    metadata lists only live ones, so during one broker's outage a topic created with
    the live count would keep one replica fewer for good. KRaft places a replica on a
    fenced broker (it copies the partition when it is back).
    """
    live = set(getattr(metadata, "brokers", None) or {})
    if not live:
        return -1
    known = set(live)
    for topic in (getattr(metadata, "topics", None) or {}).values():
        for partition in (getattr(topic, "partitions", None) or {}).values():
            known.update(getattr(partition, "replicas", None) or ())
    return min(MAX_REPLICATION_FACTOR, len(known))


def warn_if_under_replicated(metadata: Any, name: str, setting: str) -> None:
    """Log ``library_topic_under_replicated`` when the existing topic ``name`` (one of
    the library's, found in ``metadata``) has a partition with fewer replicas than
    :func:`replication_factor` would give it now: made by an older version (the
    broker default, Kafka's is 1) or by hand, it is used as it is, so say so."""
    topic = (getattr(metadata, "topics", None) or {}).get(name)
    wanted = replication_factor(metadata)
    partitions = getattr(topic, "partitions", None) or {}
    if not partitions or wanted < 0:
        return
    fewest = min(len(getattr(p, "replicas", None) or ()) for p in partitions.values())
    if fewest >= wanted:
        return
    log.warning(
        "library_topic_under_replicated",
        topic=name,
        setting=setting,
        replicas=fewest,
        wanted=wanted,
        consequence="a broker that dies with the only copies loses records the library "
        "was told were written (acks=all waits for the in-sync replicas there are)",
        fix=f"raise its replication factor to {wanted} with kafka-reassign-partitions.sh",
    )
