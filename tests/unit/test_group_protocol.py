"""The consumer group protocol (KIP-848): settings the broker owns are refused up front."""

from __future__ import annotations

import pytest

from dedupe_consumer import ConfigError, Settings


def load(consumer: dict[str, str | int]) -> Settings:
    return Settings.load(
        kafka={
            "bootstrap_servers": "h:9092",
            "group_id": "g",
            "topics": ["t"],
            "consumer": consumer,
        },
        processing={"dead_letter_topic": "t.dlq"},
    )


@pytest.mark.parametrize(
    ("key", "value", "instead"),
    [
        ("session.timeout.ms", 6000, "group.consumer.session.timeout.ms"),
        ("heartbeat.interval.ms", 500, "group.consumer.heartbeat.interval.ms"),
        ("partition.assignment.strategy", "range", "group.remote.assignor"),
    ],
)
def test_classic_only_settings_are_a_config_error_naming_the_replacement(
    key: str, value: str | int, instead: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load({"group.protocol": "consumer", key: value})
    message = str(caught.value)
    assert "kafka.consumer" in message
    assert key in message
    assert instead in message
    assert "group.protocol = 'classic'" in message


def test_the_same_settings_are_fine_with_the_classic_protocol() -> None:
    load({"group.protocol": "classic", "session.timeout.ms": 6000})
    load({"session.timeout.ms": 6000, "partition.assignment.strategy": "range"})
    load({"group.protocol": "CONSUMER", "group.remote.assignor": "uniform"})
