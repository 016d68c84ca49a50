"""Poison events against a real broker: an error on behalf of one event is that event's.

Each poison is dead-lettered and the partition moves on; across three restarts
of a real ``DedupeConsumer`` every other event is handled exactly once and the
committed offset ends past the poison (issue 10, items 2 and 3), plus the
commit-on-stop and foreign-header guards.
"""

from __future__ import annotations

import ctypes
import glob
import os
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import confluent_kafka
import pytest
from confluent_kafka import Producer

from dedupe_consumer import DedupeConsumer, Event, Handler, PermanentError, Settings
from dedupe_consumer.engine import payload_digest
from dedupe_consumer.models import BatchStats, TopicPartition
from dedupe_consumer.store import IdRecord, RecordStatus, RocksStore, WriteSet
from dedupe_consumer.testing.pytest_plugin import TopicFactory

from ..kafka_helpers import committed_offsets, headers_of, read_all, settings_for

pytestmark = pytest.mark.kafka

BIG = 1_200_000
"""A value the source topic allows and a default dead-letter topic does not."""


class Counting(Handler):
    """Counts calls per ID; each poison fails in its own way."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.reconciled: Counter[str] = Counter()
        self.lock = threading.Lock()

    def parse(self, value: bytes | None) -> Any:
        if value is not None and value.startswith(b"parse-bomb"):
            raise TypeError("a parser bug, not a ValueError")
        return None

    def handle(self, event: Event) -> None:
        with self.lock:
            self.calls[event.id] += 1
        if event.id == "big":
            raise PermanentError("this one must go to the dead-letter topic")
        if event.id == "fat":
            event.stage(b"fat", b"x" * 2_000_000)  # too large for one changelog record
        else:
            event.stage(b"seen:" + event.id.encode(), b"1")

    def reconcile(self, event: Event) -> bool:
        with self.lock:
            self.reconciled[event.id] += 1
        raise ConnectionError("the downstream system cannot be asked")


class Watching(DedupeConsumer):
    """Stops after a few idle polls once its partitions are assigned (a quiet restart)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.assigned = False
        self.idle = 0
        self.on_assign(self._assigned)

    def _assigned(self, tps: Any) -> None:
        self.assigned = True

    def run_until_quiet(self, consumed: int = 0, timeout_s: float = 60) -> BatchStats:
        deadline = time.monotonic() + timeout_s

        def until(totals: BatchStats) -> bool:
            if totals.consumed >= consumed and self.assigned:
                self.idle += 1
            return self.idle >= 3 or time.monotonic() > deadline

        return self.run(until=until, install_signal_handlers=False)


def produce(bootstrap: str, topic: str, items: list[tuple[str | bytes, bytes]]) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "message.max.bytes": 2_000_000})
    for event_id, value in items:
        raw_id = event_id.encode() if isinstance(event_id, str) else event_id
        producer.produce(topic, value=value, key=b"k", headers=[("event-id", raw_id)])
    assert producer.flush(30) == 0


@pytest.mark.parametrize("refused_by", ["client", "broker"])
def test_every_poison_is_dead_lettered_and_the_partition_moves_on_across_restarts(
    kafka_bootstrap: str, kafka_topic: TopicFactory, tmp_path: Path, refused_by: str
) -> None:
    topic = kafka_topic(partitions=1, config={"max.message.bytes": "2000000"})
    dlq = kafka_topic(partitions=1, name=f"{topic}.dlq")  # default limits (~1 MB)
    events: list[tuple[str | bytes, bytes]] = [
        ("g0", b"{}"),
        ("big", b"b" * BIG),  # dead letter too large for the dead-letter topic
        ("g2", b"{}"),
        (b"\xed\xa0\x80", b"{}"),  # an ID that is not UTF-8 (an encoded lone surrogate)
        ("g4", b"{}"),
        ("pb", b"parse-bomb"),  # parse raises TypeError
        ("g6", b"{}"),
        ("fat", b"{}"),  # stages a value too large for the changelog
        ("g8", b"{}"),
        ("unsure", b"{}"),  # an uncertain claim whose reconcile() raises
        ("g10", b"{}"),
    ]
    produce(kafka_bootstrap, topic, events)
    producer = {"message.max.bytes": 2_000_000} if refused_by == "broker" else {}
    settings = settings_for(
        kafka_bootstrap,
        topic,
        tmp_path / "state",
        kafka={"producer": producer},
        processing={"mode": "claim", "on_uncertain": "reconcile", "max_retries": 1},
    )
    seed_uncertain_claim(settings, TopicPartition(topic, 0), "unsure", 9, b"{}")
    handler = Counting()

    for run in range(4):  # the first run, then three restarts
        consumer = Watching(handler, settings)
        totals = consumer.run_until_quiet(consumed=len(events) if run == 0 else 0)
        if run == 0:
            assert totals.consumed == len(events)
            assert totals.dead_lettered == 5
        else:
            assert totals.consumed == 0, f"restart {run} decided offsets again"

    good = {f"g{i}": 1 for i in range(0, 11, 2)}
    assert handler.calls == {**good, "big": 1, "fat": 2}
    assert handler.reconciled == {"unsure": 2}
    assert committed_offsets(kafka_bootstrap, settings.kafka.group_id, topic, 1) == {0: 11}

    letters = {m.offset(): m for m in read_all(kafka_bootstrap, dlq, 5)}
    by_source = {int(headers_of(m)["dlq.original.offset"]): m for m in letters.values()}
    reasons = {o: headers_of(m)["dlq.reason"].decode() for o, m in by_source.items()}
    assert reasons == {
        1: "permanent-error",
        3: "invalid-id",
        5: "invalid-payload",
        7: "retries-exhausted",
        9: "reconcile-failed",
    }
    big = by_source[1]
    assert big.value() is None
    assert headers_of(big)["dlq.value.omitted"] == b"too-large"
    assert headers_of(big)["dlq.value.size"] == str(BIG).encode()
    assert headers_of(by_source[5])["dlq.error.class"] == b"TypeError"


def seed_uncertain_claim(
    settings: Settings, tp: TopicPartition, event_id: str, offset: int, value: bytes
) -> None:
    """Leave the in-progress claim a crashed owner would have left (claim mode)."""
    store = RocksStore(settings.store.path, retention_ms=10**12)
    try:
        claim = IdRecord(
            RecordStatus.IN_PROGRESS,
            offset,
            int(time.time() * 1000) - 60_000,
            payload_digest(value),
        )
        store.persist(WriteSet(records={tp: [(event_id, claim)]}))
    finally:
        store.close()


class StopsAt(Handler):
    def __init__(self, stop_at: int) -> None:
        self.stop_at = stop_at
        self.calls: Counter[str] = Counter()
        self.consumer: DedupeConsumer | None = None

    def handle(self, event: Event) -> None:
        self.calls[event.id] += 1
        if event.offset == self.stop_at and self.consumer is not None:
            self.consumer.stop()  # mid-batch: this event is finished, the rest is not


def test_a_stop_mid_batch_commits_exactly_after_the_last_decided_event(
    kafka_bootstrap: str, kafka_topic: TopicFactory, tmp_path: Path
) -> None:
    topic = kafka_topic(partitions=1)
    produce(kafka_bootstrap, topic, [(f"e{i}", b"{}") for i in range(40)])
    settings = settings_for(kafka_bootstrap, topic, tmp_path / "state")
    handler = StopsAt(stop_at=5)
    consumer = DedupeConsumer(handler, settings)
    handler.consumer = consumer
    totals = consumer.run(install_signal_handlers=False)
    assert totals.consumed == 6, "the whole batch was fetched; only its prefix is decided"
    assert committed_offsets(kafka_bootstrap, settings.kafka.group_id, topic, 1) == {0: 6}

    handler.stop_at = -1
    Watching(handler, settings).run_until_quiet(consumed=34)
    assert handler.calls == {f"e{i}": 1 for i in range(40)}
    assert committed_offsets(kafka_bootstrap, settings.kafka.group_id, topic, 1) == {0: 40}


# -- headers whose name is not UTF-8 (a foreign producer) -----------------------------------


def _librdkafka() -> ctypes.CDLL:
    """The librdkafka that confluent-kafka ships: its C API takes header names as bytes."""
    here = os.path.dirname(os.path.dirname(confluent_kafka.__file__))
    found = glob.glob(os.path.join(here, "confluent_kafka.libs", "librdkafka*"))
    if not found:
        found = glob.glob(os.path.join(here, "confluent_kafka", "*rdkafka*"))
    assert found, "no librdkafka next to confluent_kafka"
    return ctypes.CDLL(found[0])


class _Header(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char_p), ("val", ctypes.c_void_p), ("size", ctypes.c_ssize_t)]


class _Mem(ctypes.Structure):
    _fields_ = [("ptr", ctypes.c_void_p), ("size", ctypes.c_size_t)]


class _Value(ctypes.Union):
    _fields_ = [
        ("cstr", ctypes.c_char_p),
        ("i", ctypes.c_int),
        ("mem", _Mem),
        ("header", _Header),
        ("pad", ctypes.c_char * 64),
    ]


class _Vu(ctypes.Structure):
    _fields_ = [("vtype", ctypes.c_int), ("u", _Value)]


_TOPIC, _VALUE, _MSGFLAGS, _HEADER = 1, 4, 7, 9  # rd_kafka_vtype_t
_F_COPY = 0x2


def produce_with_raw_header_names(
    bootstrap: str, topic: str, value: bytes, headers: list[tuple[bytes, bytes]]
) -> None:
    """Produce one message through librdkafka's C API, header names as raw bytes."""
    lib = _librdkafka()
    lib.rd_kafka_conf_new.restype = ctypes.c_void_p
    lib.rd_kafka_conf_set.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_char_p]
    lib.rd_kafka_conf_set.argtypes += [ctypes.c_char_p, ctypes.c_size_t]
    lib.rd_kafka_new.restype = ctypes.c_void_p
    lib.rd_kafka_new.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t]
    lib.rd_kafka_produceva.restype = ctypes.c_void_p
    lib.rd_kafka_produceva.argtypes = [ctypes.c_void_p, ctypes.POINTER(_Vu), ctypes.c_size_t]
    lib.rd_kafka_flush.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.rd_kafka_outq_len.argtypes = [ctypes.c_void_p]
    lib.rd_kafka_destroy.argtypes = [ctypes.c_void_p]
    errstr = ctypes.create_string_buffer(512)
    conf = lib.rd_kafka_conf_new()
    lib.rd_kafka_conf_set(conf, b"bootstrap.servers", bootstrap.encode(), errstr, 512)
    rk = lib.rd_kafka_new(0, conf, errstr, 512)  # RD_KAFKA_PRODUCER
    assert rk, errstr.value
    keep: list[Any] = []
    vus = (_Vu * (3 + len(headers)))()
    vus[0].vtype, vus[0].u.cstr = _TOPIC, topic.encode()
    vus[1].vtype, vus[1].u.i = _MSGFLAGS, _F_COPY
    payload = ctypes.create_string_buffer(value, len(value))
    keep.append(payload)
    vus[2].vtype = _VALUE
    vus[2].u.mem.ptr, vus[2].u.mem.size = ctypes.cast(payload, ctypes.c_void_p), len(value)
    for i, (name, header_value) in enumerate(headers, start=3):
        buf = ctypes.create_string_buffer(header_value, len(header_value))
        keep.append(buf)
        vus[i].vtype = _HEADER
        vus[i].u.header.name = name
        vus[i].u.header.val = ctypes.cast(buf, ctypes.c_void_p)
        vus[i].u.header.size = len(header_value)
    try:
        assert not lib.rd_kafka_produceva(rk, vus, len(vus)), "produce failed"
        lib.rd_kafka_flush(rk, 30_000)
        assert lib.rd_kafka_outq_len(rk) == 0, "not delivered"
    finally:
        lib.rd_kafka_destroy(rk)


class Headers(Handler):
    def __init__(self) -> None:
        self.seen: dict[str, list[tuple[str, bytes | None]]] = {}

    def handle(self, event: Event) -> None:
        self.seen[event.id] = list(event.headers)
        if event.id == "dead":
            raise PermanentError("to the dead-letter topic, foreign headers and all")


def test_header_names_that_are_not_utf8_are_ignored_not_fatal(
    kafka_bootstrap: str, kafka_topic: TopicFactory, tmp_path: Path
) -> None:
    topic = kafka_topic(partitions=1)
    dlq = kafka_topic(partitions=1, name=f"{topic}.dlq")
    produce(kafka_bootstrap, topic, [("before", b"{}")])
    for event_id in (b"ok", b"dead"):
        produce_with_raw_header_names(
            kafka_bootstrap,
            topic,
            b"{}",
            [(b"\xff\xfebad", b"x"), (b"event-id", event_id), (b"trace", b"t")],
        )
    produce(kafka_bootstrap, topic, [("after", b"{}")])
    settings = settings_for(kafka_bootstrap, topic, tmp_path / "state")
    handler = Headers()
    Watching(handler, settings).run_until_quiet(consumed=4)

    assert set(handler.seen) == {"before", "ok", "dead", "after"}
    assert handler.seen["ok"] == [("event-id", b"ok"), ("trace", b"t")]
    assert committed_offsets(kafka_bootstrap, settings.kafka.group_id, topic, 1) == {0: 4}
    (letter,) = read_all(kafka_bootstrap, dlq, 1)
    assert headers_of(letter)["dlq.reason"] == b"permanent-error"
    assert headers_of(letter)["trace"] == b"t"
