"""Every client connects exactly as the main consumer does.

The dead-letter producer, the changelog producer, its admin and restore
consumer, and the sidecar's broker check all take ``KafkaSettings.connection()``:
every librdkafka *global* property set in ``[kafka.consumer]`` (TLS, SASL,
OAuth/OIDC ``https.*``, DNS, sockets, client id...) and none of the
consumer-only ones. It used to be an allow-list of prefixes that missed
``enable.ssl.certificate.verification``, ``https.*`` and others.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

import pytest
from confluent_kafka import KafkaException, Producer
from confluent_kafka.admin import AdminClient
from pydantic import ValidationError

from dedupe_consumer import ConfigError, Settings
from dedupe_consumer.config import KafkaConnection
from dedupe_consumer.errors import StoreError
from dedupe_consumer.kafka import KafkaDeadLetters
from dedupe_consumer.kafka.changelog import Changelog
from dedupe_consumer.kafka.source import KafkaSource
from dedupe_consumer.librdkafka import CONSUMER_ONLY, PRODUCER_ONLY
from dedupe_consumer.sidecar.health import BrokerCheck

from ..kafka_helpers import NullListener
from ..log_capture import captured_logs

GLOBAL: dict[str, Any] = {
    "ssl.endpoint.identification.algorithm": "none",
    "enable.ssl.certificate.verification": False,
    "client.dns.lookup": "use_all_dns_ips",
    "socket.keepalive.enable": True,
    "https.ca.location": "/etc/ssl/certs",
    "sasl.oauthbearer.method": "oidc",
    "security.protocol": "plaintext",
    "client.id": "payments-dedupe",
    "client.rack": "eu-west-1a",
    "connections.max.idle.ms": 540000,
    "broker.address.family": "v4",
    "metadata.max.age.ms": 60000,
    "api.version.request.timeout.ms": 5000,
    "reconnect.backoff.max.ms": 5000,
}
CONSUMER: dict[str, Any] = {
    "session.timeout.ms": 6000,
    "heartbeat.interval.ms": 500,
    "max.poll.interval.ms": 60000,
    "partition.assignment.strategy": "cooperative-sticky",
    "group.instance.id": "pod-1",
    "fetch.min.bytes": 1,
    "fetch.wait.max.ms": 100,
    "isolation.level": "read_committed",
    "auto.offset.reset": "earliest",
    "enable.partition.eof": False,
    "check.crcs": True,
    "queued.min.messages": 1000,
}


def settings_with(consumer: dict[str, Any], bootstrap: str = "127.0.0.1:1") -> Settings:
    return Settings.load(
        kafka={
            "bootstrap_servers": bootstrap,
            "group_id": "g",
            "topics": ["t"],
            "consumer": consumer,
        },
        processing={"dead_letter_topic": "t.dlq"},
    )


def test_every_global_property_and_no_consumer_property_is_shared() -> None:
    connection = settings_with({**GLOBAL, **CONSUMER}).kafka.connection().config("admin")
    assert connection == {**GLOBAL, "bootstrap.servers": "127.0.0.1:1"}


def test_the_deny_lists_hold_what_the_engine_sets_itself() -> None:
    # Properties the library sets per client must never leak from the consumer's dict.
    assert {"group.id", "enable.auto.commit", "isolation.level", "enable.partition.eof"} <= (
        CONSUMER_ONLY
    )
    assert {"transactional.id", "enable.idempotence", "acks", "linger.ms"} <= PRODUCER_ONLY
    assert not CONSUMER_ONLY & PRODUCER_ONLY


def test_librdkafka_sees_no_consumer_property_in_the_shared_config() -> None:
    """librdkafka itself says 'is a consumer property and will be ignored' for any we miss."""
    warnings: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            warnings.append(record.getMessage())

    logger = logging.getLogger("test_connection_config.librdkafka")
    logger.addHandler(Collect())
    logger.setLevel(logging.DEBUG)
    connection: dict[str, Any] = {
        **settings_with({**GLOBAL, **CONSUMER}).kafka.connection().config("admin"),
        "sasl.oauthbearer.method": "default",  # oidc would need an endpoint to start
    }
    with_logger: dict[str, Any] = {**connection, "logger": logger}
    Producer(with_logger).flush(0)
    AdminClient(with_logger)
    assert not [w for w in warnings if "CONFWARN" in w], warnings
    # ... and the check itself works: a consumer property does draw the warning.
    Producer({**connection, "session.timeout.ms": 6000, "logger": logger}).flush(0)
    assert any("session.timeout.ms is a consumer property" in w for w in warnings), warnings


@pytest.mark.parametrize(
    "bad",
    [
        {"enable.ssl.certificate.verification": "maybe"},
        {"ssl.endpoint.identification.algorithm": "sometimes"},
        {"client.dns.lookup": "ask-a-friend"},
        {"socket.keepalive.enable": "maybe"},
    ],
)
def test_the_property_reaches_every_client(bad: dict[str, Any]) -> None:
    """A value librdkafka rejects proves that each client was given the property."""
    (name,) = bad
    settings = settings_with(bad)
    with pytest.raises(KafkaException, match=name):
        KafkaDeadLetters(settings)
    with pytest.raises((KafkaException, StoreError), match=name):
        Changelog(settings.kafka.connection(), "g", timedelta(days=1), "tx-1")
    reachable, why = BrokerCheck(settings.kafka.connection())()
    assert not reachable
    assert name in why


class _NoPartitions(NullListener):
    """An assignment listener for a consumer that never gets a partition."""


SASL_SSL: dict[str, Any] = {
    "security.protocol": "sasl_ssl",
    "sasl.mechanism": "SCRAM-SHA-512",
    "sasl.username": "alice",
    "sasl.password": "not-shown",
    "ssl.endpoint.identification.algorithm": "none",
    "client.id": "connection-config-probe",
    "debug": "conf",  # each client logs its configuration when it is created
    # librdkafka's embedded mock cluster, one per client, in place of a SASL_SSL broker: it
    # replaces bootstrap.servers and security.protocol (the test below checks those).
    "test.mock.num.brokers": 1,
}
SHOWN = [  # as librdkafka prints them (it redacts the username and password itself)
    "sasl.mechanisms = SCRAM-SHA-512",
    "ssl.endpoint.identification.algorithm = none",
    "client.id = connection-config-probe",
]


def _configurations(logs: list[dict[str, Any]]) -> dict[str, str]:
    """Each librdkafka client's logged configuration, by client name."""
    by_client: dict[str, str] = {}
    for line in logs:
        if line.get("event") == "librdkafka" and line.get("facility") == "CONF":
            client = str(line["client"])
            by_client[client] = by_client.get(client, "") + str(line["message"]) + "\n"
    return by_client


def test_sasl_and_ssl_settings_reach_the_consumer_and_both_producers() -> None:
    """The main consumer, the dead-letter producer and the changelog producer (and the admin
    clients made on the way) are all built from the one KafkaConnection."""
    settings = settings_with({**SASL_SSL, "session.timeout.ms": 6000})
    with captured_logs() as logs:
        source = KafkaSource(settings, _NoPartitions())
        source.poll(1, 0.1)  # librdkafka's log lines arrive through poll
        source.close()
        dead_letters = KafkaDeadLetters(settings, flush_timeout_s=5, topic_timeout_s=5)
        dead_letters.close()
        changelog = Changelog(settings.kafka.connection(), "g", timedelta(days=1), "tx-probe")
        changelog.close()
    configurations = _configurations(logs)
    consumers = [c for name, c in configurations.items() if "#consumer-" in name]
    producers = [c for name, c in configurations.items() if "#producer-" in name]
    assert len(consumers) == 1 and "session.timeout.ms = 6000" in consumers[0]
    assert [c for c in producers if "enable.idempotence = true" in c]  # dead letters
    assert [c for c in producers if "transactional.id = tx-probe" in c]  # changelog
    for name, configuration in configurations.items():
        for line in SHOWN:
            assert line in configuration, (name, line, configuration)
    assert "not-shown" not in str(logs)
    # ... and none of them is given a consumer property it does not use.
    assert not [c for c in producers if "session.timeout.ms" in c]


def test_the_security_protocol_reaches_every_client() -> None:
    """A value librdkafka rejects proves that each client was given the property."""
    settings = settings_with({"security.protocol": "carrier-pigeon"})
    with pytest.raises(KafkaException, match=r"security\.protocol"):
        KafkaSource(settings, _NoPartitions())
    with pytest.raises(KafkaException, match=r"security\.protocol"):
        KafkaDeadLetters(settings)
    with pytest.raises((KafkaException, StoreError), match=r"security\.protocol"):
        Changelog(settings.kafka.connection(), "g", timedelta(days=1), "tx-1")
    reachable, why = BrokerCheck(settings.kafka.connection())()
    assert not reachable
    assert "security.protocol" in why


def test_a_client_may_not_take_another_roles_property() -> None:
    connection = KafkaConnection(bootstrap_servers="h:1", properties={"client.id": "x"})
    assert connection.config("admin") == {"client.id": "x", "bootstrap.servers": "h:1"}
    assert connection.config("consumer", {"group.id": "g"})["group.id"] == "g"
    with pytest.raises(ValueError, match=r"linger.ms \(a producer-only property\)"):
        connection.config("consumer", {"linger.ms": 5})
    with pytest.raises(ValueError, match=r"group.id \(a consumer-only property\)"):
        connection.config("producer", {"group.id": "g"})
    with pytest.raises(ValueError, match=r"bootstrap\.servers"):
        connection.config("admin", {"bootstrap.servers": "other:1"})
    with pytest.raises(ValidationError, match=r"isolation\.level"):
        KafkaConnection(bootstrap_servers="h:1", properties={"isolation.level": "read_committed"})


def test_misplaced_librdkafka_properties_stop_at_start_up() -> None:
    with pytest.raises(ConfigError) as info:
        Settings.load(
            kafka={
                "bootstrap_servers": "h:1",
                "group_id": "g",
                "topics": ["t"],
                "consumer": {"linger.ms": 5},
                "producer": {"max.poll.interval.ms": 1000, "bootstrap.servers": "other:1"},
            },
            processing={"dead_letter_topic": "t.dlq"},
        )
    message = str(info.value)
    assert "kafka.consumer" in message and "linger.ms" in message
    assert "move it to [kafka.producer]" in message
    assert "kafka.producer" in message and "max.poll.interval.ms" in message
    assert "set kafka.bootstrap_servers" in message


def test_the_connection_hides_secrets_in_its_repr() -> None:
    connection = settings_with(SASL_SSL).kafka.connection()
    assert "not-shown" not in repr(connection)
    assert "alice" in repr(connection)  # only secrets are hidden
    assert connection.config("producer")["sasl.password"] == "not-shown"
