"""The partitioners we compare against: Kafka's murmur2 and librdkafka's CRC32."""

from __future__ import annotations

import zlib

import pytest

from dedupe_consumer.partitioners import (
    java_partition,
    librdkafka_partition,
    murmur2,
    placed_by_a_common_partitioner,
)


@pytest.mark.parametrize(
    ("data", "expected"),
    [  # org.apache.kafka.common.utils.UtilsTest#testMurmur2 (signed int32 there)
        (b"21", -973932308),
        (b"foobar", -790332482),
        (b"a-little-bit-long-string", -985981536),
        (b"a-little-bit-longer-string", -1486304829),
        (b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8", -58897971),
        (b"abc", 479470107),
    ],
)
def test_murmur2_matches_kafkas_own_test_vectors(data: bytes, expected: int) -> None:
    assert murmur2(data) == expected & 0xFFFFFFFF


def test_a_key_is_placed_where_either_default_partitioner_puts_it() -> None:
    key, n = b"order-42", 12
    assert librdkafka_partition(key, n) == zlib.crc32(key) % n
    assert placed_by_a_common_partitioner(key, java_partition(key, n), n)
    assert placed_by_a_common_partitioner(key, librdkafka_partition(key, n), n)
    others = set(range(n)) - {java_partition(key, n), librdkafka_partition(key, n)}
    assert others and not any(placed_by_a_common_partitioner(key, p, n) for p in others)
    assert placed_by_a_common_partitioner(key, 0, 1)  # one partition: nothing to get wrong
