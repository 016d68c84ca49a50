"""A recorded Kafka message, shaped like a confluent-kafka ``Message`` for the engine."""

from __future__ import annotations

from dataclasses import dataclass, field

TIMESTAMP_CREATE_TIME = 1


@dataclass(frozen=True, slots=True)
class Record:
    """One message of a recording; its methods mirror ``confluent_kafka.Message``."""

    topic_: str
    partition_: int
    offset_: int
    key_: bytes | None = None
    value_: bytes | None = None
    headers_: list[tuple[str, str | bytes | None]] = field(default_factory=list)
    timestamp_ms: int | None = None

    def topic(self) -> str:
        return self.topic_

    def partition(self) -> int:
        return self.partition_

    def offset(self) -> int:
        return self.offset_

    def key(self) -> bytes | None:
        return self.key_

    def value(self) -> bytes | None:
        return self.value_

    def headers(self) -> list[tuple[str, str | bytes | None]]:
        return self.headers_

    def timestamp(self) -> tuple[int, int]:
        if self.timestamp_ms is None:
            return (0, -1)
        return (TIMESTAMP_CREATE_TIME, self.timestamp_ms)
