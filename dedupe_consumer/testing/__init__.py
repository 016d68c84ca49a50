"""Real Kafka brokers for tests, and the pytest plugin that hands them out.

The framework's guarantees are about what a real broker does with offsets,
groups and transactions, so its tests -- and its users' tests -- run against
one: from ``$KAFKA_BOOTSTRAP_SERVERS``, a testcontainers container, or an
Apache Kafka started from Maven Central jars (:class:`LocalKafka`; three of them
as a :class:`LocalKafkaCluster` for broker-fault tests), or, for secured
clusters, one with a SASL_SSL listener and ACLs (:class:`SecuredKafka`). Tests of
Schema Registry payloads get a real Confluent-compatible registry, Apicurio
Registry from Maven Central (:class:`LocalSchemaRegistry`).
"""

from dedupe_consumer.testing._errors import BrokerUnavailableError, SchemaRegistryStartError
from dedupe_consumer.testing._local_cluster import LocalKafkaCluster
from dedupe_consumer.testing._local_kafka import LocalKafka
from dedupe_consumer.testing._maven import KAFKA_VERSION, resolve_kafka_libs
from dedupe_consumer.testing._providers import (
    ContainerKafka,
    ExternalKafka,
    KafkaBroker,
    start_broker,
)
from dedupe_consumer.testing._schema_registry import (
    APICURIO_REGISTRY_VERSION,
    LocalSchemaRegistry,
    resolve_apicurio_registry,
)
from dedupe_consumer.testing._secured import Acl, ScramUser, SecuredKafka

__all__ = [
    "APICURIO_REGISTRY_VERSION",
    "KAFKA_VERSION",
    "Acl",
    "BrokerUnavailableError",
    "ContainerKafka",
    "ExternalKafka",
    "KafkaBroker",
    "LocalKafka",
    "LocalKafkaCluster",
    "LocalSchemaRegistry",
    "SchemaRegistryStartError",
    "ScramUser",
    "SecuredKafka",
    "resolve_apicurio_registry",
    "resolve_kafka_libs",
    "start_broker",
]
