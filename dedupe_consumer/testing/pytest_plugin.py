"""pytest fixtures for tests that need a real Kafka broker.

Loaded through the ``pytest11`` entry point, so any project that installs
``dedupe-consumer`` gets ``kafka_bootstrap`` and ``kafka_topic`` (and
``kafka_cluster``, three brokers of a test module's own to kill, ``secured_kafka``,
a broker with SASL_SSL and ACLs, ``schema_registry``, a real Confluent-compatible
Schema Registry (Apicurio from Maven Central) -- and ``replay``, which needs no
broker at all (see its docstring). One broker
serves the whole session (starting a JVM per test would dominate run time);
isolation comes from every test getting fresh, uniquely named topics instead.

Without a broker the tests are skipped -- unless ``DEDUPE_REQUIRE_REAL_KAFKA=1``
(as in CI), where a skip would hide that the guarantees went untested, so the
tests fail with the reason from every provider.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Protocol, TypeVar

import pytest

from dedupe_consumer.kafka.logs import kafka_log_config
from dedupe_consumer.replay.report import DEFAULT_MAX_DEAD_LETTERED
from dedupe_consumer.testing._errors import BrokerUnavailableError, SchemaRegistryStartError
from dedupe_consumer.testing._local_cluster import LocalKafkaCluster
from dedupe_consumer.testing._providers import KafkaBroker, start_broker
from dedupe_consumer.testing._schema_registry import LocalSchemaRegistry
from dedupe_consumer.testing._secured import SecuredKafka

if TYPE_CHECKING:
    from dedupe_consumer.config import Settings
    from dedupe_consumer.handler import Handler
    from dedupe_consumer.replay.report import ReplayReport

__all__ = [
    "ENV_REQUIRE_REAL_KAFKA",
    "OutputReader",
    "ReplayRunner",
    "TopicFactory",
    "kafka_admin",
    "kafka_bootstrap",
    "kafka_broker",
    "kafka_cluster",
    "kafka_outputs",
    "kafka_topic",
    "replay",
    "schema_registry",
    "secured_kafka",
    "unique_topic_name",
]

ENV_REQUIRE_REAL_KAFKA: Final = "DEDUPE_REQUIRE_REAL_KAFKA"
_TOPIC_READY_TIMEOUT_S: Final = 30.0
_MAX_PREFIX: Final = 120  # Kafka allows 249 characters; leave room for the suffix

_Started = TypeVar("_Started")


class TopicFactory(Protocol):
    """Signature of the ``kafka_topic`` fixture's value."""

    def __call__(
        self,
        partitions: int = 1,
        config: Mapping[str, str] | None = None,
        name: str | None = None,
    ) -> str: ...


class OutputReader(Protocol):
    """Signature of the ``kafka_outputs`` fixture's value."""

    def __call__(
        self, topic: str, *, settle_s: float = 2.0, timeout_s: float = 60.0
    ) -> list[Any]: ...


class ReplayRunner(Protocol):
    """Signature of the ``replay`` fixture's value (``replay_recording`` minus its tmp dirs)."""

    def __call__(
        self,
        handler: Handler | type[Handler],
        path: str | Path,
        *,
        settings: Settings | None = None,
        inject_duplicates: float = 0.0,
        redeliver_batches: bool = False,
        seed: int = 0,
        max_dead_lettered: float = DEFAULT_MAX_DEAD_LETTERED,
    ) -> ReplayReport: ...


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"kafka: needs a real Kafka broker (fails, never skips, under {ENV_REQUIRE_REAL_KAFKA}=1)",
    )


def _require_real_kafka() -> bool:
    return os.environ.get(ENV_REQUIRE_REAL_KAFKA, "").strip().lower() in {"1", "true", "yes"}


def unique_topic_name(test_name: str) -> str:
    """A legal, collision-free topic name that still says which test made it.

    Only ``[A-Za-z0-9-]`` is kept: Kafka allows ``.`` and ``_`` too but warns
    that they collide in metric names, and parametrised test ids bring
    brackets and spaces.
    """
    prefix = re.sub(r"[^A-Za-z0-9-]+", "-", test_name).strip("-")[:_MAX_PREFIX] or "topic"
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def _start_or_give_up(start: Callable[[], _Started], failure: str = "") -> _Started:
    """``start()``; when it raises :class:`BrokerUnavailableError`, the test is skipped,
    or fails (its message after ``failure``) under ``DEDUPE_REQUIRE_REAL_KAFKA=1``."""
    try:
        return start()
    except BrokerUnavailableError as exc:
        if _require_real_kafka():
            pytest.fail(f"{ENV_REQUIRE_REAL_KAFKA}=1 but {failure}{exc}", pytrace=False)
        pytest.skip(f"{exc} (set {ENV_REQUIRE_REAL_KAFKA}=1 to fail instead of skipping)")


@pytest.fixture(scope="session")
def kafka_broker() -> Iterator[KafkaBroker]:
    """The session's broker (see :func:`start_broker` for where it comes from)."""
    broker = _start_or_give_up(start_broker)
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture(scope="module")
def kafka_cluster() -> Iterator[LocalKafkaCluster]:
    """Three Kafka nodes of this module's own (:class:`LocalKafkaCluster`), to kill and restart.

    Always started here from the Maven jars, never ``$KAFKA_BOOTSTRAP_SERVERS``: the
    tests stop its nodes. Replication factor 3, ``min.insync.replicas`` 2. Started
    only for modules that use it and stopped after their last test (three JVMs are
    not kept for the rest of a session); fails instead of skipping under
    ``DEDUPE_REQUIRE_REAL_KAFKA=1``.
    """
    cluster = _start_or_give_up(LocalKafkaCluster(3).start, "the cluster did not start: ")
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def secured_kafka() -> Iterator[SecuredKafka]:
    """A broker of this session's own with a SASL_SSL listener and ACLs (:class:`SecuredKafka`).

    SCRAM-SHA-512 over TLS, with a CA made for the run; ``add_user``, ``grant`` and
    ``revoke`` make users and change their rights, ``client_config(user)`` is how a
    client connects as one. Always started here from the Maven jars, never
    ``$KAFKA_BOOTSTRAP_SERVERS``. Started for the first test that uses it and shared
    by every later one (give each test its own users, topics and groups); fails
    instead of skipping under ``DEDUPE_REQUIRE_REAL_KAFKA=1``.
    """
    secured = _start_or_give_up(SecuredKafka().start, "the secured broker did not start: ")
    try:
        yield secured
    finally:
        secured.stop()


@pytest.fixture(scope="session")
def schema_registry() -> Iterator[LocalSchemaRegistry]:
    """A real Confluent-compatible Schema Registry for the session (:class:`LocalSchemaRegistry`).

    Apicurio Registry from Maven Central with in-memory storage, on a free
    loopback port; ``schema_registry.url`` is what confluent-kafka's
    ``SchemaRegistryClient({"url": ...})`` takes. One serves the whole session:
    tests keep apart by subject (the default subject is ``<topic>-value``, and
    ``kafka_topic`` names are unique). Stopped at the end of the session. Fails
    instead of skipping when it cannot start under ``DEDUPE_REQUIRE_REAL_KAFKA=1``.
    """
    registry = LocalSchemaRegistry()
    try:
        registry.start()
    except SchemaRegistryStartError as exc:
        if _require_real_kafka():
            pytest.fail(
                f"{ENV_REQUIRE_REAL_KAFKA}=1 but the schema registry did not start: {exc}",
                pytrace=False,
            )
        pytest.skip(f"{exc} (set {ENV_REQUIRE_REAL_KAFKA}=1 to fail instead of skipping)")
    try:
        yield registry
    finally:
        registry.stop()


@pytest.fixture(scope="session")
def kafka_bootstrap(kafka_broker: KafkaBroker) -> str:
    """``host:port`` of the session's broker, for ``bootstrap.servers``."""
    return kafka_broker.bootstrap_servers


@pytest.fixture(scope="session")
def kafka_admin(kafka_bootstrap: str) -> Any:
    """A ``confluent_kafka.admin.AdminClient`` on the session's broker."""
    from confluent_kafka.admin import AdminClient

    return AdminClient({"bootstrap.servers": kafka_bootstrap, **kafka_log_config()})


def _wait_for_topic(admin: Any, name: str, partitions: int, deadline: float) -> None:
    """Wait until the broker's metadata shows every partition with a leader.

    CreateTopics returns once the controller accepted the topic; the broker's
    metadata cache, which producers and consumers read, may lag behind it.
    """
    while True:
        metadata = admin.list_topics(topic=name, timeout=5)
        topic = metadata.topics.get(name)
        if (
            topic is not None
            and topic.error is None
            and len(topic.partitions) == partitions
            and all(p.leader >= 0 for p in topic.partitions.values())
        ):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"topic {name} not ready after {_TOPIC_READY_TIMEOUT_S:.0f} s")
        time.sleep(0.1)


@pytest.fixture
def kafka_topic(kafka_admin: Any, request: pytest.FixtureRequest) -> Iterator[TopicFactory]:
    """Factory creating topics for this test; they are deleted (best effort) afterwards."""
    from confluent_kafka.cimpl import NewTopic  # admin re-exports it without __all__

    created: list[str] = []

    def create(
        partitions: int = 1,
        config: Mapping[str, str] | None = None,
        name: str | None = None,
    ) -> str:
        topic = name or unique_topic_name(request.node.name)
        futures = kafka_admin.create_topics(
            [
                NewTopic(
                    topic,
                    num_partitions=partitions,
                    replication_factor=1,
                    config=dict(config or {}),
                )
            ],
            operation_timeout=_TOPIC_READY_TIMEOUT_S,
        )
        futures[topic].result(timeout=_TOPIC_READY_TIMEOUT_S)
        created.append(topic)
        _wait_for_topic(kafka_admin, topic, partitions, time.monotonic() + _TOPIC_READY_TIMEOUT_S)
        return topic

    yield create

    if created:
        # Keeps a long session's broker small; failures here must not turn a
        # passed test red, so they are ignored.
        for future in kafka_admin.delete_topics(created, operation_timeout=10).values():
            with contextlib.suppress(Exception):
                future.result(timeout=15)


@pytest.fixture
def kafka_outputs(kafka_bootstrap: str) -> OutputReader:
    """Read what a handler emitted: every *committed* message of a topic.

    ``kafka_outputs(topic)`` returns the confluent-kafka messages of ``topic``
    from the beginning, read with ``isolation.level = read_committed`` (outputs
    of ``event.emit`` and replies are produced in transactions: an aborted one's
    messages must not count), until nothing new arrived for ``settle_s``.
    """
    from confluent_kafka import Consumer

    def read(topic: str, *, settle_s: float = 2.0, timeout_s: float = 60.0) -> list[Any]:
        reader = Consumer(
            {
                "bootstrap.servers": kafka_bootstrap,
                "group.id": f"dedupe-outputs-{uuid.uuid4()}",
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
                "isolation.level": "read_committed",
                **kafka_log_config(),
            }
        )
        got: list[Any] = []
        try:
            reader.subscribe([topic])
            quiet_since = time.monotonic()
            deadline = quiet_since + timeout_s
            while time.monotonic() - quiet_since < settle_s and time.monotonic() < deadline:
                message = reader.poll(0.2)
                if message is None or message.error() is not None:
                    continue
                got.append(message)
                quiet_since = time.monotonic()
        finally:
            reader.close()
        return got

    return read


@pytest.fixture
def replay(tmp_path: Path, request: pytest.FixtureRequest) -> ReplayRunner:
    """Replay a recording through a handler with the real engine; no broker needed.

    Returns :func:`dedupe_consumer.replay.replay_recording` with each call's
    RocksDB store in a fresh directory under ``tmp_path`` (kept by pytest for
    a failed test, so its state can be inspected). A relative ``path`` that
    does not exist from the working directory is looked up next to the test
    file, so a test and its recording can live together and run from anywhere::

        def test_payments_once(replay):
            settings = Settings.from_toml("config/consumer.toml")  # the consumer's own
            report = replay(ChargeHandler, "payments.jsonl", settings=settings,
                            inject_duplicates=0.2, seed=1)
            assert report.ok, report.to_json()

    ``settings`` are the consumer's settings (``dedupe.id_source`` above all: with
    the default ``header:event-id`` a recording without that header is all
    dead letters, and the report fails as having tested nothing); the store path
    and the Kafka section are replaced. The handler is the real one: its side
    effects (a database write, an HTTP call) really happen during the replay, so
    point it at a test database or a fake downstream. ``report.ok`` fails when an
    ID was handled twice, an event was lost, the run stopped early, nothing was
    handled, or more than ``max_dead_lettered`` of the events were dead-lettered.
    """
    from dedupe_consumer.replay.harness import replay_recording

    runs = itertools.count()

    def run(
        handler: Handler | type[Handler],
        path: str | Path,
        *,
        settings: Settings | None = None,
        inject_duplicates: float = 0.0,
        redeliver_batches: bool = False,
        seed: int = 0,
        max_dead_lettered: float = DEFAULT_MAX_DEAD_LETTERED,
    ) -> ReplayReport:
        where = Path(path)
        beside_test = request.path.parent / where
        if not where.is_absolute() and not where.exists() and beside_test.exists():
            where = beside_test
        return replay_recording(
            handler,
            where,
            settings=settings,
            inject_duplicates=inject_duplicates,
            redeliver_batches=redeliver_batches,
            seed=seed,
            state_dir=tmp_path / f"replay-{next(runs)}",
            max_dead_lettered=max_dead_lettered,
        )

    return run
