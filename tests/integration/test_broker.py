"""The test broker itself: if it lies, every other integration test lies with it.

These check that the broker the fixtures hand out is a real Kafka (byte-exact
records, group offsets, topic creation), that LocalKafka cleans up after
itself and survives restarts, and that "no broker" is reported with reasons
rather than hidden.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest
from confluent_kafka import (
    Consumer,
    ConsumerGroupTopicPartitions,
    KafkaError,
    Message,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import (  # type: ignore[attr-defined]  # public, not in __all__
    AdminClient,
    ConfigResource,
    ResourceType,
)
from confluent_kafka.cimpl import NewTopic

from dedupe_consumer.testing import (
    KAFKA_VERSION,
    BrokerUnavailableError,
    ExternalKafka,
    KafkaBroker,
    LocalKafka,
    start_broker,
)
from dedupe_consumer.testing.pytest_plugin import TopicFactory

pytestmark = pytest.mark.kafka

REPO_ROOT = Path(__file__).resolve().parents[2]
BROKEN_ARTIFACT = "org.apache.kafka:kafka_2.13:0.0.0-nope"


def _producer(bootstrap: str) -> Producer:
    return Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "acks": "all"})


def _consumer(bootstrap: str, group: str | None = None) -> Consumer:
    return Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": group or f"test-{uuid.uuid4().hex}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )


def _consume(consumer: Consumer, count: int, timeout: float = 30.0) -> list[Message]:
    """Poll until *count* records arrived; fail on any consumer error or on timeout."""
    messages: list[Message] = []
    deadline = time.monotonic() + timeout
    while len(messages) < count:
        assert time.monotonic() < deadline, f"got {len(messages)} of {count} records in time"
        message = consumer.poll(0.5)
        if message is None:
            continue
        error = message.error()
        assert error is None or error.code() == KafkaError._PARTITION_EOF, error
        if error is None:
            messages.append(message)
    return messages


def _flush(producer: Producer) -> None:
    assert producer.flush(30) == 0, "records still queued after flush"


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _break_every_provider(monkeypatch: pytest.MonkeyPatch, cache: Path) -> None:
    """Make each provider fail fast and for a known reason."""
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", f"127.0.0.1:{_closed_port()}")
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/docker.sock")
    monkeypatch.setenv("DEDUPE_KAFKA_MAVEN_ARTIFACT", BROKEN_ARTIFACT)
    monkeypatch.setenv("DEDUPE_KAFKA_CACHE", str(cache))


# --------------------------------------------------------------------------- #
# The session broker is a real Kafka
# --------------------------------------------------------------------------- #


def test_round_trip_is_byte_exact_for_keys_values_and_headers(
    kafka_bootstrap: str, kafka_topic: TopicFactory
) -> None:
    topic = kafka_topic()
    key = bytes(range(256))
    value = b"\x00\xff" + bytes(range(255, -1, -1)) * 64
    headers: list[tuple[str, str | bytes | None]] = [
        ("event-id", b"\x00id-1\xff"),
        ("dup", b"first"),
        ("dup", b"second"),  # repeated keys must survive, in order
        ("empty", b""),
        ("null", None),
        ("unicode-ключ", "é€".encode()),
    ]
    producer = _producer(kafka_bootstrap)
    producer.produce(topic, key=key, value=value, headers=headers)
    producer.produce(topic, key=None, value=None)  # a tombstone stays a tombstone
    _flush(producer)

    consumer = _consumer(kafka_bootstrap)
    try:
        consumer.subscribe([topic])
        first, second = _consume(consumer, 2)
    finally:
        consumer.close()

    assert (first.topic(), first.partition(), first.offset()) == (topic, 0, 0)
    assert first.key() == key
    assert first.value() == value
    assert first.headers() == headers
    assert second.key() is None
    assert second.value() is None
    assert second.offset() == 1


def test_group_commit_is_visible_through_admin_client(
    kafka_bootstrap: str, kafka_topic: TopicFactory, kafka_admin: AdminClient
) -> None:
    topic = kafka_topic(partitions=2)
    producer = _producer(kafka_bootstrap)
    for partition, count in ((0, 3), (1, 2)):
        for i in range(count):
            producer.produce(topic, value=f"{partition}-{i}".encode(), partition=partition)
    _flush(producer)

    group = f"group-{uuid.uuid4().hex}"
    consumer = _consumer(kafka_bootstrap, group)
    try:
        consumer.subscribe([topic])
        consumed = _consume(consumer, 5)
        consumer.commit(asynchronous=False)
    finally:
        consumer.close()
    assert sorted((m.partition(), m.offset()) for m in consumed) == [
        (0, 0),
        (0, 1),
        (0, 2),
        (1, 0),
        (1, 1),
    ]

    request = ConsumerGroupTopicPartitions(
        group, [TopicPartition(topic, 0), TopicPartition(topic, 1)]
    )
    futures = kafka_admin.list_consumer_group_offsets([request])
    result = futures[group].result(timeout=30)
    assert result.group_id == group
    committed = {tp.partition: tp.offset for tp in result.topic_partitions if tp.error is None}
    assert committed == {0: 3, 1: 2}


def test_kafka_topic_creates_partitions_and_config_as_asked(
    kafka_admin: AdminClient, kafka_topic: TopicFactory
) -> None:
    compacted = kafka_topic(3, {"cleanup.policy": "compact", "min.compaction.lag.ms": "1234"})
    plain = kafka_topic()
    chosen = f"explicit-{uuid.uuid4().hex}"
    assert kafka_topic(name=chosen, partitions=2) == chosen

    assert compacted != plain
    # Named after the test (sanitised: only [A-Za-z0-9-]), unique per call.
    assert compacted.startswith("test-kafka-topic-creates-partitions-and-config-as-asked-")
    assert plain.startswith("test-kafka-topic-creates-partitions-and-config-as-asked-")
    metadata = kafka_admin.list_topics(timeout=10)
    assert sorted(metadata.topics[compacted].partitions) == [0, 1, 2]
    assert sorted(metadata.topics[plain].partitions) == [0]
    assert sorted(metadata.topics[chosen].partitions) == [0, 1]

    resource = ConfigResource(ResourceType.TOPIC, compacted)
    configs = kafka_admin.describe_configs([resource])[resource].result(timeout=30)
    assert configs["cleanup.policy"].value == "compact"
    assert configs["min.compaction.lag.ms"].value == "1234"


def test_start_broker_prefers_kafka_bootstrap_servers_and_does_not_stop_it(
    monkeypatch: pytest.MonkeyPatch, kafka_bootstrap: str, kafka_admin: AdminClient
) -> None:
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", kafka_bootstrap)
    broker = start_broker()
    assert isinstance(broker, ExternalKafka)
    assert isinstance(broker, KafkaBroker)
    assert broker.bootstrap_servers == kafka_bootstrap
    broker.stop()
    # Not ours to stop: the session broker must still answer.
    assert kafka_admin.list_topics(timeout=10).brokers


# --------------------------------------------------------------------------- #
# LocalKafka lifecycle
# --------------------------------------------------------------------------- #


def test_local_kafka_stop_leaves_no_process_and_no_directory() -> None:
    broker = LocalKafka().start()
    pid = broker.pid
    workdir = broker.workdir
    try:
        assert pid is not None
        assert workdir is not None
        assert workdir.is_dir()
        assert Path(f"/proc/{pid}").exists()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        assert b"kafka.Kafka" in cmdline
        assert os.getpgid(pid) == pid, "the JVM must lead its own process group"
        admin = AdminClient({"bootstrap.servers": broker.bootstrap_servers})
        metadata = admin.list_topics(timeout=10)
        assert [b.id for b in metadata.brokers.values()] == [1]
    finally:
        broker.stop()

    assert not _pid_alive(pid)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not Path(f"/proc/{pid}").exists()
    assert not workdir.exists()
    assert broker.pid is None
    assert broker.workdir is None
    broker.stop()  # idempotent


def test_local_kafka_restart_keeps_address_and_data() -> None:
    with LocalKafka() as broker:
        address = broker.bootstrap_servers
        admin = AdminClient({"bootstrap.servers": address})
        topic = f"restart-{uuid.uuid4().hex}"
        admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])[
            topic
        ].result(timeout=30)
        producer = _producer(address)
        payloads = [f"record-{i}".encode() for i in range(3)]
        for payload in payloads:
            producer.produce(topic, value=payload)
        _flush(producer)

        for graceful in (True, False):
            old_pid = broker.pid
            assert old_pid is not None
            broker.stop_process(graceful=graceful)
            assert not _pid_alive(old_pid)
            assert broker.pid is None
            assert broker.workdir is not None and broker.workdir.is_dir()

            broker.start_process()
            assert broker.bootstrap_servers == address
            assert broker.pid not in (None, old_pid)
            consumer = _consumer(address)
            try:
                consumer.subscribe([topic])
                assert [m.value() for m in _consume(consumer, 3, timeout=60)] == payloads
            finally:
                consumer.close()


def test_broker_that_dies_at_start_up_reports_its_log_and_leaves_nothing() -> None:
    with socket.socket() as squatter:  # the PLAINTEXT port is taken: the JVM exits at once
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        broker = LocalKafka(port=squatter.getsockname()[1], startup_timeout=60)
        with pytest.raises(BrokerUnavailableError) as caught:
            broker.start()

    message = str(caught.value)
    assert "exited during start-up" in message
    assert "tail of" in message and "broker.log" in message
    assert "Address already in use" in message, message
    assert broker.pid is None
    assert broker.workdir is None
    logged = re.search(r"tail of (\S+)/logs/broker\.log", message)
    assert logged is not None, message
    assert not Path(logged.group(1)).exists(), "working directory left behind"


def test_broken_maven_artifact_raises_naming_maven(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("DEDUPE_KAFKA_MAVEN_ARTIFACT", BROKEN_ARTIFACT)
    monkeypatch.setenv("DEDUPE_KAFKA_CACHE", str(tmp_path))
    broker = LocalKafka()
    with pytest.raises(BrokerUnavailableError) as caught:
        broker.start()

    message = str(caught.value)
    assert "maven" in message.lower()
    assert BROKEN_ARTIFACT in message
    version_dir = tmp_path / "0.0.0-nope"
    assert not (version_dir / "libs").exists(), "a failed resolve must not look cached"
    assert list(version_dir.glob(".staging-*")) == [], "staging directory left behind"
    assert broker.workdir is None
    assert KAFKA_VERSION not in {p.name for p in tmp_path.iterdir()}, "wrong version resolved"


def test_start_broker_names_every_provider_and_why_it_failed(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _break_every_provider(monkeypatch, tmp_path)
    with pytest.raises(BrokerUnavailableError) as caught:
        start_broker(external_timeout=1.0)

    message = str(caught.value)
    env_at = message.index("$KAFKA_BOOTSTRAP_SERVERS:")
    containers_at = message.index("testcontainers:")
    local_at = message.index("LocalKafka (Maven jars):")
    assert env_at < containers_at < local_at, message
    assert "did not answer" in message[env_at:containers_at]
    assert "Docker" in message[containers_at:local_at]
    assert "maven" in message[local_at:].lower()


# --------------------------------------------------------------------------- #
# The pytest plugin's verdict when no broker can be had
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("required", [False, True], ids=["optional", "required"])
def test_plugin_skips_or_fails_without_broker(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, required: bool
) -> None:
    _break_every_provider(monkeypatch, tmp_path / "cache")
    if required:
        monkeypatch.setenv("DEDUPE_REQUIRE_REAL_KAFKA", "1")
    else:
        monkeypatch.delenv("DEDUPE_REQUIRE_REAL_KAFKA", raising=False)
    # An unreachable $KAFKA_BOOTSTRAP_SERVERS would cost its 15 s probe here.
    monkeypatch.delenv("KAFKA_BOOTSTRAP_SERVERS")
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    )
    (tmp_path / "pytest.ini").write_text("[pytest]\n", encoding="utf-8")
    (tmp_path / "test_inner.py").write_text(
        textwrap.dedent(
            """
            def test_needs_kafka(kafka_bootstrap):
                assert kafka_bootstrap
            """
        ),
        encoding="utf-8",
    )
    # "-p no:dedupe_consumer" keeps the installed entry point from registering
    # the same module a second time next to the explicit -p.
    result: subprocess.CompletedProcess[str] = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "no:dedupe_consumer",
            "-p",
            "dedupe_consumer.testing.pytest_plugin",
            "-p",
            "no:cacheprovider",
            "-rA",
            str(tmp_path / "test_inner.py"),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    output = result.stdout + result.stderr
    if required:
        assert result.returncode == 1, output
        assert "1 error" in output, output
        assert "DEDUPE_REQUIRE_REAL_KAFKA=1 but no real Kafka broker could be had" in output
    else:
        assert result.returncode == 0, output
        assert "1 skipped" in output, output
        assert "set DEDUPE_REQUIRE_REAL_KAFKA=1 to fail instead of skipping" in output
    assert "LocalKafka (Maven jars)" in output
    assert BROKEN_ARTIFACT in output
