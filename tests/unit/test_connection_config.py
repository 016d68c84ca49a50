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

from dedupe_consumer import Settings
from dedupe_consumer.errors import StoreError
from dedupe_consumer.kafka import KafkaDeadLetters
from dedupe_consumer.kafka.changelog import Changelog
from dedupe_consumer.librdkafka import CONSUMER_ONLY, PRODUCER_ONLY
from dedupe_consumer.sidecar.health import BrokerCheck

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
    connection = settings_with({**GLOBAL, **CONSUMER}).kafka.connection()
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
        **settings_with({**GLOBAL, **CONSUMER}).kafka.connection(),
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
