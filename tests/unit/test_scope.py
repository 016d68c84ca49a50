"""Topic scope's Kafka-free parts: names, the partition of an ID, the origin header."""

from __future__ import annotations

import re

import pytest

from dedupe_consumer import Settings
from dedupe_consumer.errors import ConfigError
from dedupe_consumer.ids import parse_id_source
from dedupe_consumer.partitioners import java_partition
from dedupe_consumer.replay import Record
from dedupe_consumer.scope import (
    ORIGIN_HEADER,
    by_id_topic,
    encode_origin,
    id_partition,
    route_id,
    split_origin,
    stage_group,
    stage_settings,
)
from dedupe_consumer.store.changelog_codec import changelog_topic


def settings(**dedupe: object) -> Settings:
    return Settings.load(
        kafka={
            "bootstrap_servers": "localhost:9092",
            "group_id": "pay",
            "topics": ["orders", "refunds"],
        },
        processing={"dead_letter_topic": "dlq"},
        dedupe=dedupe,
    )


def test_an_id_goes_where_a_java_producer_keyed_by_it_would_put_it() -> None:
    for event_id in ("order-1", "ü-2", "x" * 300):
        for n in (1, 4, 8, 12):
            assert id_partition(event_id, n) == java_partition(event_id.encode(), n)
            assert 0 <= id_partition(event_id, n) < n
    # (murmur2 itself is checked against Kafka's own vectors in test_partitioners.py)


def test_by_id_topics_are_legal_distinct_and_apart_from_changelogs() -> None:
    names = {
        by_id_topic("payments", "orders.v1"),
        by_id_topic("payments.orders", "v1"),
        by_id_topic("g", "t"),
        by_id_topic("grüppe with spaces", "t"),
        by_id_topic("g" * 300, "t"),
    }
    assert len(names) == 5
    for name in names:
        assert re.fullmatch(r"[A-Za-z0-9._-]{1,249}", name), name
        assert name.endswith(".dedupe-by-id")
    assert by_id_topic("g", "t") != changelog_topic("g", "t")


def test_the_stage_reads_the_by_id_topics_in_a_group_of_its_own() -> None:
    source = settings(scope="topic")
    stage = stage_settings(source)
    assert stage.kafka.group_id == stage_group("pay") == "pay.by-id"
    assert stage.kafka.topics == [by_id_topic("pay", "orders"), by_id_topic("pay", "refunds")]
    assert source.kafka.group_id == "pay" and source.kafka.topics == ["orders", "refunds"]
    assert stage.dedupe.scope == "topic" and stage.store == source.store


def test_scope_settings_are_checked() -> None:
    assert settings().dedupe.scope == "partition"
    with pytest.raises(Exception, match="scope"):
        settings(scope="cluster")
    with pytest.raises(Exception, match="scope_partitions"):
        settings(scope="topic", scope_partitions=0)


def test_only_the_last_origin_header_is_the_hops() -> None:
    own = [("event-id", b"a"), (ORIGIN_HEADER, b"9/9/forged")]  # sent by a producer
    hop = (ORIGIN_HEADER, encode_origin("orders.v1", 3, 12345, 1_700_000_000_123))
    headers, origin = split_origin([*own, hop])
    assert origin == ("orders.v1", 3, 12345, 1_700_000_000_123)
    assert headers == tuple(own)
    untimed = (ORIGIN_HEADER, encode_origin("a/b-not-legal-but-kept", 0, 0, None))
    assert split_origin([untimed])[1] == ("a/b-not-legal-but-kept", 0, 0, None)
    # Without the hop's header, the message's headers are left as they are.
    assert split_origin(own[:1]) == (tuple(own[:1]), None)
    assert split_origin([]) == ((), None)
    for bad in (b"x/1/2/t", b"1/t", b"1/2/t", b"1/2/z/t", b"\xff", None):
        assert split_origin([(ORIGIN_HEADER, bad)]) == (((ORIGIN_HEADER, bad),), None)


def test_the_hop_routes_by_the_id_the_stage_will_find() -> None:
    extract = parse_id_source("header:event-id")
    with_id = Record("t", 0, 0, key_=b"k", value_=b"v", headers_=[("event-id", b"abc")])
    without = Record("t", 0, 1, key_=b"k", value_=b"payload", headers_=[])
    empty = Record("t", 0, 2, key_=b"k", value_=None, headers_=[])
    assert route_id(extract, "dead-letter", with_id) == "abc"
    assert route_id(extract, "dead-letter", without) is None
    assert route_id(extract, "fail", without) is None
    hashed = route_id(extract, "hash", without)
    assert hashed is not None and len(hashed) == 64
    assert route_id(extract, "hash", empty) is None  # nothing to hash: the stage decides
    bad = Record("t", 0, 3, key_=b"k", value_=b"v", headers_=[("event-id", b"\x00ctl")])
    assert route_id(extract, "dead-letter", bad) is None


def test_scope_partitions_without_topic_scope_is_refused_with_the_fix() -> None:
    with pytest.raises(Exception, match=r"scope_partitions applies only with dedupe.scope"):
        settings(scope_partitions=8)
    assert settings(scope="topic", scope_partitions=8).dedupe.scope_partitions == 8


def test_the_stage_reads_committed_and_refuses_to_read_uncommitted() -> None:
    assert stage_settings(settings(scope="topic")).kafka.consumer["isolation.level"] == (
        "read_committed"
    )
    loose = Settings.load(
        kafka={
            "bootstrap_servers": "localhost:9092",
            "group_id": "pay",
            "topics": ["orders"],
            "consumer": {"isolation.level": "read_uncommitted"},
        },
        processing={"dead_letter_topic": "dlq"},
        dedupe={"scope": "topic"},
    )
    with pytest.raises(ConfigError, match=r"isolation\.level"):
        stage_settings(loose)
