"""dedupe_consumer: exactly-once effects for Kafka consumers.

Kafka delivers at least once; your handler runs at most once per event ID.
Decisions are persisted (RocksDB, synced WAL, with a per-partition watermark)
before offsets are committed.
"""

from dedupe_consumer.config import Settings
from dedupe_consumer.consumer import DedupeConsumer
from dedupe_consumer.errors import (
    ConfigError,
    DeadLetterError,
    DedupeError,
    MissingEventIdError,
    NotAuthorizedError,
    OffsetRegressionError,
    PermanentError,
    RetryableError,
    StoreError,
    StoreLockedError,
)
from dedupe_consumer.handler import Handler
from dedupe_consumer.models import BatchStats, DeadLetterReason, Decision, Event, TopicPartition
from dedupe_consumer.store import Response

__version__ = "0.1.0"

__all__ = [
    "BatchStats",
    "ConfigError",
    "DeadLetterError",
    "DeadLetterReason",
    "Decision",
    "DedupeConsumer",
    "DedupeError",
    "Event",
    "Handler",
    "MissingEventIdError",
    "NotAuthorizedError",
    "OffsetRegressionError",
    "PermanentError",
    "Response",
    "RetryableError",
    "Settings",
    "StoreError",
    "StoreLockedError",
    "TopicPartition",
    "__version__",
]
