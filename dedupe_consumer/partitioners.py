"""Where the common producers put a key: to see when dedupe per partition is defeated.

One success per ID holds per topic-partition, so it relies on every producer
putting an event's key on the same partition. Java clients hash keys with
murmur2; librdkafka (Python, Go, .NET, C) by default with CRC32. A message
whose partition matches neither for its topic's partition count was placed by
another rule (another partitioner, an explicit partition, a topic that gained
partitions): a re-send of its ID may land elsewhere and be handled again.
"""

from __future__ import annotations

import zlib

_M = 0x5BD1E995
_MASK = 0xFFFFFFFF


def murmur2(data: bytes) -> int:
    """Kafka's murmur2 (``org.apache.kafka.common.utils.Utils.murmur2``), as unsigned 32 bits."""
    length = len(data)
    h = (0x9747B28C ^ length) & _MASK
    whole = length - length % 4
    for i in range(0, whole, 4):
        k = int.from_bytes(data[i : i + 4], "little")
        k = (k * _M) & _MASK
        k ^= k >> 24
        k = (k * _M) & _MASK
        h = ((h * _M) & _MASK) ^ k
    rest = length % 4
    if rest == 3:
        h ^= data[whole + 2] << 16
    if rest >= 2:
        h ^= data[whole + 1] << 8
    if rest >= 1:
        h ^= data[whole]
        h = (h * _M) & _MASK
    h ^= h >> 13
    h = (h * _M) & _MASK
    h ^= h >> 15
    return h


def java_partition(key: bytes, partitions: int) -> int:
    """The Java producer's default partition for a non-null key (``toPositive(murmur2) % n``)."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions


def librdkafka_partition(key: bytes, partitions: int) -> int:
    """librdkafka's default (``consistent_random``) partition for a non-empty key."""
    return zlib.crc32(key) % partitions


def placed_by_a_common_partitioner(key: bytes, partition: int, partitions: int) -> bool:
    """Whether ``partition`` is where librdkafka's or Java's default would put ``key``."""
    if partitions <= 1:
        return True
    if librdkafka_partition(key, partitions) == partition:  # cheap: checked first
        return True
    return java_partition(key, partitions) == partition


def placing_rule(key: bytes, partition: int, partitions: int) -> str | None:
    """Which common partitioner alone puts ``key`` on ``partition``: ``"crc32"``
    (librdkafka's default) or ``"murmur2"`` (Java's); None when both or neither do.

    A topic with messages of both kinds has producers that disagree: the same key
    from each lands on two partitions (seen where two services in two languages
    write one topic)."""
    if partitions <= 1:
        return None
    crc = librdkafka_partition(key, partitions) == partition
    java = java_partition(key, partitions) == partition
    if crc == java:
        return None
    return "crc32" if crc else "murmur2"
