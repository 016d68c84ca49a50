"""A recorded Kafka message, shaped like a confluent-kafka ``Message`` for the engine."""

from __future__ import annotations

from dataclasses import dataclass, field

TIMESTAMP_NOT_AVAILABLE = 0
TIMESTAMP_CREATE_TIME = 1
TIMESTAMP_LOG_APPEND_TIME = 2


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
    timestamp_type_: int = TIMESTAMP_CREATE_TIME
    """Kept so a re-produced or replayed message says where its timestamp came from."""

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
            return (TIMESTAMP_NOT_AVAILABLE, -1)
        return (self.timestamp_type_, self.timestamp_ms)
